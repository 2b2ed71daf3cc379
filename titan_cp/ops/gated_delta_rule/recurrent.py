"""The gated delta rule one token at a time: the ground truth for every other kernel.

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   a_t = exp(g_t)
    o_t = scale * S_t^T q_t

(a_t and the projection are dropped at document starts). Written as the
delta-rule update S <- a S + k (beta (v - a k^T S))^T, accumulated in float32,
differentiated by autograd. O(T) Python steps: for tests and tiny shapes only.
"""

from __future__ import annotations

import torch

from titan_cp.ops.gated_delta_rule.interface import check_inputs


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    doc_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_inputs(q, k, v, g, beta, initial_state, doc_starts)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = K**-0.5 if scale is None else scale
    q_, k_, v_ = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    decay = g.to(acc).exp().transpose(1, 2)  # [B, H, T]
    beta_ = beta.to(acc).transpose(1, 2)
    if doc_starts is not None:
        keep = (~doc_starts).to(acc)[:, None, :]  # [B, 1, T]
        decay = decay * keep
    state = q_.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        k_t = k_[:, :, t]  # [B, H, K]
        state = decay[:, :, t, None, None] * state
        prediction = torch.einsum("bhk,bhkv->bhv", k_t, state)
        delta = beta_[:, :, t, None] * (v_[:, :, t] - prediction)
        state = state + k_t[..., None] * delta[..., None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q_[:, :, t], state))
    o = torch.stack(outputs, dim=1).to(v.dtype)  # [B, T, H, V]
    return o, (state if output_final_state else None)
