"""The CP context a sequence-mixing layer needs: its process group, layout, exchange strategy and what
state passing keeps for the backward (``q_transition``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from titan_cp.cp.comm import all_gather_list
from titan_cp.cp.layout import num_segments, rank_of_segment, segments_of_rank
from titan_cp.cp.settings import CPSettings


@dataclass
class CPContext:
    """Context parallelism over ``group``; every rank holds the segments ``layout`` gives it.

    ``layout``, ``exchange`` and ``q_transition`` are a :class:`~titan_cp.cp.settings.CPSettings`
    choice (the choices and their rules live there). ``group`` None
    is a single rank (no communication; the layout still cuts its segments).
    """

    group: dist.ProcessGroup
    layout: str = "contiguous"
    exchange: str = "allgather"
    q_transition: str = "recompute"  # state passing: recompute q M in the backward, or keep it from the forward
    # Local signatures (dtype, shapes) already checked against every rank, per layer.
    checked_signatures: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        CPSettings(layout=self.layout, exchange=self.exchange, q_transition=self.q_transition)  # names, once

    @property
    def size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else dist.get_rank(self.group)

    @property
    def n_segments(self) -> int:
        return num_segments(self.size, self.layout)

    @property
    def local_segments(self) -> list[int]:
        return segments_of_rank(self.rank, self.size, self.layout)

    def holder(self, segment: int) -> int:
        """Rank (in the CP group) that holds ``segment``."""
        return rank_of_segment(segment, self.size, self.layout)

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def check_same_everywhere(self, layer_name: str, signature: tuple[int, ...], what: str) -> None:
        """Raise on every rank if ranks disagree on ``signature`` (dtype code, shapes).

        One tiny all-gather the first time a layer sees a signature; mismatches
        (a rank with another dtype or shard length) become a clear error on all
        ranks instead of a hang or garbage inside the exchange.
        """
        key = (layer_name, signature)
        if key in self.checked_signatures:
            return
        everyone = all_gather_list(torch.tensor(signature, dtype=torch.int64), self.group, self.size)
        rows = [tuple(t.tolist()) for t in everyone]
        if any(row != rows[0] for row in rows):
            raise ValueError(
                f"context parallel {layer_name}: ranks disagree on {what}: "
                + ", ".join(f"rank {r}: {row}" for r, row in enumerate(rows))
                + ". Every CP rank must feed the same dtype and shard shape (same batch, seq_len / CP)."
            )
        self.checked_signatures.add(key)


DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES.get(dtype, 99)
