"""Causal ring attention for context parallelism, with a hand-written backward.

Layout (:mod:`titan_cp.cp.layout`)
----------------------------------
The sequence of length T is cut into ``n = num_segments(P, layout)`` equal
segments of length S = T / n. ``contiguous``: n = P, rank r holds segment r.
``zigzag``: n = 2P, rank r holds segments r and 2P-1-r, concatenated in that
order. Every rank passes its local tensors q [B, Hq, Tloc, D], k, v
[B, Hkv, Tloc, D] (Tloc = T / P; GQA: query head h uses kv head h // (Hq/Hkv)),
and optionally ``doc_ids`` [B, Tloc], the document id of each local token
(globally consistent, non-decreasing along the sequence).

Forward: online softmax over a ring
-----------------------------------
Each rank keeps its queries. K and V (packed as one [2, B, Hkv, Tloc, D]
buffer, plus ``doc_ids`` if given) travel around the ring: at step i = 0..P-1
rank r holds the K/V block of rank src = (r - i) mod P, and while it computes
on it, it already sends that block to rank r+1 and receives the next one from
rank r-1 (P-1 hops, ``batch_isend_irecv``; communication overlaps compute).

Work is planned at segment granularity: for a local query segment of global
index a and a key segment of global index b,

    b < a  -> full block (no mask)
    b == a -> diagonal block, causal mask
    b > a  -> future: skipped, not computed.

Hence in ``contiguous`` rank r computes r+1 blocks (steps 0..r) and idles for
the rest (unbalanced); in ``zigzag`` every rank computes 2P+1 segment blocks:
step 0 its own two diagonals plus (late queries x early keys); for src < r the
early key segment against both query segments; for src > r the late query
segment against both key segments. Neighbouring full segment blocks with the
same queries or keys are merged into one call. With ``doc_ids`` the mask is
block-causal within documents (key allowed iff same document and not later)
and a full block whose keys all belong to earlier documents than all its
queries (max key id < min query id, for every batch row) is skipped as well.

Each block op returns the block-normalised output O_b (accumulation dtype) and its
log-sum-exp L_b = log sum_j exp(s_ij) (-inf for a row with no allowed key).
Partial results merge exactly (online softmax / log-sum-exp):

    L   = logaddexp(L_acc, L_b)
    O   = exp(L_acc - L) * O_acc + exp(L_b - L) * O_b

so after the last step O is softmax(s) V over all allowed keys and L its LSE.

Backward (flash-attention-2 style, recomputation from the saved LSE)
--------------------------------------------------------------------
Saved: q, k, v, the output O and L (accumulation dtype, [B, Hq, Tloc]); no probabilities.
With dO the output gradient and delta = rowsum(dO * O), a block recomputes

    P  = exp(s - L)          (masked entries 0)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta)
    dQ = scale * dS K,        dK = scale * dS^T Q

dQ accumulates locally. K/V make a second trip around the ring (P-1 hops)
together with a dK/dV accumulator (accumulation dtype) for that block: at step i a rank
adds its contribution to the accumulator of the block it holds and passes it
on; after the P-th hop every accumulator is back at its owner and is that
block's dK, dV. The skip plan of the forward is reused, so skipped blocks are
skipped in the backward too (accumulators just pass through).

Communication per call (E / A = element size of k/v / of the accumulation dtype, N = B * Hkv * Tloc * D):

    forward:  P-1 rounds, per rank sent = received = (P-1) * (2 N E + 8 B Tloc [doc_ids])
    backward: P rounds,   per rank sent = received = (P-1) * 2 N E + P * 2 N A

recorded in :data:`titan_cp.cp.comm.comm_stats` as (layer_name, "ring_fwd")
and (layer_name, "ring_bwd"). With P = 1 (``cp`` None, or a context of one
rank) nothing is sent or recorded and the result is plain causal attention.

The block math lives in :mod:`titan_cp.cp.block_attention`
(:func:`block_attention_forward`, :func:`block_attention_backward`): torch's
fused flash-attention kernel on CPU, the explicit masked softmax above elsewhere.
Accumulation dtype (:func:`accumulation_dtype`): float32 for bf16 / fp16 / fp32
inputs, float64 for float64 (float64 runs stay float64 end to end).
:data:`block_counts` counts segment blocks computed and skipped (for tests and benchmarks).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from titan_cp.cp import layout as cp_layout
from titan_cp.cp.block_attention import accumulation_dtype, block_attention_backward, block_attention_forward
from titan_cp.cp.comm import Ring
from titan_cp.cp.context import CPContext, dtype_code

__all__ = [
    "ring_attention", "accumulation_dtype", "block_attention_forward", "block_attention_backward",
    "block_counts", "plan_step", "step_plans", "BlockTask",
]

# Segment blocks computed / skipped per pass and block-op calls made, summed over
# calls in this process: keys "fwd_blocks", "fwd_skipped", "fwd_calls",
# "bwd_blocks", "bwd_calls". Call ``block_counts.clear()`` to reset.
block_counts: Counter = Counter()

_TAG_KV = 0
_TAG_DOC = 1
_TAG_DKV = 2


# ---------------------------------------------------------------------------
# Planning: which segment blocks of one ring step are computed, and how.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockTask:
    """Local query segments [q_lo, q_hi) against held key segments [k_lo, k_hi)."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    causal: bool

    @property
    def n_blocks(self) -> int:
        return (self.q_hi - self.q_lo) * (self.k_hi - self.k_lo)


