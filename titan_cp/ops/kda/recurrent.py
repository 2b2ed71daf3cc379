r"""Kimi Delta Attention (KDA) one token at a time: the ground truth.

Per head, state S [K, V]; for every token t (q_t, k_t [K], v_t [V], beta_t, and a
per-key-channel log decay g_t [K] <= 0):

    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t                             (scale K^-1/2 unless given)

(FLA's ``fla/ops/kda``; GDN is the case g_t = g_t 1, a scalar decay). A document start
at t drops the decayed history: S_t = beta_t k_t v_t^T. The signature is the gated delta
rule's (titan_cp/ops/gated_delta_rule/interface.py) with g [B, T, H, K]; the transition
is a K x K matrix per head, so under CP it is a :class:`RecomputingSegmentKernel`
(values [v | 0] from [S_0 | I]) and the engine passes H K (K + V) floats per segment.
Accumulated in float32 (float64 for float64 inputs), autograd backward.
"""

from __future__ import annotations

import torch


def check_kda_inputs(q, k, v, g, beta, initial_state=None, doc_starts=None) -> None:
    B, T, H, K = q.shape
    V = v.shape[-1]
    for name, t, shape in (("k", k, (B, T, H, K)), ("v", v, (B, T, H, V)), ("g", g, (B, T, H, K)),
                           ("beta", beta, (B, T, H)), ("initial_state", initial_state, (B, H, K, V)),
                           ("doc_starts", doc_starts, (B, T))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"kda: {name} has shape {tuple(t.shape)}, expected {shape} from q {tuple(q.shape)}")


def recurrent_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, doc_starts=None):
    check_kda_inputs(q, k, v, g, beta, initial_state, doc_starts)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = K**-0.5 if scale is None else scale
    decay = g.to(acc).exp()  # [B, T, H, K]
    if doc_starts is not None:
        decay = decay * (~doc_starts).to(acc)[:, :, None, None]
    state = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    outputs = []
    for t in range(T):
        k_t = k[:, t].to(acc)
        state = decay[:, t, :, :, None] * state
        delta = beta[:, t].to(acc)[..., None] * (v[:, t].to(acc) - torch.einsum("bhk,bhkv->bhv", k_t, state))
        state = state + k_t[..., None] * delta[..., None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), state))
    o = torch.stack(outputs, dim=1).to(v.dtype)
    return o, (state if output_final_state else None)


__all__ = ["check_kda_inputs", "recurrent_kda"]
