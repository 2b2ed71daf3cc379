"""Loading a one-rank model's weights into its parallelized (DTensor) copy, for exactness tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import distribute_tensor


def load_full_state(model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Copy each rank's shard of ``full_state`` into ``model``'s DTensor parameters.

    Also makes FSDP reduce with a plain sum (gloo has no PREMUL_SUM), so gradients are the
    same reductions a one-rank run computes.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.to_local().copy_(distribute_tensor(full_state[name], p.device_mesh, p.placements).to_local())
    for module in model.modules():
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)