def plan_step(q_segments: list[int], k_segments: list[int]) -> tuple[list[BlockTask], int]:
    """Tasks for local query segments vs. a held K/V block, and the number skipped.

    Segment lists are global segment indices in local order. Past pairs are
    full, equal pairs causal, future pairs skipped. Full pairs are merged: per
    query segment its full key segments (if adjacent locally), then query
    segments with the same key range (if adjacent locally).
    """
    causal: list[BlockTask] = []
    per_query: list[tuple[int, list[int]]] = []
    skipped = 0
    for i, a in enumerate(q_segments):
        full = []
        for j, b in enumerate(k_segments):
            if b < a:
                full.append(j)
            elif b == a:
                causal.append(BlockTask(i, i + 1, j, j + 1, True))
            else:
                skipped += 1
        per_query.append((i, full))

    rows: list[BlockTask] = []
    for i, full in per_query:
        runs: list[list[int]] = []
        for j in full:
            if runs and runs[-1][-1] == j - 1:
                runs[-1].append(j)
            else:
                runs.append([j])
        rows.extend(BlockTask(i, i + 1, run[0], run[-1] + 1, False) for run in runs)
    merged: list[BlockTask] = []
    for t in rows:
        prev = merged[-1] if merged else None
        if prev is not None and (prev.k_lo, prev.k_hi) == (t.k_lo, t.k_hi) and prev.q_hi == t.q_lo:
            merged[-1] = BlockTask(prev.q_lo, t.q_hi, t.k_lo, t.k_hi, False)
        else:
            merged.append(t)
    return merged + causal, skipped


def step_plans(rank: int, P: int, layout: str) -> list[tuple[list[BlockTask], int]]:
    """:func:`plan_step` for every ring step of ``rank``: at step i it holds the K/V of rank (rank - i) mod P."""
    mine = cp_layout.segments_of_rank(rank, P, layout)
    return [plan_step(mine, cp_layout.segments_of_rank((rank - i) % P, P, layout)) for i in range(P)]


def _docs_disjoint(q_doc: torch.Tensor, k_doc: torch.Tensor) -> torch.Tensor:
    """True (0-d bool tensor) when every key's document precedes every query's, per row."""
    return (k_doc.amax(dim=1) < q_doc.amin(dim=1)).all()


# ---------------------------------------------------------------------------
# Autograd function
# ---------------------------------------------------------------------------


