"""Helpers shared by titan_cp's tests, benchmarks and GPU checks: the launcher, the error measure."""

from titan_cp.testing.launch import RankFailure, RankTimeout, free_port, run_on_ranks
from titan_cp.testing.numerics import rel_err

__all__ = ["RankFailure", "RankTimeout", "free_port", "rel_err", "run_on_ranks"]
