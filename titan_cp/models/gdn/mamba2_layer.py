r"""The Mamba-2 mixer ('M' in the GDN LM's ``layer_pattern``), transformers' parameterisation and names.

transformers' ``Mamba2Mixer`` (modeling_mamba2.py), H heads of P channels, E = H P,
B and C in G groups of state size N (H / G heads share a group):

    in_proj  [D -> E | E + 2 G N | H]  = z (gate) | xBC (conv input) | dt
    conv1d   depthwise causal, width W, with bias, over x | B | C, then SiLU
    dt_bias, A_log, D  [H]             dt = softplus(dt + dt_bias), A = -exp(A_log)
    SSD      S_t = exp(dt_t A) S_{t-1} + dt_t B_t x_t^T,  y_t = S_t^T C_t + D x_t   (state [N, P] per head)
    norm     transformers' MambaRMSNormGated: RMSNorm(y * silu(z)) * weight, the gate applied BEFORE
             the norm, over the full width E (its pure-PyTorch path; one group)
    out_proj [E -> D]

The forward is :func:`titan_cp.ops.mamba2.mixing.mamba2_mixer` on one rank and
:func:`titan_cp.cp.kernel_cp.mamba2_mixer_over_shards` under CP (the conv through the W-1 token
halo, the SSD through every exchange and layout: its transition is a scalar per head). Document
starts reset the conv taps and the state.

Tensor parallelism (titan_cp.models.gdn.parallelize.apply_tp; degree t, TP rank r) is head-parallel:
rank r computes heads [r H/t, (r+1) H/t) and the B / C groups they read (G/t groups when t divides G,
the one group of its heads when G divides t, else the groups its heads straddle):

    in_proj.weight, conv1d.weight / bias   Replicate: the rank's rows of z | x | B | C | dt are not one
                                           contiguous block, so each rank reads its rows
                                           (:meth:`Mamba2Mixer.local_weights`); their gradient is summed
                                           over TP (``local_tensor(grad_is_partial=True)``)
    dt_bias, A_log, D, norm.weight         Shard(0) (head-major: rank r's E/t channels are its heads)
    out_proj                               rowwise (input: the rank's E/t channels; all-reduce of the output)

The gated norm spans the full width E: under TP the mean of squares of the rank's E/t channels is
averaged over the TP ranks (a differentiable all-gather of one number per token and rank), so the
output equals one rank's.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed._functional_collectives import all_gather_single_autograd
from torch.distributed.tensor import DTensor, Partial, Replicate

from titan_cp.cp import CPContext
from titan_cp.cp.kernel_cp import mamba2_mixer_over_shards
from titan_cp.models.common.dtensor import local_tensor
from titan_cp.models.common.sequence import SequenceInfo
from titan_cp.models.gdn.layers import RMSNorm
from titan_cp.ops.mamba2 import KERNEL_NAMES
from titan_cp.ops.mamba2.mixing import Mamba2Weights, mamba2_mixer


class Mamba2GatedRMSNorm(RMSNorm):
    """transformers' ``MambaRMSNormGated``: ``weight * RMSNorm(y * silu(gate))`` (the gate before the norm,
    over the last dim), computed in float32 (float64 inputs stay float64).

    Under TP (``weight`` Shard(0) over the TP mesh) ``y`` and ``gate`` are this rank's E/t channels: the mean
    of squares over the full width E is the mean of the t ranks' means (a differentiable all-gather of one
    number per token).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps)

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        acc = torch.promote_types(y.dtype, torch.float32)
        x = y.to(acc) * nn.functional.silu(gate.to(acc))
        mean_square = x.pow(2).mean(-1, keepdim=True)
        if isinstance(self.weight, DTensor):  # TP: the mean of the ranks' means (backward: the sum of their grads)
            mesh = self.weight.device_mesh
            ranks = all_gather_single_autograd(mean_square, gather_dim=0, group=mesh)  # [t B, T, 1]
            mean_square = ranks.view(mesh.size(), *mean_square.shape).mean(0)
        return local_tensor(self.weight) * (x * torch.rsqrt(mean_square + self.eps)).to(y.dtype)


