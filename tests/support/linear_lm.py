"""One-rank comparisons for the GDN LM's families (KDA, Mamba-2 ...): a model trained under CP (or TP) on
P ranks vs the same model on one rank, with packed documents whose edges sit on and around the segment
boundaries. Used by tests/integration/test_kda_model.py and test_mamba2_model.py."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import num_segments, rank_segments
from titan_cp.models.common.parallelize import apply_cp
from titan_cp.models.gdn.parallelize import apply_tp
from titan_cp.testing import rel_err


# CP cases of the fp32 launches, and every exchange x layout a family allows (logscan: contiguous only;
# alltoall needs heads divisible by P) for the float64 ones.
CASES = [("contiguous", "allgather"), ("zigzag", "allgather"), ("contiguous", "logscan"), ("zigzag", "alltoall")]
FP64_CASES = [("contiguous", "allgather"), ("zigzag", "allgather"), ("contiguous", "logscan"),
              ("contiguous", "alltoall"), ("zigzag", "alltoall")]


def packed_positions(B, L, P, layout):
    """Positions of B rows of L tokens: row 0 has documents starting on the first segment boundary and just
    after the last one, row 1 one just before the middle boundary (segments of ``layout`` over P ranks)."""
    seg = L // num_segments(P, layout)
    bounds = list(range(seg, L, seg))
    positions = torch.arange(L).repeat(B, 1)
    for row, start in ((0, bounds[0]), (0, bounds[-1] + 1), (1, bounds[len(bounds) // 2] - 1)):
        positions[row, start:] = torch.arange(L - start)
    return positions


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def one_rank_errors(config, rank, P, layout, exchange, *, vocab_size, dtype=torch.float32, L=32, steps=2, lr=0.5,
                    check_tp=None, tp=None):
    """Relative errors of loss and every gradient per step, and of every parameter after ``steps`` SGD steps.

    ``layout`` 'tp': heads split over the P ranks (titan_cp/models/gdn/parallelize.py), whole sequences
    (``check_tp(model)`` may assert on the sharded model); else CP over the P ranks with ``layout`` /
    ``exchange``. ``tp``: the P ranks form a (P / tp, tp) mesh ('cp', 'tp'), heads split over 'tp' and, with a
    CP ``layout``, the sequence over 'cp' (TP x CP; with layout 'tp' the P / tp rows each run TP alone).
    Both models are ``config.build()`` in ``dtype``; B = 2 rows of L tokens.
    """
    B = 2
    tp = tp or (P if layout == "tp" else 1)
    cp_size = 1 if layout == "tp" else P // tp
    tokens = torch.randint(0, vocab_size, (B, L + 1), generator=torch.Generator().manual_seed(5))
    positions = packed_positions(B, L, P if layout == "tp" else cp_size, "contiguous" if layout == "tp" else layout)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    ref, model = (config.build() for _ in range(2))
    for m in (ref, model):
        m.init_states()
        m.to(dtype)
    cp_group, cp_rank, shard = dist.group.WORLD, rank, lambda t: t  # noqa: E731
    if tp > 1:
        mesh = init_device_mesh("cpu", (P // tp, tp), mesh_dim_names=("cp", "tp"))
        apply_tp(model, mesh["tp"])
        if check_tp is not None:
            check_tp(model)
        cp_group, cp_rank = mesh["cp"].get_group(), mesh["cp"].get_local_rank()
    if layout != "tp":
        apply_cp(model, CPContext(group=cp_group, layout=layout, exchange=exchange))
        shard = lambda t: rank_segments(t, 1, cp_rank, cp_size, layout)  # noqa: E731
    errs = {}
    for step in range(steps):
        loss_ref = F.cross_entropy(ref(inputs, positions).flatten(0, 1), labels.flatten())
        loss_ref.backward()
        loss_sum = F.cross_entropy(model(shard(inputs), shard(positions)).flatten(0, 1), shard(labels).flatten(),
                                   reduction="sum")
        (loss_sum / (B * L)).backward()
        total = loss_sum.detach().clone()
        if layout != "tp":  # CP: each rank's tokens' share
            dist.all_reduce(total, group=cp_group)
        errs[f"loss{step}"] = rel_err(total / (B * L), loss_ref.detach())
        for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
            if layout != "tp":  # (a TP-sharded or TP-partial gradient: this rank's part)
                dist.all_reduce(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad, group=cp_group)
            errs[f"grad{step} {name}"] = rel_err(_full(p.grad), p_ref.grad)
            with torch.no_grad():
                p_ref -= lr * p_ref.grad
                p -= lr * p.grad
            p_ref.grad, p.grad = None, None
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        errs[f"param {name}"] = rel_err(_full(p.detach()), p_ref.detach())
    return errs


def worst_over_ranks(results) -> dict[str, float]:
    """The largest error of each name over the ranks' error dicts."""
    worst: dict[str, float] = {}
    for errs in results:
        for name, err in errs.items():
            worst[name] = max(worst.get(name, 0.0), err)
    return worst


def assert_compared_within(worst, cases, whats, names, kinds, tol, label):
    """Every ``{layout}/{exchange} {what} {parameter}`` of ``cases`` x ``whats`` x ``names`` was compared,
    and no error in ``worst`` exceeds ``tol``; prints the worst error of each of ``kinds``."""
    for layout, exchange in cases:
        for what in whats:
            assert {f"{layout}/{exchange} {what} {n}" for n in names} <= set(worst), (layout, exchange, what)
    for kind in kinds:
        print(f"{label} worst {kind}: {max(v for k, v in worst.items() if kind in k):.1e}")
    bad = {k: v for k, v in worst.items() if v > tol}
    assert not bad, f"{label} != one rank beyond {tol:g}: {bad}"
