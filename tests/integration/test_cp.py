"""CP core: a GDN layer and the whole debug model under CP reproduce one rank exactly.

Each multi-rank launch checks many cases inside the rank function (processes
are expensive on 2 cores). The reference is the same module run on the full
sequence in the same process with ``cp = None``. Both ``parallelism.cp_q_transition``
modes are checked: ``keep`` (q M saved from the forward) against one rank like
``recompute``, and the two modes' gradients against each other (MODES_REL).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan_cp.testing import RankFailure, rel_err, run_on_ranks
from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import rank_segments
from titan_cp.cp.comm import comm_stats
from titan_cp.models.gdn import model_config
from titan_cp.models.common.parallelize import apply_cp
from titan_cp.models.common.sequence import SequenceInfo
from titan_cp.models.gdn.layers import GatedDeltaNet

FP32_REL = 1e-5
MODES_REL = 1e-6  # keep vs recompute: the same math, q M from the forward or from the kernel's context


def doc_pattern(name: str, B: int, T: int, P: int, layout: str) -> torch.Tensor | None:
    """Document starts hitting shard boundaries, +-1 token, and short documents."""
    if name == "none":
        return None
    starts = torch.zeros(B, T, dtype=torch.bool)
    seg = T // (P if layout == "contiguous" else 2 * P)
    starts[0, [seg, seg + 1, 2 * seg - 1]] = True  # at, after and before a boundary
    starts[1, [1, 3, T - 2]] = True  # documents shorter than the conv kernel
    return starts


def make_layer(kernel: str, heads: int, seed: int = 0) -> GatedDeltaNet:
    torch.manual_seed(seed)
    layer = GatedDeltaNet(dim=24, num_heads=heads, head_dim=8, expand_v=1.5, num_v_heads=2 * heads,
                          conv_size=4, norm_eps=1e-6, kernel=kernel)
    layer.init_weights(0.02)
    layer.layer_name = "layer"
    return layer


def _cp_layer_step(rank, P, layer, x, weight, starts, layout, exchange, q_transition) -> dict[str, torch.Tensor]:
    """This rank's output and input gradient and the all-reduced parameter gradients under CP."""
    layer.zero_grad()
    layer.cp = CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange, q_transition=q_transition)
    shard = lambda t: None if t is None else rank_segments(t, 1, rank, P, layout)  # noqa: E731
    x_local = shard(x).clone().requires_grad_()
    y_local = layer(x_local, SequenceInfo(shard(starts)))
    (y_local * shard(weight)).sum().backward()
    out = {"out": y_local.detach(), "grad_x": x_local.grad}
    for n, p in layer.named_parameters():
        dist.all_reduce(p.grad)
        out[f"grad_{n}"] = p.grad.clone()
    layer.cp = None
    return out


def layer_errors(rank, P, kernel, exchange, layout, T, docs, q_transition="recompute", B=2) -> dict[str, float]:
    """CP vs one rank (output, input and parameter gradients); with ``q_transition='keep'`` also
    keep vs recompute ("modes: ..." entries, checked at MODES_REL)."""
    heads = P if exchange == "alltoall" else 2
    layer = make_layer(kernel, heads)
    torch.manual_seed(1)
    x = torch.randn(B, T, 24)
    weight = torch.randn(B, T, 24)
    starts = doc_pattern(docs, B, T, P, layout)

    x_full = x.clone().requires_grad_()
    (layer(x_full, SequenceInfo(starts)) * weight).sum().backward()
    shard = lambda t: None if t is None else rank_segments(t, 1, rank, P, layout)  # noqa: E731
    ref = {"out": shard(layer(x, SequenceInfo(starts)).detach()), "grad_x": shard(x_full.grad),
           **{f"grad_{n}": p.grad.clone() for n, p in layer.named_parameters()}}

    got = _cp_layer_step(rank, P, layer, x, weight, starts, layout, exchange, q_transition)
    errs = {name: rel_err(got[name], ref[name]) for name in ref}
    if q_transition == "keep":
        other = _cp_layer_step(rank, P, layer, x, weight, starts, layout, exchange, "recompute")
        errs |= {f"modes: {name}": rel_err(got[name], other[name]) for name in ref}
    return errs


def _layer_rank(rank, P, cases):
    return {case: layer_errors(rank, P, *case) for case in cases}


def _cases(P):
    T_contig = 7 * P  # 7 tokens per shard: not a multiple of the chunk size
    cases = []
    for exchange in ("allgather", "logscan", "alltoall"):
        layouts = ("contiguous", "zigzag") if exchange != "logscan" else ("contiguous",)
        for layout in layouts:
            T = 14 * P if layout == "zigzag" else T_contig
            for docs in ("none", "packed"):
                cases.append(("torch", exchange, layout, T, docs))
    cases.append(("recurrent", "allgather", "contiguous", T_contig, "packed"))
    cases.append(("recurrent", "logscan", "contiguous", T_contig, "none"))
    # Shards shorter than the conv kernel (2 tokens; zigzag: 1-token segments).
    cases.append(("torch", "allgather", "contiguous", 2 * P, "none"))
    cases.append(("torch", "allgather", "zigzag", 2 * P, "none"))
    cases.append(("torch", "logscan", "contiguous", 2 * P, "none"))
    # q M kept from the forward (parallelism.cp_q_transition = 'keep'): both exchanges, both layouts,
    # the native (torch) and the recomputing (recurrent) segment kernels.
    cases.append(("torch", "allgather", "zigzag", 14 * P, "packed", "keep"))
    cases.append(("torch", "logscan", "contiguous", T_contig, "packed", "keep"))
    cases.append(("recurrent", "allgather", "contiguous", T_contig, "packed", "keep"))
    return cases


