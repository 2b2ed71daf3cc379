"""Qwen3.5 under CP 2 x TP 2 (4 gloo ranks) equals one rank: dense without and with SP, MoE with TP-sharded experts.

One launch checks three runs, each trained like test_qwen3_5_moe_ep.py (its
``_train``: 2 SGD steps with momentum, TorchTitan's load-balancing hook before
each; see there why not AdamW) against the same model on the whole batch in
each process:

- dense tiny shape (tests/support/qwen35_common.py), TP without sequence
  parallel (activations replicated over TP);
- the same with ``parallelism.enable_sequence_parallel`` (the residual stream
  Shard(1) over TP; the GDN / attention layers all-gather the CP shard);
- TorchTitan's ``debugmodel_moe`` (8 routed experts top-2, gated shared expert,
  expert-bias load balancing), ``expert_compute = "exact"``, experts TP-sharded
  on their hidden dim, without and with SP.

Checked: the loss, every parameter gradient of both steps, every parameter
and every ``expert_bias_E`` after them, within fp32 rel 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from titan_cp.testing import load_full_state, rel_err, run_on_ranks
from tests.integration.test_qwen3_5_moe_ep import _batches, _Cfg, _config, _NoMesh, _train
from tests.support.qwen35_common import tiny_config, tiny_model

FP32_REL = 1e-5
CP, TP = 2, 2
RUNS = {  # name: (MoE?, sequence parallel)
    "dense_tp": (False, False),
    "dense_tp_sp": (False, True),
    "moe_tp": (True, False),
    "moe_tp_sp": (True, True),
}


def _reference_model(moe: bool):
    if moe:
        torch.manual_seed(0)
        model = _config("exact").build()
        model.init_weights()
        return model
    return tiny_model(cp_layout="zigzag")


def _meta_config(moe: bool):
    return _config("exact") if moe else tiny_config(cp_layout="zigzag")


def _errors(rank: int, world: int, moe: bool, sequence_parallel: bool) -> dict:
    from torchtitan.distributed import ParallelDims

    from titan_cp.cp.layout import rank_segments
    from titan_cp.models.qwen3_5.parallelize import parallelize_qwen3_5_cp

    reference = _reference_model(moe)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    batches = _batches(CP, 1)
    ref_history, ref_state = _train(reference, _NoMesh(), batches, lambda t: t)

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=CP, tp=TP, pp=1, ep=1, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    with torch.device("meta"):
        model = _meta_config(moe).build()
    parallelize_qwen3_5_cp(
        model, parallel_dims=dims, compile_config=None, ac_config=None, dump_folder="/tmp",
        training=_Cfg(mixed_precision_param="float32", mixed_precision_reduce="float32", enable_cpu_offload=False),
        parallelism=_Cfg(fsdp_reshard_after_forward="default", enable_sequence_parallel=sequence_parallel),
    )
    model.to_empty(device="cpu")
    model.init_weights()
    load_full_state(model, initial)
    cp_rank = dims.get_mesh("cp").get_local_rank()
    block_lengths = []  # the residual stream's local length: the CP shard, over TP under SP
    model.layers["1"].register_forward_pre_hook(lambda _, args: block_lengths.append(args[0].shape[1]))
    history, state = _train(model, dims, batches, lambda t: rank_segments(t, 1, cp_rank, CP, "zigzag"))

    errors = {}
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(history, ref_history)):
        errors[f"step{step}.loss"] = rel_err(loss / TP, ref_loss)  # _train sums the loss over all ranks
        errors |= {f"step{step}.grad.{n}": rel_err(g, ref_grads[n]) for n, g in grads.items()}
    errors |= {f"final.{n}": rel_err(v, ref_state[n]) for n, v in state.items()}
    assert errors.keys() >= {f"final.{n}" for n in ref_state}
    T_cp = batches[0][0].shape[1] // CP
    assert set(block_lengths) == {T_cp // TP if sequence_parallel else T_cp}, block_lengths
    if moe:
        assert any(n.endswith("expert_bias_E") for n in state)
        moved = max((ref_state[n] - initial[n]).abs().max().item()
                    for n in ref_state if n.endswith("expert_bias_E"))
        assert moved > 0  # the load-balancing update really ran
    return errors


def _launch(rank: int, world: int) -> dict:
    from torchtitan.distributed.utils import set_spmd_backend

    from titan_cp.components import compat

    compat.apply()
    set_spmd_backend("partial_dtensor")  # as TorchTitan's trainer does from parallelism.spmd_backend
    return {name: _errors(rank, world, moe, sp) for name, (moe, sp) in RUNS.items()}


@pytest.fixture(scope="module")
def cp2_tp2():
    return run_on_ranks(_launch, CP * TP, timeout=900, pg_timeout=300)


@pytest.mark.parametrize("run", list(RUNS))
def test_qwen3_5_cp2_tp2_matches_one_rank(cp2_tp2, run):
    """CP 2 x TP 2: loss, every gradient, parameters (+ expert bias) after 2 steps equal one rank."""
    for rank, result in enumerate(cp2_tp2):
        errors = result[run]
        worst = max(errors, key=errors.get)
        print(f"rank {rank} {run}: worst {worst} = {errors[worst]:.2e} ({len(errors)} checks)")
        bad = {k: v for k, v in errors.items() if not v <= FP32_REL}
        assert not bad, f"rank {rank} {run}: {bad}"


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    """Without CP (the shared preflight checks seq_len against 2 x cp x tp under CP): seq_len % tp, or SP off."""
    from torchtitan.config import ParallelismConfig

    from titan_cp.errors import ConfigError
    from titan_cp.models.qwen3_5.preflight import check_sequence_parallel

    with pytest.raises(ConfigError, match=r"seq_len = 9 is not divisible by parallelism.tensor_parallel_degree = 2: .* \(e.g. 10\)"):
        check_sequence_parallel(ParallelismConfig(tensor_parallel_degree=2), 9)
    check_sequence_parallel(ParallelismConfig(tensor_parallel_degree=2, enable_sequence_parallel=False), 9)
    check_sequence_parallel(ParallelismConfig(tensor_parallel_degree=2), 10)
