"""Qwen3.5 MoE on 8 gloo ranks, PP 2 x TP 2 x CP 2 x EP 2 (TorchTitan's mesh and schedules), equals one rank (slow).

One 8-rank launch, the harness of tests/integration/test_qwen3_5_pp.py with
TP 2: the spec's ``pipelining_fn`` (TorchTitan's ``pipeline_vlm``) splits
TorchTitan's ``debugmodel_moe`` (8 routed experts top-2, gated shared expert,
expert-bias load balancing; ``expert_compute = "exact"``) into 2 stages of
whole layers (1F1B, one row per microbatch); inside each stage
``parallelize_qwen3_5_cp`` applies TP 2 with sequence parallel (TorchTitan's
default), CP 2 (zigzag, packed documents) and TorchTitan's TP x EP: EP 2 over
the TP pairs (whole experts, 4 per rank; the MoE's tokens split over TP), the
experts' FSDP over ``efsdp`` = the CP pairs. The reference is the same model
on the whole batch in each process.

Checked on every rank: the loss (last stage), every gradient of the stage's
parameters at both steps, every parameter and expert bias after 2 SGD steps
(momentum), within fp32 rel 1e-5, the tokens-per-expert counts of the stage's
MoE layers at both steps summed as TorchTitan's load-balancing hook sums them
(over TP, then dp x cp) equal to one rank's, and that the stages together hold
every parameter.
"""

from __future__ import annotations

import pytest

from tests.integration.test_qwen3_5_pp import _check, _errors
from titan_cp.testing import run_on_ranks

CASES = {  # name: _errors' layout (PP 2 x CP 2 there)
    "moe_pp2_tp2_cp2_ep2": dict(moe=True, schedule="1F1B", dp=1, ep=2, tp=2),
}


def _launch(rank: int, world: int) -> dict:
    from torchtitan.distributed.utils import set_spmd_backend

    from titan_cp.components import compat

    compat.apply()
    set_spmd_backend("partial_dtensor")  # as TorchTitan's trainer does from parallelism.spmd_backend
    return {name: _errors(rank, world, **kw) for name, kw in CASES.items()}


@pytest.fixture(scope="module")
def eight_ranks():
    return run_on_ranks(_launch, 8, timeout=1200, pg_timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_qwen3_5_pp2_tp2_cp2_ep2_matches_one_rank(eight_ranks, name):
    """PP 2 x TP 2 (SP) x CP 2 x EP 2 on 1F1B: loss, every gradient, params + expert bias after 2 steps, counts."""
    _check(eight_ranks, name)
