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
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle
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


def _tp_enter(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Replicated over TP in, the TP region's partial gradients summed on the way back (Megatron's f)."""
    return DTensor.from_local(t, mesh, (Replicate(),), run_check=False).to_local(grad_placements=(Partial(),))


class RoutedExpertsTP(ParallelStyle):
    """TorchTitan's expert TP for ``RoutedExperts`` (no EP): every expert's hidden dim F sharded over TP.

    ``w1_EFD`` / ``w3_EFD`` Shard(1), ``w2_EDF`` Shard(2) (TorchTitan's
    ``_GROUPED_EXPERTS_PARAM_LAYOUT``); each TP rank runs all experts on all
    (replicated) tokens with its F / tp columns, so its output is a partial sum
    over TP, reduced into ``output_layout`` (Replicate, or Shard(1) under SP: a
    reduce-scatter). The tokens and their top-k scores enter with partial
    gradients that backward sums over TP: TorchTitan's ``local_map`` with
    ``in_grad_placements = Partial`` (``models/common/moe_sharding.py``).
    """

    def __init__(self, *, output_layout):
        super().__init__()
        self.output_layout = output_layout

    def _prepare_input(self, module, inputs, mesh):
        x_BLD, topk_scores_BLK, topk_expert_ids_BLK, num_local_tokens_per_expert_E = inputs
        return (_tp_enter(x_BLD, mesh), _tp_enter(topk_scores_BLK, mesh), topk_expert_ids_BLK,
                num_local_tokens_per_expert_E)

    def _prepare_output(self, module, out_BLD, mesh):
        partial_BLD = DTensor.from_local(out_BLD, mesh, (Partial(),), run_check=False)
        return partial_BLD.redistribute(placements=(self.output_layout,)).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        experts = module.inner_experts
        for name, placement in (("w1_EFD", Shard(1)), ("w2_EDF", Shard(2)), ("w3_EFD", Shard(1))):
            shard_param(experts, name, device_mesh, placement)
        return distribute_module(module, device_mesh, input_fn=self._prepare_input,
                                 output_fn=self._prepare_output)


def _replicated_linear(linear: nn.Module, tp_mesh: DeviceMesh, output_layout) -> None:
    """A small Linear every TP rank runs whole (router / shared-expert gate) on its replicated tokens."""
    for name in ("weight", "bias"):
        if getattr(linear, name, None) is not None:
            shard_param(linear, name, tp_mesh, Replicate())
    parallelize_module(linear, tp_mesh, PrepareModuleInputOutput(
        input_layouts=Replicate(), desired_input_layouts=Replicate(), output_layouts=Replicate(),
        desired_output_layouts=output_layout, use_local_output=True))


def apply_expert_tp(moe: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """TP of one MoE block (TorchTitan's plan without EP), on the replicated CP-local tokens [B, T, D].

    Under SP the block's input [B, T/tp, D] is all-gathered first. The router
    (gate weight Replicate) runs on every TP rank on the same tokens, so top-k
    choices and ``tokens_per_expert_E`` are the same on each TP rank (TorchTitan's
    load-balancing hook sums them over dp x cp only). Routed experts:
    :class:`RoutedExpertsTP`. Shared expert: w1 / w3 colwise, w2 rowwise, its
    sigmoid gate replicated; both outputs land in the residual stream's layout
    (Replicate, or Shard(1) under SP) and are added there.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    if sequence_parallel:
        parallelize_module(moe, tp_mesh, PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    _replicated_linear(moe.router.gate, tp_mesh, Replicate())
    parallelize_module(moe.routed_experts, tp_mesh, RoutedExpertsTP(output_layout=seq))
    shared = moe.shared_experts
    if shared is not None:
        parallelize_module(shared, tp_mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(),
                                             "w2": RowwiseParallel(output_layouts=seq)})
        if getattr(shared, "gate", None) is not None:
            _replicated_linear(shared.gate, tp_mesh, seq)
