"""Helpers shared by titan_cp's tests, benchmarks and GPU checks: the launcher, the error measure, loading
one-rank weights into a parallelized model."""

from titan_cp.testing.launch import RankFailure, RankTimeout, free_port, run_on_ranks
from titan_cp.testing.numerics import rel_err
from titan_cp.testing.sharded import load_full_state

__all__ = ["RankFailure", "RankTimeout", "free_port", "load_full_state", "rel_err", "run_on_ranks"]
