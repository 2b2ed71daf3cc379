r"""A Mamba-2 mixer's forward on whole sequences, with transformers' parameterisation.

transformers' ``Mamba2Mixer`` (modeling_mamba2.py, ``torch_forward``), per token:

    [z | xBC | dt] = in_proj(h)                     z: gate [E], dt: [H], E = H P
    xBC = silu(conv1d(xBC) + bias)                  causal depthwise, width W, over x | B | C
    [x | B | C] = xBC                               x [H, P], B, C [G, N] (G groups, H / G heads each)
    dt = clamp(softplus(dt + dt_bias), time_step_limit),  A = -exp(A_log)
    y = SSD(q = C, k = B, v = x, g = dt A, beta = dt) + D x        (titan_cp.ops.mamba2)
    out = out_proj( RMSNorm(y * silu(z)) * norm.weight )

Document starts (packed rows) reset the conv taps and the state. The SSD kernel is
chosen by name (``torch`` chunked, ``recurrent``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule.mixing import causal_short_conv
from titan_cp.ops.mamba2 import get_kernel


def ssd_inputs(xBC_BTC, dt_BTH, A_log_H, dt_bias_H, *, head_dim: int, state_size: int, n_groups: int,
               time_step_limit=(0.0, float("inf"))):
    """Post-conv x | B | C and raw dt -> the kernel's (q, k, v, g, beta) [B, T, H, *] (float32 gates)."""
    B, T = xBC_BTC.shape[:2]
    H = dt_BTH.shape[-1]
    E, GN = H * head_dim, n_groups * state_size
    x, Bm, Cm = xBC_BTC.split([E, GN, GN], dim=-1)
    rep = H // n_groups
    k = Bm.reshape(B, T, n_groups, state_size).repeat_interleave(rep, dim=2)
    q = Cm.reshape(B, T, n_groups, state_size).repeat_interleave(rep, dim=2)
    dt = F.softplus(dt_BTH.float() + dt_bias_H.float()).clamp(*time_step_limit)
    g = -A_log_H.float().exp() * dt
    return q, k, x.reshape(B, T, H, head_dim), g, dt


def mamba2_mixer(mixer, h_BTD: torch.Tensor, *, kernel: str = "torch", doc_starts_BT=None,
                 initial_state_BHKV=None) -> torch.Tensor:
    """``mixer``: a module with transformers' Mamba2Mixer attributes (in_proj, conv1d, dt_bias, A_log,
    D, norm, out_proj, num_heads, head_dim, ssm_state_size, n_groups, time_step_limit)."""
    H, P = mixer.num_heads, mixer.head_dim
    E, GN = H * P, mixer.n_groups * mixer.ssm_state_size
    z, xBC, dt = mixer.in_proj(h_BTD).split([E, E + 2 * GN, H], dim=-1)
    xBC = causal_short_conv(xBC, mixer.conv1d.weight, doc_starts_BT=doc_starts_BT, bias_C=mixer.conv1d.bias)
    q, k, v, g, beta = ssd_inputs(xBC, dt, mixer.A_log, mixer.dt_bias, head_dim=P, state_size=mixer.ssm_state_size,
                                  n_groups=mixer.n_groups, time_step_limit=tuple(mixer.time_step_limit))
    acc = torch.promote_types(v.dtype, torch.float32)
    y, _ = get_kernel(kernel)(q.to(acc), k.to(acc), v.to(acc), g.to(acc), beta.to(acc), scale=1.0,
                              initial_state=initial_state_BHKV, doc_starts=doc_starts_BT)
    y = y + mixer.D.to(acc)[:, None] * v.to(acc)
    B, T = h_BTD.shape[:2]
    return mixer.out_proj(mixer.norm(y.reshape(B, T, E).to(h_BTD.dtype), z))


__all__ = ["mamba2_mixer", "ssd_inputs"]
