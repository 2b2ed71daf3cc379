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

- the same MoE under TorchTitan's TP x EP (EP borrows the TP ranks, whole
  experts sharded over ``ep`` only, the CP shard's tokens split over TP inside
  the MoE): CP 2 x TP 2 x EP 2 without SP (``ep`` = the TP pairs, the experts'
  FSDP over ``efsdp`` = the CP pairs) and CP 2 x TP 2 x EP 4 with SP (``ep``
  spans CP x TP).

Checked: the loss, every parameter gradient of both steps, every parameter
and every ``expert_bias_E`` after them, within fp32 rel 1e-5; for MoE also
the tokens-per-expert counts of every MoE layer at each step, summed as
TorchTitan's load-balancing hook sums them, equal to one rank's exactly.
"""

from __future__ import annotations

import pytest
import torch

from titan_cp.testing import load_full_state, run_on_ranks
from tests.integration.test_qwen3_5_moe_ep import _batches, _Cfg, _config, _NoMesh, _train
from tests.support.qwen35_common import assert_within, one_rank_errors, tiny_config, tiny_model

FP32_REL = 1e-5
CP, TP = 2, 2
RUNS = {  # name: (MoE?, sequence parallel, expert parallel degree)
    "dense_tp": (False, False, 1),
    "dense_tp_sp": (False, True, 1),
    "moe_tp": (True, False, 1),
    "moe_tp_sp": (True, True, 1),
    "moe_tp_ep2": (True, False, 2),
    "moe_tp_sp_ep4": (True, True, 4),
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


def _count_tokens(model) -> dict[str, list]:
    """Each MoE layer's ``tokens_per_expert_E`` after every forward (the load-balancing hook zeroes it per step)."""
    from titan_cp.models.qwen3_5.moe import moe_layers

    counts = {}
    for layer_id, block in model.layers.items():
        if getattr(block, "moe_enabled", False):
            seen = counts.setdefault(layer_id, [])
            block.moe.register_forward_hook(lambda m, args, out, seen=seen: seen.append(m.tokens_per_expert_E.clone()))
    assert len(counts) == len(moe_layers(model))
    return counts


def _errors(rank: int, world: int, moe: bool, sequence_parallel: bool, ep: int) -> dict:
    import torch.distributed as dist
    from torchtitan.distributed import ParallelDims

    from titan_cp.cp.layout import rank_segments
    from titan_cp.models.qwen3_5.parallelize import parallelize_qwen3_5_cp

    reference = _reference_model(moe)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    batches = _batches(CP, 1)
    ref_counts = _count_tokens(reference)
    ref_history, ref_state = _train(reference, _NoMesh(), batches, lambda t: t)

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=CP, tp=TP, pp=1, ep=ep, world_size=world,
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
    block_lengths, routed_lengths = [], []  # the residual stream's local length / the tokens each MoE routes
    model.layers["1"].register_forward_pre_hook(lambda _, args: block_lengths.append(args[0].shape[1]))
    counts = _count_tokens(model)
    for block in model.layers.values():
        if getattr(block, "moe_enabled", False):
            block.moe.router.register_forward_pre_hook(lambda _, args: routed_lengths.append(args[0].shape[1]))
    history, state = _train(model, dims, batches, lambda t: rank_segments(t, 1, cp_rank, CP, "zigzag"))
    history = [(loss / TP, grads) for loss, grads in history]  # _train sums the loss over all ranks

    errors = one_rank_errors(history, state, ref_history, ref_state)
    assert errors.keys() >= {f"final.{n}" for n in ref_state}
    T_cp = batches[0][0].shape[1] // CP
    assert set(block_lengths) == {T_cp // TP if sequence_parallel else T_cp}, block_lengths
    if moe:
        assert any(n.endswith("expert_bias_E") for n in state)
        moved = max((ref_state[n] - initial[n]).abs().max().item()
                    for n in ref_state if n.endswith("expert_bias_E"))
        assert moved > 0  # the load-balancing update really ran
        # TP x EP splits the CP shard's tokens over TP inside the MoE; TP alone routes them all on every TP rank
        assert set(routed_lengths) == {T_cp // TP if ep > 1 else T_cp}, routed_lengths
        for layer_id, per_step in counts.items():  # summed as TorchTitan's load-balancing hook does
            for step, count in enumerate(per_step):
                if ep > 1:
                    dist.all_reduce(count, group=dims.get_mesh("tp").get_group())
                dist.all_reduce(count, group=dims.get_mesh("loss").get_group())
                assert torch.equal(count, ref_counts[layer_id][step]), (layer_id, step, count)
    return errors


def _launch(rank: int, world: int) -> dict:
    from torchtitan.distributed.utils import set_spmd_backend

    from titan_cp.components import compat

    compat.apply()
    set_spmd_backend("partial_dtensor")  # as TorchTitan's trainer does from parallelism.spmd_backend
    return {name: _errors(rank, world, moe, sp, ep) for name, (moe, sp, ep) in RUNS.items()}


@pytest.fixture(scope="module")
def cp2_tp2():
    return run_on_ranks(_launch, CP * TP, timeout=900, pg_timeout=300)


@pytest.mark.parametrize("run", list(RUNS))
def test_qwen3_5_cp2_tp2_matches_one_rank(cp2_tp2, run):
    """CP 2 x TP 2 (x EP): loss, every gradient, parameters (+ expert bias) after 2 steps equal one rank."""
    for rank, result in enumerate(cp2_tp2):
        assert_within(result[run], FP32_REL, f"rank {rank} {run}")


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    """Without CP (the shared preflight checks seq_len against 2 x cp x tp under CP): seq_len % tp, or SP off."""
    from torchtitan.config import ParallelismConfig

    from titan_cp.errors import ConfigError
    from titan_cp.models.qwen3_5.preflight import check_sequence_parallel

    with pytest.raises(ConfigError, match=r"seq_len = 9 is not divisible by parallelism.tensor_parallel_degree = 2: .* \(e.g. 10\)"):
        check_sequence_parallel(ParallelismConfig(tensor_parallel_degree=2), 9)
    check_sequence_parallel(ParallelismConfig(tensor_parallel_degree=2, enable_sequence_parallel=False), 9)
    check_sequence_parallel(ParallelismConfig(tensor_parallel_degree=2), 10)


def test_tp_ep_needs_cp_shard_divisible_by_tp():
    """TP x EP routes 1/tp of each CP shard per TP rank: seq_len % (cp x tp), or EP 1; dense and TP-only MoE pass."""
    from torchtitan.config import ParallelismConfig

    from titan_cp.errors import ConfigError
    from titan_cp.models.qwen3_5.config_registry import model_spec
    from titan_cp.models.qwen3_5.preflight import check_moe_tokens_split

    moe, dense = model_spec("debugmodel_moe").model, model_spec("debugmodel").model
    tp_ep = ParallelismConfig(context_parallel_degree=2, tensor_parallel_degree=2, expert_parallel_degree=2,
                              enable_sequence_parallel=False)
    with pytest.raises(ConfigError, match=r"training.seq_len = 10 is not divisible by parallelism.context_parallel_"
                                          r"degree x tensor_parallel_degree = 2 x 2: .* \(e.g. 12\)"):
        check_moe_tokens_split(moe, tp_ep, 10)
    check_moe_tokens_split(moe, tp_ep, 12)
    check_moe_tokens_split(dense, tp_ep, 10)
    check_moe_tokens_split(moe, ParallelismConfig(context_parallel_degree=2, tensor_parallel_degree=2), 10)
