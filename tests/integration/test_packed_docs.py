"""Packed documents under CP: no state or conv history crosses a document start, wherever it falls.

Reference: every document run ALONE through the same model on one rank, the
outputs concatenated. Under test: the packed rows (positions restarting at
each document start) under CP = 1, 2, 3, 4, every exchange strategy and
layout. Document starts are placed per P at a shard boundary, one token
before and after one, documents shorter than the conv kernel, and a second
row that is one document spanning every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan_cp.testing import rel_err, run_on_ranks
from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import num_segments, rank_segments
from titan_cp.models.gdn import model_config
from titan_cp.models.common.parallelize import apply_cp

FP32_REL = 1e-5
SEQ_LEN = 48


def document_starts(P: int, layout: str) -> list[int]:
    n = num_segments(P, layout)
    seg = SEQ_LEN // n
    last_boundary = (n - 1) * seg if n > 1 else seg
    starts = {0, seg - 1, seg + 1, seg + 2, last_boundary, last_boundary + 1, SEQ_LEN - 2}
    return sorted(s for s in starts if 0 <= s < SEQ_LEN)


def packed_batch(P: int, layout: str):
    torch.manual_seed(3)
    tokens = torch.randint(0, 61, (2, SEQ_LEN))
    labels = torch.randint(0, 61, (2, SEQ_LEN))
    positions = torch.arange(SEQ_LEN).repeat(2, 1)
    starts = document_starts(P, layout)
    for s, e in zip(starts, starts[1:] + [SEQ_LEN]):
        positions[0, s:e] = torch.arange(e - s)
    documents = [(0, s, e) for s, e in zip(starts, starts[1:] + [SEQ_LEN])] + [(1, 0, SEQ_LEN)]
    return tokens, labels, positions, documents


def build(exchange: str, layout: str):
    torch.manual_seed(0)
    cfg = model_config("debug", n_layers=2, dim=24, hidden_dim=48, vocab_size=61, num_heads=12, head_dim=4,
                       expand_v=2.0, cp_exchange=exchange, cp_layout=layout)
    model = cfg.build()
    model.init_weights()
    return model


def errors_vs_documents_alone(rank: int, P: int, exchange: str, layout: str) -> dict[str, float]:
    tokens, labels, positions, documents = packed_batch(P, layout)
    model = build(exchange, layout)
    # Reference: each document alone, concatenated.
    loss_ref = 0.0
    logits_ref = torch.zeros(2, SEQ_LEN, 61)
    for row, s, e in documents:
        logits = model(tokens[row:row + 1, s:e])
        logits_ref[row, s:e] = logits[0].detach()
        loss_ref = loss_ref + F.cross_entropy(logits[0], labels[row, s:e], reduction="sum")
    (loss_ref / labels.numel()).backward()
    grads_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    cp = CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange) if P > 1 else None
    apply_cp(model, cp)
    shard = lambda t: rank_segments(t, 1, rank, P, layout)  # noqa: E731
    logits = model(shard(tokens), shard(positions))
    loss = F.cross_entropy(logits.flatten(0, 1), shard(labels).flatten(), reduction="sum")
    (loss / labels.numel()).backward()
    total = loss.detach().clone()
    if P > 1:
        dist.all_reduce(total)
    errs = {"logits": rel_err(logits.detach(), shard(logits_ref)), "loss": rel_err(total, loss_ref.detach())}
    for n, p in model.named_parameters():
        if P > 1:
            dist.all_reduce(p.grad)
        errs[n] = rel_err(p.grad, grads_ref[n])
    return errs


def _rank(rank, P, cases):
    return {case: errors_vs_documents_alone(rank, P, *case) for case in cases}


def strategies(P: int):
    if P == 1:
        return [("allgather", "contiguous")]
    return [("allgather", "contiguous"), ("allgather", "zigzag"), ("logscan", "contiguous"),
            ("alltoall", "contiguous"), ("alltoall", "zigzag")]


def test_document_layout_hits_every_case():
    """The document starts really sit at, before and after a shard boundary, with short documents."""
    for P in (2, 3, 4):
        seg = SEQ_LEN // P
        starts = document_starts(P, "contiguous")
        assert {seg - 1, seg + 1, (P - 1) * seg} <= set(starts)
        assert min(b - a for a, b in zip(starts, starts[1:])) < 4  # shorter than the conv kernel


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_packed_documents_under_cp_equal_documents_alone(P):
    if P == 1:
        results = [_rank(0, 1, strategies(1))]
    else:
        results = run_on_ranks(_rank, P, args=(strategies(P),), timeout=400)
    for rank, per_case in enumerate(results):
        for case, errs in per_case.items():
            bad = {k: v for k, v in errs.items() if v > FP32_REL}
            assert not bad, f"P={P} rank {rank} {case}: {bad}"
