"""parallelize_gdn on a real DeviceMesh: FSDP x CP x TP reproduce the one-rank loss and gradients.

Each rank builds the model on meta, parallelizes it like the trainer does,
loads the reference weights, runs one forward/backward on its part of the
global batch (dp rows, cp sequence shard, tp heads) and compares the loss and
every full gradient with a plain one-process run of the same model.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from titan_cp.testing import load_full_state, RankFailure, rel_err, run_on_ranks
from titan_cp.cp.layout import rank_segments
from titan_cp.models.gdn import model_config
from titan_cp.models.common.parallelize import apply_cp
from titan_cp.models.gdn.parallelize import parallelize_gdn

FP32_REL = 1e-5


class _Cfg:
    """The few trainer-config fields parallelize_gdn reads."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _run(rank, world, dp, cp, tp, flavor_overrides, layout, exchange):
    from torchtitan.distributed import ParallelDims

    from titan_cp.components import compat

    compat.apply()
    dims = ParallelDims(dp_replicate=1, dp_shard=dp, cp=cp, tp=tp, pp=1, ep=1, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    cfg = model_config("debug", cp_layout=layout, cp_exchange=exchange, **flavor_overrides)
    torch.manual_seed(0)
    reference = cfg.build()
    reference.init_weights()
    with torch.device("meta"):
        model = cfg.build()
    training = _Cfg(mixed_precision_param="float32", mixed_precision_reduce="float32", enable_cpu_offload=False)
    parallelism = _Cfg(fsdp_reshard_after_forward="default")
    parallelize_gdn(model, parallel_dims=dims, training=training, parallelism=parallelism,
                    compile_config=None, ac_config=None, dump_folder="/tmp")
    model.to_empty(device="cpu")
    load_full_state(model, reference.state_dict())

    B, T = 2 * dp, 16 * cp
    torch.manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1))
    positions = torch.arange(T).repeat(B, 1)
    positions[0, T // 2 - 1:] -= T // 2 - 1  # a packed document boundary one token before the middle
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ref_loss = F.cross_entropy(reference(inputs, positions).flatten(0, 1), labels.flatten())
    ref_loss.backward()

    dp_rank = dims.get_mesh("batch").get_local_rank() if dp > 1 else 0
    cp_rank = dims.get_mesh("cp").get_local_rank() if cp > 1 else 0
    rows = slice(dp_rank * 2, dp_rank * 2 + 2)
    shard = lambda t: rank_segments(t[rows], 1, cp_rank, cp, layout)  # noqa: E731
    logits = model(shard(inputs), shard(positions))
    loss_sum = F.cross_entropy(logits.flatten(0, 1), shard(labels).flatten(), reduction="sum")
    (loss_sum / (B * T)).backward()
    total = loss_sum.detach().clone()
    dist.all_reduce(total)
    errors = {"loss": rel_err(total / (B * T * tp), ref_loss.detach())}
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        errors[name] = rel_err(grad, ref_grads[name].grad)
    return errors


LAYOUTS = [
    # (dp, cp, tp, model overrides, layout, exchange)
    (1, 2, 1, {}, "contiguous", "allgather"),
    (1, 1, 2, {}, "contiguous", "allgather"),
    (2, 2, 1, {}, "zigzag", "allgather"),
    (1, 2, 2, {}, "contiguous", "logscan"),
    (1, 2, 2, {"num_heads": 4, "num_v_heads": 8}, "contiguous", "alltoall"),
    (1, 2, 2, {"layer_pattern": "GA", "attn_num_heads": 4, "attn_num_kv_heads": 2, "attn_head_dim": 8},
     "zigzag", "allgather"),
]


@pytest.mark.parametrize("dp,cp,tp,overrides,layout,exchange", LAYOUTS)
def test_fsdp_cp_tp_match_one_rank(dp, cp, tp, overrides, layout, exchange):
    world = dp * cp * tp
    results = run_on_ranks(_run, world, args=(dp, cp, tp, overrides, layout, exchange), timeout=300)
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if v > FP32_REL}
        assert not bad, f"rank {rank}: {bad}"


class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = torch.nn.Conv1d(4, 4, 3)


def _guard(rank, world):
    from titan_cp.cp.context import CPContext

    apply_cp(_Conv(), CPContext(group=dist.group.WORLD))


def test_cp_refuses_layers_that_are_not_cp_aware():
    with pytest.raises(RankFailure) as info:
        run_on_ranks(_guard, 2, timeout=120)
    assert all("'mixer' (Conv1d)" in tb and "not CP-aware" in tb for tb in info.value.failures.values())


def _compiled(rank, world):
    from titan_cp.cp.context import CPContext
    from titan_cp.models.common.parallelize import apply_compile

    torch.manual_seed(0)
    model = model_config("debug", n_layers=2, layer_pattern="GA", attn_head_dim=16).build()
    model.init_weights()
    apply_cp(model, CPContext(group=dist.group.WORLD))
    tokens = torch.randint(0, 2048, (2, 33))
    inputs, labels = rank_segments(tokens[:, :-1], 1, rank, world, "contiguous"), tokens[:, 1:]
    labels = rank_segments(labels, 1, rank, world, "contiguous")
    eager = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_compile(model, backend="aot_eager")
    compiled = F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten())
    compiled.backward()
    return max([rel_err(compiled.detach(), eager.detach())]
               + [rel_err(p.grad, g) for p, g in zip(model.parameters(), eager_grads)])


def test_torch_compile_under_cp_matches_eager():
    """CP does not break torch.compile: compiled blocks (GDN + attention) give the eager loss and grads."""
    errors = run_on_ranks(_compiled, 2, timeout=300)
    assert max(errors) <= FP32_REL, errors
