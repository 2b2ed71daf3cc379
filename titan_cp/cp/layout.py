"""How a sequence is cut into segments and which CP rank holds which segment.

A sequence of length L is cut into ``n_segments`` equal segments (numbered in
sequence order) and handed out to the P ranks of the CP group:

- ``contiguous``: P segments, rank r holds segment r. Causal work is
  unbalanced for softmax attention (rank P-1 attends to everything).
- ``zigzag``: 2P segments, rank r holds segments r and 2P-1-r (in that order,
  concatenated), so every rank has one early and one late segment and causal
  attention work is even.

Sequence-mixing layers never assume a layout: the GDN state fold and the conv
halo run over *segments in sequence order*, whichever rank holds them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from titan_cp.cp.comm import all_gather_list
from titan_cp.cp.settings import LAYOUTS
from titan_cp.errors import unknown_choice_message


def num_segments(cp_size: int, layout: str) -> int:
    if layout == "contiguous":
        return cp_size
    if layout == "zigzag":
        return 2 * cp_size
    raise ValueError(unknown_choice_message("parallelism.cp_layout", layout, LAYOUTS))


def segments_of_rank(rank: int, cp_size: int, layout: str) -> list[int]:
    """Segment indices held by ``rank``, in the order they are concatenated locally."""
    if num_segments(cp_size, layout) == cp_size:
        return [rank]
    return [rank, 2 * cp_size - 1 - rank]


def rank_of_segment(segment: int, cp_size: int, layout: str) -> int:
    n = num_segments(cp_size, layout)
    if not 0 <= segment < n:
        raise IndexError(f"segment {segment} out of range for {n} segments")
    return segment if segment < cp_size else n - 1 - segment


def check_divisible(seq_len: int, cp_size: int, layout: str, field: str = "training.seq_len") -> int:
    """Return the segment length, or raise naming the field and the fix."""
    n = num_segments(cp_size, layout)
    if seq_len % n != 0:
        lower, upper = (seq_len // n) * n, (seq_len // n + 1) * n
        raise ValueError(
            f"{field} = {seq_len} is not divisible by the {n} segments of CP degree {cp_size} "
            f"with layout '{layout}'. Use a multiple of {n} (e.g. {lower or upper} or {upper}), "
            f"or change parallelism.context_parallel_degree."
        )
    return seq_len // n


def rank_segments(x: torch.Tensor, dim: int, rank: int, cp_size: int, layout: str) -> torch.Tensor:
    """The part of a full sequence tensor that ``rank`` holds (segments concatenated)."""
    seg_len = check_divisible(x.shape[dim], cp_size, layout, field=f"sequence dim {dim} of a tensor")
    pieces = [x.narrow(dim, s * seg_len, seg_len) for s in segments_of_rank(rank, cp_size, layout)]
    return torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]


def unshard_sequence(local: torch.Tensor, dim: int, group: dist.ProcessGroup | None, layout: str) -> torch.Tensor:
    """All-gather every rank's shard and put the segments back in sequence order."""
    return reassemble(all_gather_list(local, group, dist.get_world_size(group)), dim, layout)


def reassemble(parts: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`rank_segments` over all ranks' parts (index = rank)."""
    cp_size = len(parts)
    n = num_segments(cp_size, layout)
    per_rank = n // cp_size
    seg_len = parts[0].shape[dim] // per_rank
    segments: list[torch.Tensor | None] = [None] * n
    for rank, part in enumerate(parts):
        for i, s in enumerate(segments_of_rank(rank, cp_size, layout)):
            segments[s] = part.narrow(dim, i * seg_len, seg_len)
    return torch.cat(segments, dim=dim)  # type: ignore[arg-type]
