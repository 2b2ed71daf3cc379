"""Qwen3.5 under pipeline parallel (TorchTitan's ``pipeline_vlm`` and schedules) x CP equals one rank.

The model spec's ``pipelining_fn`` splits the tiny model (4 layers: 3 GDN +
1 gated attention) into stages of whole layers and applies
``parallelize_qwen3_5_cp`` to each; CP runs inside every stage on the
zigzag layout, positions (document starts) reach every stage as a model
kwarg. Each microbatch is sharded along the sequence, as TorchTitan's trainer
does before ``pp_schedule.step``. The reference is the same model on the
whole batch in each process.

One 4-rank launch (PP 2 x CP 2) checks the dense tiny Qwen3.5
(tests/support/qwen35_common.py) and TorchTitan's ``debugmodel_moe`` (exact
experts, the load-balancing hook, expert bias compared) on Interleaved1F1B
(2 stages per rank) and on 1F1B, and the MoE model under PP 2 x CP 2 x EP 2
(EP borrows the CP ranks), against one rank: the loss, every parameter
gradient at both steps, every parameter (and expert bias) after 2 SGD steps
(momentum), fp32 rel 1e-5, and the tokens-per-expert counts the
load-balancing hook reads at each step (summed over dp x cp), which must be
one rank's: torch's first-step metadata inference is not counted
(``titan_cp.models.common.pipeline.with_exact_moe_counts``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tests.integration.test_qwen3_5_moe_ep import _NoMesh
from tests.support.qwen35_common import assert_within, one_rank_errors
from titan_cp.testing import load_full_state, rel_err, run_on_ranks

FP32_REL = 1e-5
STEPS = 2
VOCAB = 96


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _reference_model(moe: bool):
    from tests.support.qwen35_common import tiny_model

    if not moe:
        return tiny_model(0, cp_layout="zigzag")
    torch.manual_seed(0)
    model = _moe_config().build()
    model.init_weights()
    return model


def _moe_config():
    from titan_cp.models.qwen3_5.flavors import torchtitan_config
    from titan_cp.models.qwen3_5.model import titan_cp_config

    return titan_cp_config(torchtitan_config("debugmodel_moe", vocab_size=VOCAB, n_layers=4),
                           cp_layout="zigzag", expert_compute="exact")


def _batches(B: int, T: int):
    from tests.support.qwen35_common import packed_positions

    torch.manual_seed(1)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (B, T + 1))
        out.append((tokens[:, :-1], tokens[:, 1:], packed_positions(B, T, {0: [5, 7, T - 4], 1: [2]})))
    return out


def _optimizer(parts, parallel_dims, counts: dict):
    """SGD + TorchTitan's load-balancing hook; ``counts`` gets, per step, what that hook reads (summed over dp x cp)."""
    from torchtitan.components.optimizer import register_moe_load_balancing_hook

    optimizer = torch.optim.SGD([p for m in parts for p in m.parameters()], lr=0.5, momentum=0.9)
    loss_mesh = parallel_dims.get_optional_mesh("loss")

    def record(*_):  # a step pre-hook registered first, so it runs just before the load-balancing one
        step = len({key.split(".")[0] for key in counts})
        for part in parts:
            for name, block in part.layers.items():
                if getattr(block, "moe_enabled", False):
                    seen_E = _full(block.moe.tokens_per_expert_E).clone()
                    if loss_mesh is not None:
                        dist.all_reduce(seen_E, group=loss_mesh.get_group())
                    counts[f"step{step}.tokens_per_expert.layers.{name}"] = seen_E

    optimizer.register_step_pre_hook(record)
    register_moe_load_balancing_hook(optimizer, parts, parallel_dims)
    return optimizer


def _state(parts) -> dict:
    state = {n: _full(p.detach()).clone() for m in parts for n, p in m.named_parameters()}
    return state | {n: _full(b).clone() for m in parts for n, b in m.named_buffers() if n.endswith("expert_bias_E")}


def _train_reference(model, batches):
    counts = {}
    optimizer = _optimizer([model], _NoMesh(), counts)
    history = []
    for inputs, labels, positions in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs, positions=positions).flatten(0, 1), labels.flatten())
        loss.backward()
        history.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        optimizer.step()
    return history, _state([model]), counts


