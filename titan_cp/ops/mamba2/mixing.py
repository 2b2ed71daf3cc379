r"""A Mamba-2 mixer's forward on whole sequences, with transformers' parameterisation.

transformers' ``Mamba2Mixer`` (modeling_mamba2.py, ``torch_forward``), per token:

    [z | xBC | dt] = in_proj(h)                     z: gate [E], dt: [H], E = H P
    xBC = silu(conv1d(xBC) + bias)                  causal depthwise, width W, over x | B | C
    [x | B | C] = xBC                               x [H, P], B, C [G, N] (G groups, H / G heads each)
    dt = clamp(softplus(dt + dt_bias), time_step_limit),  A = -exp(A_log)
    y = SSD(q = C, k = B, v = x, g = dt A, beta = dt) + D x        (titan_cp.ops.mamba2)
    out = out_proj( RMSNorm(y * silu(z)) * norm.weight )

Heads never interact except through the norm (which spans the full width E), so a rank may
compute any range of heads [h0, h1) (tensor parallelism: H/t of them, titan_cp's
Mamba2Mixer.local_weights): :class:`Mamba2Weights` is that range's part of the mixer. in_proj
packs its rows as

    z [E] | x [E] | B [G N] | C [G N] | dt [H]      (conv1d's channels: x | B | C)

so the range reads rows z[h0 P : h1 P], x[h0 P : h1 P], dt[h0 : h1] and the B / C rows of the
groups its heads read, [h0 // (H/G), (h1 - 1) // (H/G) + 1) (head h reads group h // (H/G)).

Document starts (packed rows) reset the conv taps and the state. The only sequence
mixing is the conv and the SSD: ``conv`` and ``ssd`` are arguments (whole sequences by
default; CP passes its halo conv and its kernel over shards,
titan_cp.cp.kernel_cp.mamba2_mixer_over_shards); the rest is token-local.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule.mixing import causal_short_conv
from titan_cp.ops.mamba2 import get_kernel


def _rows(w: torch.Tensor | None, spans: list[tuple[int, int]]) -> torch.Tensor | None:
    """Rows ``[start, start + length)`` of each span of ``w``, concatenated (``w`` itself when they are all of it)."""
    if w is None or sum(n for _, n in spans) == w.shape[0]:  # increasing disjoint spans: all rows, in order
        return w
    return torch.cat([w.narrow(0, start, n) for start, n in spans])


@dataclass(frozen=True)
class Mamba2Weights:
    """Heads [h0, h0 + num_heads) of a Mamba-2 mixer and the ``n_groups`` B / C groups they read (module docstring).

    ``in_proj_weight`` [2 E' + 2 G' N + H', D] (E' = num_heads x head_dim, G' = n_groups: rows z | x | B | C | dt),
    ``conv_weight`` [E' + 2 G' N, 1, W] / ``conv_bias``, ``dt_bias`` / ``A_log`` / ``D`` [H'],
    ``group_of_head`` [H'] (each head's group among the G'), ``norm(y, z)`` the gated norm over the mixer's
    full width, ``out_proj`` the output projection of the E' channels.
    """

    in_proj_weight: torch.Tensor
    in_proj_bias: torch.Tensor | None
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor
    group_of_head: torch.Tensor
    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    time_step_limit: tuple[float, float]
    norm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    out_proj: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of_heads(cls, mixer, heads: range, *, in_proj_weight, in_proj_bias, conv_weight, conv_bias, dt_bias, A_log,
                 D) -> "Mamba2Weights":
        """The part of ``mixer`` (its sizes, norm and out_proj) that computes ``heads``: ``in_proj_*`` and
        ``conv_*`` are the mixer's whole tensors (their rows are selected here), ``dt_bias`` / ``A_log`` / ``D``
        already the ``heads``' entries."""
        H, P, N, G = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
        per_group = H // G
        groups = range(heads.start // per_group, (heads.stop - 1) // per_group + 1)
        E, GN = H * P, G * N
        h, g = len(heads), len(groups)
        conv_spans = [(heads.start * P, h * P), (E + groups.start * N, g * N), (E + GN + groups.start * N, g * N)]
        in_spans = [(heads.start * P, h * P), *((E + s, n) for s, n in conv_spans), (2 * E + 2 * GN + heads.start, h)]
        group_of_head = torch.arange(heads.start, heads.stop, device=A_log.device) // per_group - groups.start
        return cls(in_proj_weight=_rows(in_proj_weight, in_spans), in_proj_bias=_rows(in_proj_bias, in_spans),
                   conv_weight=_rows(conv_weight, conv_spans), conv_bias=_rows(conv_bias, conv_spans),
                   dt_bias=dt_bias, A_log=A_log, D=D, group_of_head=group_of_head, num_heads=h, head_dim=P,
                   state_size=N, n_groups=g, time_step_limit=tuple(mixer.time_step_limit), norm=mixer.norm,
                   out_proj=mixer.out_proj)

    @classmethod
    def of(cls, mixer) -> "Mamba2Weights":
        """Every head of a mixer with transformers' Mamba2Mixer attributes (``in_proj``, ``conv1d``, ``dt_bias``,
        ``A_log``, ``D``, ``norm``, ``out_proj``, ``num_heads``, ``head_dim``, ``ssm_state_size``, ``n_groups``,
        ``time_step_limit``) as plain tensors; a mixer that defines ``local_weights()`` (titan_cp's, whose
        tensor-parallel rank computes some heads) gives its own."""
        if hasattr(mixer, "local_weights"):
            return mixer.local_weights()
        return cls.of_heads(mixer, range(mixer.num_heads), in_proj_weight=mixer.in_proj.weight,
                            in_proj_bias=mixer.in_proj.bias, conv_weight=mixer.conv1d.weight,
                            conv_bias=mixer.conv1d.bias, dt_bias=mixer.dt_bias, A_log=mixer.A_log, D=mixer.D)


def ssd_inputs(xBC_BTC, dt_BTH, A_log_H, dt_bias_H, group_of_head_H, *, head_dim: int, state_size: int,
               n_groups: int, time_step_limit=(0.0, float("inf"))):
    """Post-conv x | B | C and raw dt -> the kernel's (q, k, v, g, beta) [B, T, H, *] (gates in at least float32);
    head j reads B / C group ``group_of_head_H[j]``."""
    B, T = xBC_BTC.shape[:2]
    H = dt_BTH.shape[-1]
    E, GN = H * head_dim, n_groups * state_size
    x, Bm, Cm = xBC_BTC.split([E, GN, GN], dim=-1)
    k = Bm.reshape(B, T, n_groups, state_size).index_select(2, group_of_head_H)
    q = Cm.reshape(B, T, n_groups, state_size).index_select(2, group_of_head_H)
    acc = torch.promote_types(dt_BTH.dtype, torch.float32)
    dt = F.softplus(dt_BTH.to(acc) + dt_bias_H.to(acc)).clamp(*time_step_limit)
    g = -A_log_H.to(acc).exp() * dt
    return q, k, x.reshape(B, T, H, head_dim), g, dt


def mamba2_mixer(mixer, h_BTD: torch.Tensor, *, kernel: str = "torch", doc_starts_BT=None,
                 initial_state_BHKV=None, conv=None, ssd=None) -> torch.Tensor:
    """``mixer``: a module with transformers' Mamba2Mixer attributes (:meth:`Mamba2Weights.of`; under TP
    this rank's heads). ``conv(x, weight, bias, doc_starts)`` and ``ssd(q, k, v, g, beta, initial_state=,
    doc_starts=)`` default to the whole-sequence ones."""
    if conv is None:
        def conv(x, weight, bias, starts):
            return causal_short_conv(x, weight, doc_starts_BT=starts, bias_C=bias)
    if ssd is None:
        def ssd(*args, **kw):
            return get_kernel(kernel)(*args, scale=1.0, **kw)[0]
    w = Mamba2Weights.of(mixer)
    H, P = w.num_heads, w.head_dim
    E, GN = H * P, w.n_groups * w.state_size
    z, xBC, dt = F.linear(h_BTD, w.in_proj_weight, w.in_proj_bias).split([E, E + 2 * GN, H], dim=-1)
    xBC = conv(xBC, w.conv_weight, w.conv_bias, doc_starts_BT)
    q, k, v, g, beta = ssd_inputs(xBC, dt, w.A_log, w.dt_bias, w.group_of_head, head_dim=P, state_size=w.state_size,
                                  n_groups=w.n_groups, time_step_limit=w.time_step_limit)
    acc = torch.promote_types(v.dtype, torch.float32)
    y = ssd(q.to(acc), k.to(acc), v.to(acc), g.to(acc), beta.to(acc), initial_state=initial_state_BHKV,
            doc_starts=doc_starts_BT)
    y = y + w.D.to(acc)[:, None] * v.to(acc)
    B, T = h_BTD.shape[:2]
    return w.out_proj(w.norm(y.reshape(B, T, E).to(h_BTD.dtype), z))


__all__ = ["Mamba2Weights", "mamba2_mixer", "ssd_inputs"]
