"""Mamba-2's SSD one token at a time: the ground truth for the chunk kernel.

    S_t = a_t S_{t-1} + beta_t k_t v_t^T,  a_t = exp(g_t) (0 at a document start)
    o_t = scale * S_t^T q_t

Accumulated in float32 (float64 for float64 inputs), differentiated by autograd.
O(T) Python steps: tests and tiny shapes only.
"""

from __future__ import annotations

import torch

from titan_cp.ops.mamba2.interface import accumulation_dtype, check_ssd_inputs


def recurrent_ssd(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, doc_starts=None):
    check_ssd_inputs(q, k, v, g, beta, initial_state, doc_starts)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accumulation_dtype(q)
    scale = 1.0 if scale is None else scale
    decay = g.to(acc).exp()  # [B, T, H]
    if doc_starts is not None:
        decay = decay * (~doc_starts).to(acc)[:, :, None]
    state = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        write = (beta[:, t].to(acc)[..., None] * k[:, t].to(acc))[..., None] * v[:, t].to(acc)[..., None, :]
        state = decay[:, t, :, None, None] * state + write
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), state))
    o = torch.stack(outputs, dim=1).to(v.dtype)
    return o, (state if output_final_state else None)


__all__ = ["recurrent_ssd"]