@pytest.mark.parametrize("P", [2, 3, 4])
def test_gdn_layer_under_cp_matches_one_rank(P):
    results = run_on_ranks(_layer_rank, P, args=(_cases(P),), timeout=400)
    worst = {}
    for per_rank in results:
        for case, errs in per_rank.items():
            for name, err in errs.items():
                worst[(case, name)] = max(worst.get((case, name), 0.0), err)
    bad = {k: v for k, v in worst.items() if v > (MODES_REL if k[1].startswith("modes") else FP32_REL)}
    assert not bad, f"CP != single rank beyond {FP32_REL} (keep != recompute beyond {MODES_REL}): {bad}"
    assert any(k[1].startswith("modes") for k in worst)


def _model_rank(rank, P, layout, exchange):
    torch.manual_seed(0)
    cfg = model_config("debug", n_layers=2, dim=32, hidden_dim=64, vocab_size=97, num_heads=2, head_dim=8,
                       cp_layout=layout, cp_exchange=exchange)
    model = cfg.build()
    model.init_weights()
    B, T = 2, 10 * P if layout == "contiguous" else 10 * 2 * P
    tokens = torch.randint(0, 97, (B, T + 1))
    positions = torch.arange(T).repeat(B, 1)
    positions[1, T // 3:] -= T // 3  # row 1: a second document starting mid-sequence
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    loss_ref = F.cross_entropy(model(inputs, positions).flatten(0, 1), labels.flatten())
    loss_ref.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}

    shard = lambda t: rank_segments(t, 1, rank, P, layout)  # noqa: E731
    errs, grads = {}, {}
    for mode in ("recompute", "keep"):  # parallelism.cp_q_transition
        model.zero_grad()
        apply_cp(model, CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange, q_transition=mode))
        logits = model(shard(inputs), shard(positions))
        loss_sum = F.cross_entropy(logits.flatten(0, 1), shard(labels).flatten(), reduction="sum")
        (loss_sum / (B * T)).backward()
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        errs[f"{mode}: loss"] = rel_err(total / (B * T), loss_ref.detach())
        grads[mode] = {}
        for n, p in model.named_parameters():
            dist.all_reduce(p.grad)
            errs[f"{mode}: {n}"] = rel_err(p.grad, ref[n])
            grads[mode][n] = p.grad.clone()
    errs |= {f"modes: {n}": rel_err(grads["keep"][n], g) for n, g in grads["recompute"].items()}
    return errs


@pytest.mark.parametrize("P,layout,exchange", [(2, "zigzag", "allgather"), (3, "contiguous", "logscan"),
                                               (4, "contiguous", "allgather")])
def test_debug_model_under_cp_matches_one_rank(P, layout, exchange):
    results = run_on_ranks(_model_rank, P, args=(layout, exchange), timeout=300)
    for rank, errs in enumerate(results):
        bad = {k: v for k, v in errs.items() if v > (MODES_REL if k.startswith("modes") else FP32_REL)}
        assert not bad, f"rank {rank}: {bad}"
    print(f"P={P} keep vs recompute, worst relative gradient difference:",
          max(v for k, v in results[-1].items() if k.startswith("modes")))


def _bytes_rank(rank, P, lengths):
    out = {}
    for T in lengths:
        layer = make_layer("torch", 2)
        layer.cp = CPContext(group=dist.group.WORLD, layout="contiguous", exchange="allgather")
        x = rank_segments(torch.randn(1, T, 24), 1, rank, P, "contiguous").requires_grad_()
        comm_stats.reset()
        layer(x, SequenceInfo()).sum().backward()
        out[T] = {kind: (r.bytes_sent, r.bytes_received) for (_, kind), r in comm_stats.records.items()}
    return out


def test_exchanged_bytes_do_not_depend_on_sequence_length():
    results = run_on_ranks(_bytes_rank, 2, args=([1024, 16384],), timeout=300)
    for rank, per_length in enumerate(results):
        print(f"rank {rank} bytes per layer (sent, received) by kind:", per_length)
        assert per_length[1024] == per_length[16384]
        assert per_length[1024]["state_fwd"][1] > 0 and per_length[1024]["halo_fwd"][0 if rank == 0 else 1] > 0


def _mismatch_rank(rank, P):
    layer = make_layer("torch", 2)
    layer.cp = CPContext(group=dist.group.WORLD)
    dtype = torch.float64 if rank == 0 else torch.float32
    layer.to(dtype)
    layer(torch.randn(1, 8, 24, dtype=dtype), SequenceInfo())


def test_mismatched_dtypes_across_ranks_fail_on_every_rank():
    with pytest.raises(RankFailure) as info:
        run_on_ranks(_mismatch_rank, 2, timeout=120)
    assert sorted(info.value.failures) == [0, 1]
    assert all("ranks disagree" in tb for tb in info.value.failures.values())


def test_sequence_not_divisible_by_cp_is_rejected():
    with pytest.raises(ValueError, match="training.seq_len|not divisible"):
        rank_segments(torch.zeros(1, 10), 1, 0, 3, "contiguous")
    with pytest.raises(ValueError, match="parallelism.cp_exchange = 'logscan' needs"):
        CPContext(group=None, layout="zigzag", exchange="logscan")
    with pytest.raises(ValueError, match="Did you mean 'allgather'"):
        CPContext(group=None, exchange="allgathr")