class Mamba2Conv(nn.Module):
    """Depthwise causal conv weights with a bias (``weight`` [C, 1, W], ``bias`` [C]: nn.Conv1d's names);
    the convolution itself (halo, document resets) is run by the mixer."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # transformers' init
        nn.init.zeros_(self.bias)


class Mamba2Mixer(nn.Module):
    """transformers' Mamba2Mixer (same parameter names and shapes) with CP and TP; see the module docstring."""

    mixes_sequence = True

    def __init__(self, *, dim: int, num_heads: int, head_dim: int, state_size: int, n_groups: int,
                 conv_size: int, norm_eps: float, kernel: str):
        super().__init__()
        if kernel not in KERNEL_NAMES:
            raise ValueError(f"model.kernel = '{kernel}' has no Mamba-2 ('M' layer) kernel: use one of "
                             f"{list(KERNEL_NAMES)}.")
        if n_groups < 1 or num_heads % n_groups:
            raise ValueError(f"model.ssm_n_groups = {n_groups} must divide model.num_heads = {num_heads} "
                             "(heads share B and C per group).")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.ssm_state_size, self.n_groups = state_size, n_groups
        self.time_step_limit = (0.0, float("inf"))
        self.kernel = kernel
        E = num_heads * head_dim
        conv_dim = E + 2 * n_groups * state_size
        self.in_proj = nn.Linear(dim, E + conv_dim + num_heads, bias=False)
        self.conv1d = Mamba2Conv(conv_dim, conv_size)
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # type: ignore[attr-defined]
        self.norm = Mamba2GatedRMSNorm(E, eps=norm_eps)
        self.out_proj = nn.Linear(E, dim, bias=False)
        self.cp: CPContext | None = None
        self.layer_name = ""

    def init_weights(self, init_std: float) -> None:
        """transformers' Mamba-2 init (A = 1..H, D = 1, dt_bias = inverse softplus of log-uniform
        [1e-3, 0.1] floored at 1e-4, conv kaiming + zero bias); TorchTitan's truncated normals for linears."""
        nn.init.trunc_normal_(self.in_proj.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.out_proj.weight, mean=0.0, std=init_std)
        self.conv1d.reset_parameters()
        self.norm.reset_parameters()
        with torch.no_grad():
            self.A_log.copy_(torch.arange(1, self.num_heads + 1, dtype=torch.float32).log())
            self.D.fill_(1.0)
            dt = self.dt_bias.uniform_(0, 1)
            dt.mul_(math.log(0.1) - math.log(1e-3)).add_(math.log(1e-3)).exp_().clamp_(min=1e-4)
            dt.add_(torch.log(-torch.expm1(-dt)))

    def local_weights(self) -> Mamba2Weights:
        """The heads this rank computes (all of them on one rank; rank r's H/t under TP: A_log's Shard(0)
        shard) and their weights as plain tensors: the mixer's forward reads these, with and without CP."""
        A_log = local_tensor(self.A_log)
        rank = self.A_log.device_mesh.get_local_rank() if isinstance(self.A_log, DTensor) else 0
        heads = range(rank * A_log.shape[0], (rank + 1) * A_log.shape[0])
        return Mamba2Weights.of_heads(
            self, heads, in_proj_weight=local_tensor(self.in_proj.weight, grad_is_partial=True), in_proj_bias=None,
            conv_weight=local_tensor(self.conv1d.weight, grad_is_partial=True),
            conv_bias=local_tensor(self.conv1d.bias, grad_is_partial=True),
            dt_bias=local_tensor(self.dt_bias), A_log=A_log, D=local_tensor(self.D))

    def forward(self, x_BTD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        if isinstance(self.A_log, DTensor):  # TP: every rank's in_proj rows read all of x: sum x's gradient
            mesh = self.A_log.device_mesh
            x_BTD = DTensor.from_local(x_BTD, mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        if self.cp is None or self.cp.size == 1:
            return mamba2_mixer(self, x_BTD, kernel=self.kernel, doc_starts_BT=seq.doc_starts)
        return mamba2_mixer_over_shards(self, x_BTD, cp=self.cp, kernel=self.kernel, name=self.layer_name,
                                        doc_starts_BT=seq.doc_starts)


__all__ = ["Mamba2Conv", "Mamba2GatedRMSNorm", "Mamba2Mixer"]
