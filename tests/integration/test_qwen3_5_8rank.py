"""Qwen3.5 on 8 gloo ranks, PP 2 x TP 2 x CP 2 (TorchTitan's mesh and schedules), equals one rank (slow).

One 8-rank launch. The spec's ``pipelining_fn`` (TorchTitan's
``pipeline_vlm``) splits the tiny model into 2 stages of whole layers
(1F1B, one row per microbatch); inside each stage ``parallelize_qwen3_5_cp``
applies TP 2 with sequence parallel (TorchTitan's default) and CP 2 (zigzag,
packed documents), as tests/integration/test_qwen3_5_pp.py does for PP 2 x
CP 2 (its harness runs here). The reference is the same model on the whole
batch in each process.

``CASES``: TorchTitan's ``debugmodel_moe`` (8 routed experts top-2, gated
shared expert, expert-bias load balancing; ``expert_compute = "exact"``) with
TorchTitan's TP x EP inside each stage: EP 2 over the TP pairs (whole experts,
4 per rank; the MoE's tokens split over TP), the experts' FSDP over
``efsdp`` = the CP pairs.

Checked on every rank: the loss (last stage), every gradient of the stage's
parameters at both steps, every parameter and expert bias after 2 SGD steps
(momentum), within fp32 rel 1e-5, the tokens-per-expert counts of the stage's
MoE layers at both steps summed as TorchTitan's load-balancing hook sums them
(over TP, then dp x cp) equal to one rank's, and that the stages together hold
every parameter.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.integration.test_qwen3_5_pp import (
    _batches,
    _moe_config,
    _reference_model,
    _train_pipelined,
    _train_reference,
)
from tests.support.qwen35_common import assert_within, one_rank_errors
from titan_cp.testing import rel_err, run_on_ranks

FP32_REL = 1e-5
PP, TP, CP = 2, 2, 2
CASES = {  # name: (MoE?, expert parallel degree)
    "moe_pp2_tp2_cp2_ep2": (True, 2),
}


def _errors(rank: int, world: int, *, moe: bool, ep: int) -> dict:
    from torchtitan.distributed import ParallelDims

    from tests.support.qwen35_common import tiny_config

    reference = _reference_model(moe)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    batches = _batches(2, 12 * CP)
    ref_history, ref_state, ref_counts = _train_reference(reference, batches)

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=CP, tp=TP, pp=PP, ep=ep, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    config = _moe_config() if moe else tiny_config(cp_layout="zigzag")
    history, state, counts, units = _train_pipelined(config, initial, dims, "1F1B", batches)
    errors = one_rank_errors(history, state, ref_history, ref_state)
    for key, count in counts.items():  # this stage's MoE layers at both steps, summed over dp x cp ...
        if dims.ep_enabled:  # ... and over TP, as the load-balancing hook does under TP x EP
            dist.all_reduce(count, group=dims.get_mesh("tp").get_group())
        errors[key] = rel_err(count, ref_counts[key])
    assert bool(ref_counts) == moe and len(counts) == len(ref_counts) // PP
    bias = [(ref_state[n] - initial[n]).abs().max().item() for n in ref_state if n.endswith("expert_bias_E")]
    assert bool(bias) == moe
    return {"errors": errors, "held": sorted(state), "all": sorted(ref_state), "units": units,
            "expert_bias_moved": max(bias) if moe else None}


def _launch(rank: int, world: int) -> dict:
    from torchtitan.distributed.utils import set_spmd_backend

    from titan_cp.components import compat

    compat.apply()
    set_spmd_backend("partial_dtensor")  # as TorchTitan's trainer does from parallelism.spmd_backend
    return {name: _errors(rank, world, moe=moe, ep=ep) for name, (moe, ep) in CASES.items()}


@pytest.fixture(scope="module")
def eight_ranks():
    return run_on_ranks(_launch, PP * TP * CP, timeout=1200, pg_timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_qwen3_5_pp2_tp2_cp2_matches_one_rank(eight_ranks, name):
    """PP 2 x TP 2 (SP) x CP 2 x EP 2 on 1F1B: loss, every gradient, params + expert bias after 2 steps, counts."""
    runs = [result[name] for result in eight_ranks]
    assert set().union(*(run["held"] for run in runs)) == set(runs[0]["all"]), "a parameter is on no stage"
    assert sum("step0.loss" in run["errors"] for run in runs) == len(runs) // PP  # the last stage's ranks
    for rank, run in enumerate(runs):
        if run["expert_bias_moved"] is not None:
            assert run["expert_bias_moved"] > 0  # the load-balancing update really ran
        assert_within(run["errors"], FP32_REL, f"rank {rank} {name} stages {run['units']}")
