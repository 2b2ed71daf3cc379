"""Small helpers shared across titan_cp."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor parameter (TP-sharded conv weights, A_log, ...), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t