def _train_pipelined(config, initial, dims, schedule: str, batches):
    """Build the stages with the spec's pipelining_fn, then STEPS schedule steps; (loss or None, grads) per step."""
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig

    from titan_cp.cp.layout import rank_segments
    from titan_cp.models.qwen3_5.config_registry import model_spec

    spec = model_spec("debugmodel")  # its pipelining_fn / parallelize_fn; the model config is the test's
    B, T = batches[0][0].shape
    cp_mesh = dims.get_mesh("cp")
    cp_rank, cp = cp_mesh.get_local_rank(), cp_mesh.size()
    rows = B // dims.dp_shard
    row0 = rows * (dims.get_mesh("batch").get_local_rank() if dims.dp_shard > 1 else 0)

    def shard(t):
        return rank_segments(t[row0:row0 + rows], 1, cp_rank, cp, "zigzag")

    def loss_fn(pred, labels, **_):  # this rank's token sum over the global token count: CP / DP ranks add up
        return F.cross_entropy(pred.flatten(0, 1), labels.flatten(), reduction="sum") / (B * T), None

    parallelism = ParallelismConfig(
        data_parallel_shard_degree=dims.dp_shard, context_parallel_degree=cp, expert_parallel_degree=dims.ep,
        tensor_parallel_degree=dims.tp, pipeline_parallel_degree=dims.pp, pipeline_parallel_schedule=schedule, spmd_backend="partial_dtensor",
        pipeline_parallel_microbatch_size=1)
    training = TrainingConfig(local_batch_size=rows, seq_len=T, mixed_precision_param="float32")
    with torch.device("meta"):
        model = config.build()
    pp_schedule, parts, has_first, has_last = spec.pipelining_fn(
        model, parallel_dims=dims, training=training, parallelism=parallelism, compile_config=CompileConfig(),
        ac_config=None, dump_folder="/tmp", device=torch.device("cpu"), model_config=config,
        parallelize_fn=spec.parallelize_fn, loss_fn=loss_fn)
    for part in parts:
        part.to_empty(device="cpu")
        part.init_weights()
        load_full_state(part, initial)
    counts = {}
    optimizer = _optimizer(parts, dims, counts)
    history = []
    for inputs, labels, positions in batches:
        optimizer.zero_grad()
        inputs, labels, positions = shard(inputs), shard(labels), shard(positions)
        losses = [] if has_last else None
        pp_schedule.step(  # one row per microbatch, as the trainer hands them (titan_cp.components.compat item 10)
            arg_mbs=[(inputs[i:i + 1],) for i in range(rows)] if has_first else None,
            kwarg_mbs=[{"positions": positions[i:i + 1]} for i in range(rows)],
            target_mbs=[labels[i:i + 1] for i in range(rows)] if has_last else None,
            losses=losses, return_outputs=False)
        loss = None
        if has_last:
            loss = torch.stack(losses).sum().detach()
            dist.all_reduce(loss, group=dims.get_mesh("loss").get_group())
        history.append((loss, {n: _full(p.grad).clone() for m in parts for n, p in m.named_parameters()}))
        optimizer.step()
    return history, _state(parts), counts, [[n for n, _ in m.named_children()] for m in parts]


def _errors(rank: int, world: int, *, moe: bool, schedule: str, dp: int, ep: int, tp: int = 1) -> dict:
    """PP 2 x CP 2 (x FSDP dp x TP tp, EP ep) vs one rank; tests/integration/test_qwen3_5_8rank.py runs tp = 2."""
    from torchtitan.distributed import ParallelDims

    from tests.support.qwen35_common import tiny_config

    cp, pp = 2, 2
    reference = _reference_model(moe)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    batches = _batches(2 * dp, 12 * cp)
    ref_history, ref_state, ref_counts = _train_reference(reference, batches)

    dims = ParallelDims(dp_replicate=1, dp_shard=dp, cp=cp, tp=tp, pp=pp, ep=ep, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    config = _moe_config() if moe else tiny_config(cp_layout="zigzag")
    history, state, counts, units = _train_pipelined(config, initial, dims, schedule, batches)

    errors = one_rank_errors(history, state, ref_history, ref_state)
    for key, count in counts.items():  # this stage's MoE layers, both steps (summed over dp x cp) ...
        if dims.ep_enabled and tp > 1:  # ... and over TP, as the load-balancing hook does under TP x EP
            dist.all_reduce(count, group=dims.get_mesh("tp").get_group())
        errors[key] = rel_err(count, ref_counts[key])
    assert bool(ref_counts) == moe and len(counts) == len(ref_counts) // pp  # each rank: its stages' half
    bias = [(ref_state[n] - initial[n]).abs().max().item() for n in ref_state if n.endswith("expert_bias_E")]
    assert bool(bias) == moe
    return {"errors": errors, "held": sorted(state), "all": sorted(ref_state), "units": units,
            "expert_bias_moved": max(bias) if moe else None}


CASES = {  # name: (world, kwargs)
    "dense_pp2_cp2_interleaved": (4, dict(moe=False, schedule="Interleaved1F1B", dp=1, ep=1)),
    "dense_pp2_cp2_1f1b": (4, dict(moe=False, schedule="1F1B", dp=1, ep=1)),
    "moe_pp2_cp2_interleaved": (4, dict(moe=True, schedule="Interleaved1F1B", dp=1, ep=1)),
    "moe_pp2_cp2_1f1b": (4, dict(moe=True, schedule="1F1B", dp=1, ep=1)),
    "moe_pp2_cp2_ep2_1f1b": (4, dict(moe=True, schedule="1F1B", dp=1, ep=2)),  # EP borrows the CP ranks
}


def _launch(rank: int, world: int) -> dict:
    from torchtitan.distributed.utils import set_spmd_backend

    from titan_cp.components import compat

    compat.apply()
    set_spmd_backend("partial_dtensor")  # as TorchTitan's trainer does from parallelism.spmd_backend
    return {name: _errors(rank, world, **kw) for name, (n, kw) in CASES.items() if n == world}


def _check(results: list[dict], name: str) -> None:
    runs = [result[name] for result in results]
    held = set().union(*(run["held"] for run in runs))
    assert held == set(runs[0]["all"]), f"{name}: not every parameter is on some stage"
    assert sum("step0.loss" in run["errors"] for run in runs) == len(runs) // 2  # the last stage's ranks
    for rank, run in enumerate(runs):
        if run["expert_bias_moved"] is not None:
            assert run["expert_bias_moved"] > 0  # the load-balancing update really ran
        assert_within(run["errors"], FP32_REL, f"rank {rank} {name} stages {run['units']}")


@pytest.fixture(scope="module")
def four_ranks():
    return run_on_ranks(_launch, 4, timeout=900, pg_timeout=300)


@pytest.mark.parametrize("name", [n for n, (world, _) in CASES.items() if world == 4])
def test_qwen3_5_pp2_cp2_matches_one_rank(four_ranks, name):
    """Dense / MoE PP 2 x CP 2 (x EP 2) vs one rank: loss, every gradient, params + expert bias, MoE counts."""
    _check(four_ranks, name)


