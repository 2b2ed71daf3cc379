"""Qwen3.5 MoE under titan_cp: an exact routed-expert path and TorchTitan's expert parallel beside CP.

Routed experts (TorchTitan's ``GroupedExperts``), for the R tokens routed to
this rank's experts, sorted by expert (``num_tokens_per_expert_E`` rows each)::

    y_r = w2_e (silu(w1_e x_r) * (w3_e x_r))      e = the expert of row r

``model.expert_compute`` picks how:

- ``"grouped_mm_bf16"`` (default, TorchTitan's): x and the weights cast to
  bfloat16 for ``torch._grouped_mm``; the output cast back. Gradients summed
  over a different grouping of tokens (CP shards, EP ranks) then differ at
  bf16 rounding: measured up to ~5e-3 relative vs one rank
  (tests/integration/test_qwen3_5_moe_ep.py, docs/qwen3_5.md).
- ``"exact"``: :class:`CPGroupedExperts` with ``exact``, one matmul per expert in the
  input's dtype (float32 / float64), so every layout equals one rank to the
  dtype's rounding. For tests and for checking a layout; slower on GPUs.

Expert parallel (:func:`apply_ep`) is TorchTitan's: the routed-expert weights
``[E, ...]`` are sharded ``Shard(0)`` over the ``ep`` mesh dim ParallelDims
builds (it borrows ranks from dp_shard x cp x tp: under CP 2 x EP 2 the two
CP ranks hold 4 experts each), and the model's own ``AllToAllTokenDispatcher``
is wired to that mesh: each rank routes its own tokens (its CP shard), sends
them to the experts' owners and gets their outputs back, so per token the
arithmetic is the one-rank arithmetic. The load-balancing counts
``tokens_per_expert_E`` stay per rank and TorchTitan's optimizer hook
(``register_moe_load_balancing_hook``) sums them over the ``loss`` mesh
(dp x cp) before the expert-bias update, so the bias moves as on one rank.
FSDP shards the experts over ``efsdp`` (= dp_shard x cp x tp / ep).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torchtitan.models.common.moe import GroupedExperts

from titan_cp.models.common.dtensor import local_tensor
from titan_cp.models.common.parallelize import shard_param

EXPERT_COMPUTE = ("grouped_mm_bf16", "exact")


class CPGroupedExperts(GroupedExperts):
    """TorchTitan's GroupedExperts (same parameters, init, names); ``exact``: expert by expert in the input's dtype.

    ``exact`` is set by the model from ``model.expert_compute`` (so a TOML
    ``[model] expert_compute = "exact"`` takes effect); off, it is TorchTitan's forward.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    exact = False

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if not self.exact:
            return super().forward(x_RD, num_tokens_per_expert_E)
        w1_EFD, w2_EDF, w3_EFD = (local_tensor(w) for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
        outputs = []
        for x_rD, w1_FD, w2_DF, w3_FD in zip(torch.split(x_RD, num_tokens_per_expert_E.tolist()),
                                             w1_EFD, w2_EDF, w3_EFD):
            outputs.append((F.silu(x_rD @ w1_FD.T) * (x_rD @ w3_FD.T)) @ w2_DF.T)
        return torch.cat(outputs)


def moe_layers(model: nn.Module):
    """(block, moe) of every MoE block of a (stage of a) Qwen3.5 decoder."""
    return [(block, block.moe) for block in model.layers.values() if getattr(block, "moe_enabled", False)]


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every routed expert's weights over ``ep_mesh`` (dim 0 = experts) and wire the token all-to-all."""
    for _, moe in moe_layers(model):
        experts = moe.routed_experts.inner_experts
        if experts.num_experts % ep_mesh.size():
            raise ValueError(f"expert_parallel_degree = {ep_mesh.size()} must divide num_experts = "
                             f"{experts.num_experts}")
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            shard_param(experts, name, ep_mesh, Shard(0))
        moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=ep_mesh)