def _merge(out_acc, lse_acc, out_b, lse_b, sl: slice) -> None:
    """In place: fold a block result into the running (out, lse) on query rows ``sl``."""
    o = out_acc[:, :, sl]
    lse_old = lse_acc[:, :, sl]
    lse_new = torch.logaddexp(lse_old, lse_b)
    ref = torch.where(torch.isfinite(lse_new), lse_new, torch.zeros_like(lse_new))
    o.mul_(torch.exp(lse_old - ref).unsqueeze(-1)).add_(out_b * torch.exp(lse_b - ref).unsqueeze(-1))
    lse_old.copy_(lse_new)


class _RingAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, cp: CPContext, scale, layer_name):
        P, layout = cp.size, cp.layout
        ring = Ring(cp) if P > 1 else None
        q_segments = cp_layout.segments_of_rank(cp.rank, P, layout)
        seg = q.shape[2] // len(q_segments)

        kv = torch.stack([k, v]).contiguous()
        doc = doc_ids.contiguous() if doc_ids is not None else None
        acc = accumulation_dtype(q.dtype)
        out_acc = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse_acc = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        plans: list[list[BlockTask]] = []
        key_docs: list[torch.Tensor | None] = []
        for i, (tasks, skipped) in enumerate(step_plans(cp.rank, P, layout)):
            pending = None
            if i < P - 1:
                payload = [(kv, _TAG_KV)] + ([(doc, _TAG_DOC)] if doc is not None else [])
                pending = ring.shift(payload)
            kept = []
            for t in tasks:
                qs, ks = slice(t.q_lo * seg, t.q_hi * seg), slice(t.k_lo * seg, t.k_hi * seg)
                q_doc = k_doc = None
                if doc is not None:
                    q_doc, k_doc = doc_ids[:, qs], doc[:, ks]
                    if not t.causal and bool(_docs_disjoint(q_doc, k_doc)):
                        skipped += t.n_blocks
                        continue
                out_b, lse_b = block_attention_forward(
                    q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], scale=scale, causal=t.causal,
                    q_doc=q_doc, k_doc=k_doc,
                )
                _merge(out_acc, lse_acc, out_b, lse_b, qs)
                kept.append(t)
                block_counts["fwd_blocks"] += t.n_blocks
                block_counts["fwd_calls"] += 1
            block_counts["fwd_skipped"] += skipped
            plans.append(kept)
            key_docs.append(doc)
            if pending is not None:
                received = pending.wait()
                kv = received[0]
                if doc is not None:
                    doc = received[1]
        if P > 1:
            ring.record(layer_name, "ring_fwd", rounds=P - 1)

        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.plans, ctx.key_docs, ctx.doc_ids = plans, key_docs, doc_ids
        ctx.cp, ctx.P, ctx.seg, ctx.scale, ctx.layer_name = cp, P, seg, scale, layer_name
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        P, seg, scale = ctx.P, ctx.seg, ctx.scale
        ring = Ring(ctx.cp) if P > 1 else None
        acc = lse.dtype  # accumulation_dtype(q.dtype)
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)  # [B, Hq, Tloc]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv_shape = (2,) + tuple(k.shape)
        dkv = dkv_pending = None
        for i in range(P):
            kv_pending = None
            if i < P - 1:
                kv_pending = ring.shift([(kv, _TAG_KV)])
            block_dkv = None
            for t in ctx.plans[i]:
                qs, ks = slice(t.q_lo * seg, t.q_hi * seg), slice(t.k_lo * seg, t.k_hi * seg)
                q_doc = k_doc = None
                if ctx.doc_ids is not None:
                    q_doc, k_doc = ctx.doc_ids[:, qs], ctx.key_docs[i][:, ks]
                dq_b, dk_b, dv_b = block_attention_backward(
                    q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], dout[:, :, qs], lse[:, :, qs],
                    delta[:, :, qs], scale=scale, causal=t.causal, q_doc=q_doc, k_doc=k_doc,
                )
                dq[:, :, qs] += dq_b
                if block_dkv is None:
                    block_dkv = torch.zeros(dkv_shape, dtype=acc, device=q.device)
                block_dkv[0][:, :, ks] += dk_b
                block_dkv[1][:, :, ks] += dv_b
                block_counts["bwd_blocks"] += t.n_blocks
                block_counts["bwd_calls"] += 1
            # The accumulator of the block held now: what came with it plus our part.
            if i == 0:
                dkv = block_dkv if block_dkv is not None else torch.zeros(dkv_shape, dtype=acc, device=q.device)
            else:
                dkv = dkv_pending.wait()[0]
                if block_dkv is not None:
                    dkv += block_dkv
            if P > 1:
                dkv_pending = ring.shift([(dkv, _TAG_DKV)])
            if kv_pending is not None:
                kv = kv_pending.wait()[0]
        if P > 1:
            dkv = dkv_pending.wait()[0]  # our own block's accumulator, back after P hops
            ring.record(ctx.layer_name, "ring_bwd", rounds=P)
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------


