r"""A Mamba-2 mixer's forward on whole sequences, with transformers' parameterisation.

transformers' ``Mamba2Mixer`` (modeling_mamba2.py, ``torch_forward``), per token:

    [z | xBC | dt] = in_proj(h)                     z: gate [E], dt: [H], E = H P
    xBC = silu(conv1d(xBC) + bias)                  causal depthwise, width W, over x | B | C
    [x | B | C] = xBC                               x [H, P], B, C [G, N] (G groups, H / G heads each)
    dt = clamp(softplus(dt + dt_bias), time_step_limit),  A = -exp(A_log)
    y = SSD(q = C, k = B, v = x, g = dt A, beta = dt) + D x        (titan_cp.ops.mamba2)
    out = out_proj( RMSNorm(y * silu(z)) * norm.weight )

Document starts (packed rows) reset the conv taps and the state. The only sequence
mixing is the conv and the SSD: ``conv`` and ``ssd`` are arguments (whole sequences by
default; CP passes its halo conv and its kernel over shards,
titan_cp.cp.kernel_cp.mamba2_mixer_over_shards); the rest is token-local.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule.mixing import causal_short_conv
from titan_cp.ops.mamba2 import get_kernel


def ssd_inputs(xBC_BTC, dt_BTH, A_log_H, dt_bias_H, *, head_dim: int, state_size: int, n_groups: int,
               time_step_limit=(0.0, float("inf"))):
    """Post-conv x | B | C and raw dt -> the kernel's (q, k, v, g, beta) [B, T, H, *] (gates in at least float32)."""
    B, T = xBC_BTC.shape[:2]
    H = dt_BTH.shape[-1]
    E, GN = H * head_dim, n_groups * state_size
    x, Bm, Cm = xBC_BTC.split([E, GN, GN], dim=-1)
    rep = H // n_groups
    k = Bm.reshape(B, T, n_groups, state_size).repeat_interleave(rep, dim=2)
    q = Cm.reshape(B, T, n_groups, state_size).repeat_interleave(rep, dim=2)
    acc = torch.promote_types(dt_BTH.dtype, torch.float32)
    dt = F.softplus(dt_BTH.to(acc) + dt_bias_H.to(acc)).clamp(*time_step_limit)
    g = -A_log_H.to(acc).exp() * dt
    return q, k, x.reshape(B, T, H, head_dim), g, dt


def mamba2_mixer(mixer, h_BTD: torch.Tensor, *, kernel: str = "torch", doc_starts_BT=None,
                 initial_state_BHKV=None, conv=None, ssd=None) -> torch.Tensor:
    """``mixer``: a module with transformers' Mamba2Mixer attributes (in_proj, conv1d, dt_bias, A_log,
    D, norm, out_proj, num_heads, head_dim, ssm_state_size, n_groups, time_step_limit).
    ``conv(x, weight, bias, doc_starts)`` and ``ssd(q, k, v, g, beta, initial_state=, doc_starts=)``
    default to the whole-sequence ones."""
    if conv is None:
        def conv(x, weight, bias, starts):
            return causal_short_conv(x, weight, doc_starts_BT=starts, bias_C=bias)
    if ssd is None:
        def ssd(*args, **kw):
            return get_kernel(kernel)(*args, scale=1.0, **kw)[0]
    H, P = mixer.num_heads, mixer.head_dim
    E, GN = H * P, mixer.n_groups * mixer.ssm_state_size
    z, xBC, dt = mixer.in_proj(h_BTD).split([E, E + 2 * GN, H], dim=-1)
    xBC = conv(xBC, mixer.conv1d.weight, mixer.conv1d.bias, doc_starts_BT)
    q, k, v, g, beta = ssd_inputs(xBC, dt, mixer.A_log, mixer.dt_bias, head_dim=P, state_size=mixer.ssm_state_size,
                                  n_groups=mixer.n_groups, time_step_limit=tuple(mixer.time_step_limit))
    acc = torch.promote_types(v.dtype, torch.float32)
    y = ssd(q.to(acc), k.to(acc), v.to(acc), g.to(acc), beta.to(acc), initial_state=initial_state_BHKV,
            doc_starts=doc_starts_BT)
    y = y + mixer.D.to(acc)[:, None] * v.to(acc)
    B, T = h_BTD.shape[:2]
    return mixer.out_proj(mixer.norm(y.reshape(B, T, E).to(h_BTD.dtype), z))


__all__ = ["mamba2_mixer", "ssd_inputs"]
