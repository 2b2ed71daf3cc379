"""The short-conv halo: each segment gets the last W-1 pre-conv tokens before it.

A causal depthwise conv of width W at token t reads tokens t-W+1..t. At the
start of a segment the first W-1 of those live in the previous segment(s).
Each segment s sends its tail (its last w = min(T_seg, W-1) tokens) by
point-to-point to the holder of segment s+j for j = 1..hops, hops =
ceil((W-1) / w) (one hop unless a segment is shorter than W-1 tokens).
Segment s then sees [tail(s-hops) .. tail(s-1)]; the caller keeps the last
W-1 tokens. Segments before the sequence start contribute zeros (the conv's
zero padding). Backward sends the halo's gradient back along the same edges
and adds it to the tail's gradient. Cost per segment and layer: hops x w x C
values, independent of L.

The tail is taken with :func:`split_tail`: a sliced tensor's backward would
build a full-size zero gradient for the whole segment and add it to the
segment's gradient; here the halo's gradient is added into the tail rows only.
"""

from __future__ import annotations

import math

import torch

from titan_cp.cp.comm import exchange_p2p
from titan_cp.cp.context import CPContext


def _edges(cp: CPContext, hops: int):
    """(local index i, hop j, peer segment) pairs: what this rank sends and receives."""
    sends, recvs = [], []
    for i, s in enumerate(cp.local_segments):
        for j in range(1, hops + 1):
            if s + j < cp.n_segments:
                sends.append((i, j, s + j))
            if s - j >= 0:
                recvs.append((i, j, s - j))
    return sends, recvs


def _tag(dest_segment: int, hop: int, hops: int) -> int:
    return dest_segment * (hops + 1) + hop


class _SplitTail(torch.autograd.Function):
    """x [N, T, C] -> (x, a copy of its last w tokens); backward adds the tail's gradient into the
    last w rows of x's gradient (in place: that gradient is this node's own buffer)."""

    @staticmethod
    def forward(ctx, x_NTC: torch.Tensor, w: int):
        ctx.w = w
        return x_NTC.view_as(x_NTC), x_NTC[:, x_NTC.shape[1] - w:].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x, grad_tail):
        if grad_tail is None:
            return grad_x, None
        if 0 in grad_x.stride():  # an expanded (broadcast) gradient cannot take an in-place add
            grad_x = grad_x.clone()
        grad_x[:, grad_x.shape[1] - ctx.w:] += grad_tail
        return grad_x, None


def split_tail(x_NTC: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, its last w tokens) for the halo, without a full-size gradient for the slice."""
    return _SplitTail.apply(x_NTC, w)


class _HaloExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tail_BNWC: torch.Tensor, cp: CPContext, hops: int, layer_name: str) -> torch.Tensor:
        B, N, w, C = tail_BNWC.shape
        halo = tail_BNWC.new_zeros(B, N, hops, w, C)  # hop index 0 = farthest (s - hops)
        sends, recvs = _edges(cp, hops)
        outgoing = [(tail_BNWC[:, i], cp.holder(dest), _tag(dest, j, hops)) for i, j, dest in sends]
        buffers = [(tail_BNWC.new_empty(B, w, C), cp.holder(src), _tag(cp.local_segments[i], j, hops))
                   for i, j, src in recvs]
        exchange_p2p(cp, outgoing, buffers, layer_name, "halo_fwd")
        for (i, j, _), (buf, _, _) in zip(recvs, buffers):
            halo[:, i, hops - j] = buf
        ctx.cp, ctx.hops, ctx.layer_name = cp, hops, layer_name
        return halo.reshape(B, N, hops * w, C)

    @staticmethod
    def backward(ctx, grad_halo):
        cp, hops = ctx.cp, ctx.hops
        B, N, hw, C = grad_halo.shape
        w = hw // hops
        grad_halo = grad_halo.reshape(B, N, hops, w, C)
        sends, recvs = _edges(cp, hops)
        # Reverse edges: the halo piece segment s got from s-j goes back to s-j.
        outgoing = [(grad_halo[:, i, hops - j], cp.holder(src), _tag(src, j, hops)) for i, j, src in recvs]
        buffers = [(grad_halo.new_empty(B, w, C), cp.holder(dest), _tag(cp.local_segments[i], j, hops))
                   for i, j, dest in sends]
        exchange_p2p(cp, outgoing, buffers, ctx.layer_name, "halo_bwd")
        if not sends:  # no later segment read this rank's tails
            return None, None, None, None
        grad_tail = grad_halo.new_zeros(B, N, w, C)
        for (i, _, _), (buf, _, _) in zip(sends, buffers):
            grad_tail[:, i] += buf
        return grad_tail, None, None, None


def exchange_halo(x_BNTC: torch.Tensor, history: int, cp: CPContext, layer_name: str = "") -> torch.Tensor:
    """The ``history`` tokens before each local segment, from the segments before it.

    Args:
        x_BNTC: [B, n_local_segments, T_seg, C] this rank's segments (pre-conv inputs).
        history: tokens needed before each segment (conv width - 1).
    Returns:
        [B, n_local_segments, history, C], zeros before the sequence start; differentiable.
    """
    T_seg = x_BNTC.shape[2]
    w = min(T_seg, history)
    hops = math.ceil(history / w)
    halo = _HaloExchange.apply(x_BNTC[:, :, T_seg - w:], cp, hops, layer_name)
    return halo[:, :, hops * w - history:]


def conv_halo(x_NTC: torch.Tensor, starts_NT: torch.Tensor | None, history: int, cp: CPContext, layer_name: str,
              n_local: int):
    """The conv halo of segment rows, for any family's short conv.

    ``x_NTC`` [B n, T_seg, C] pre-conv channels (every convolved channel concatenated),
    ``starts_NT`` their document starts. Returns (x, halo [B n, history, C], halo_starts or
    None): ``x`` is ``x_NTC`` with the tail split off for the send (:func:`split_tail`),
    the document starts travel as one extra channel.
    """
    N, T_seg = x_NTC.shape[:2]
    tail = min(T_seg, history)
    x, x_tail = split_tail(x_NTC, tail)
    if starts_NT is not None:
        x_tail = torch.cat([x_tail, starts_NT[:, T_seg - tail:].unsqueeze(-1).to(x_tail.dtype)], dim=-1)
    B = N // n_local
    halo = exchange_halo(x_tail.reshape(B, n_local, tail, -1), history, cp, layer_name).reshape(N, history, -1)
    halo_starts = None
    if starts_NT is not None:
        halo, halo_starts = halo[..., :-1], halo[..., -1] > 0.5
    return x, halo, halo_starts