def _check_inputs(q, k, v, doc_ids, P: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be [B, H, T, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"ring_attention: {name} must be floating point, got {t.dtype}")
    B, Hq, T, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"ring_attention: k and v must have one shape, got k {tuple(k.shape)} v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(
            f"ring_attention: k has shape {tuple(k.shape)}, expected [B, Hkv, T, D] = ({B}, Hkv, {T}, {D}) "
            f"from q {tuple(q.shape)}"
        )
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"ring_attention: query heads q.shape[1] = {Hq} must be a multiple of kv heads "
                         f"k.shape[1] = {Hkv} (GQA)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"ring_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    per_rank = cp_layout.num_segments(P, layout) // P
    if T % per_rank != 0:
        n = cp_layout.num_segments(P, layout)
        raise ValueError(
            f"ring_attention: local sequence length q.shape[2] = {T} does not split into the {per_rank} "
            f"segments per rank of layout '{layout}': the global sequence length ({P} ranks x {T} = {P * T}, "
            f"usually training.seq_len) must be a multiple of {n} segments"
        )
    if doc_ids is not None:
        integer = not (doc_ids.dtype == torch.bool or doc_ids.is_floating_point() or doc_ids.is_complex())
        if tuple(doc_ids.shape) != (B, T) or not integer:
            raise ValueError(
                f"ring_attention: doc_ids must be an integer tensor [B, Tloc] = {(B, T)}, "
                f"got {doc_ids.dtype} {tuple(doc_ids.shape)}"
            )


def check_ring_inputs_agree(cp: CPContext | None, layer_name: str, q_BTHD, k_BTHD, masks_documents: bool) -> None:
    """Every CP rank must bring the same dtype, shapes and masking, or the ring would hang."""
    if cp is not None and cp.size > 1:
        cp.check_same_everywhere(layer_name, (dtype_code(q_BTHD.dtype), *q_BTHD.shape, k_BTHD.shape[2],
                                              int(masks_documents)),
                                 "(dtype, batch, local length, query heads, head dim, kv heads, document masking)")


@torch.compiler.disable
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp: CPContext | None,
    *,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
    layer_name: str = "attention",
) -> torch.Tensor:
    """Causal (optionally document-masked) attention over a sequence sharded across ``cp.group``.

    q [B, Hq, Tloc, D], k/v [B, Hkv, Tloc, D] are this rank's segments of the
    sequence per ``cp.layout`` (see :mod:`titan_cp.cp.layout`); Hq must be a
    multiple of Hkv. ``cp`` None (or a context of one rank) means no context
    parallelism.
    ``scale`` defaults to 1/sqrt(D). ``doc_ids`` [B, Tloc] (integer, globally
    non-decreasing along the sequence) restricts attention to earlier tokens of
    the same document. Returns out [B, Hq, Tloc, D] in q's dtype; differentiable
    in q, k, v. Communication is recorded under ``layer_name``.
    """
    cp = cp if cp is not None else CPContext(group=None)
    _check_inputs(q, k, v, doc_ids, cp.size, cp.layout)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if doc_ids is not None:
        doc_ids = doc_ids.to(torch.int64)
    return _RingAttentionFn.apply(q, k, v, doc_ids, cp, float(scale), layer_name)
