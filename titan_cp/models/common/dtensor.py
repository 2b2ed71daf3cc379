"""Small helpers shared across titan_cp."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial


def local_tensor(t: torch.Tensor, *, grad_is_partial: bool = False) -> torch.Tensor:
    """The local shard of a DTensor parameter (TP-sharded conv weights, A_log, ...), or ``t`` itself.

    ``grad_is_partial``: the local computation sees only part of what the
    (replicated) parameter acts on, e.g. the gated norm shared by all heads
    while this TP rank holds a subset of heads, so the gradient must be
    summed over the mesh.
    """
    if not isinstance(t, DTensor):
        return t
    if grad_is_partial:
        return t.to_local(grad_placements=[Partial()] * t.device_mesh.ndim)
    return t.to_local()
