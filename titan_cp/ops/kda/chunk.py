r"""KDA chunkwise in plain PyTorch (autograd backward): the recurrence (recurrent.py) per chunk of C tokens.

Per head and chunk, with the state S entering it, the in-chunk cumulative log decay
G_t = sum_{j <= t} g_j [K] and E_tj = exp(G_t - G_j) (0 if a document starts in (j, t]):

    delta_t = beta_t (v_t - k_t^T diag(exp G_t) S - sum_{j<t} A_tj delta_j),
        A_tj = sum_d k_td k_jd E_tjd                       (strictly lower, [C, C])
    =>  (I + diag(beta) A) delta = diag(beta) (v - (k * Gamma) S),   Gamma_t = exp(G_t)
        (0 once a document has started in the chunk): one unit-lower-triangular solve
        for u (from v) and w (from k * Gamma), delta = u - w S;
    o_t = scale (q_t * Gamma_t)^T S + scale sum_{j<=t} (sum_d q_td k_jd E_tjd) delta_j
    S <- diag(Gamma_C) S + sum_j (E_Cj * k_j) delta_j^T.

The same WY form as FLA's ``naive_chunk_kda`` (fla/ops/kda/naive.py), with document
resets (masks instead of -inf decays, so no NaN) and T padded to a multiple of C
(padding tokens have k = beta = g = 0: no write, no decay). Accumulated in float32
(float64 for float64 inputs). Memory O(B H T C K): for CPU, tests and small shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titan_cp.ops.kda.recurrent import check_kda_inputs


def _chunks(x: torch.Tensor, pad: int, C: int, acc: torch.dtype) -> torch.Tensor:
    """[B, T, H, *] -> [B, H, N, C, *] in ``acc``, T padded with zeros to N C."""
    x = x.to(acc)
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    B, T, H = x.shape[:3]
    return x.reshape(B, T // C, C, H, *x.shape[3:]).movedim(3, 1)


def chunk_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, doc_starts=None,
              chunk_size: int = 16):
    check_kda_inputs(q, k, v, g, beta, initial_state, doc_starts)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = K**-0.5 if scale is None else scale
    C = chunk_size
    pad = (-T) % C
    q_, k_, v_, g_ = (_chunks(x, pad, C, acc) for x in (q, k, v, g))  # [B, H, N, C, K or V]
    beta_ = _chunks(beta[..., None], pad, C, acc)  # [B, H, N, C, 1]
    N = q_.shape[2]
    if doc_starts is None:
        doc = torch.zeros(B, 1, N, C, dtype=torch.long, device=q.device)
    else:
        doc = F.pad(doc_starts.long(), (0, pad)).reshape(B, 1, N, C).cumsum(-1)  # documents begun in the chunk
    G = g_.cumsum(-2)
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    same = doc[..., :, None] == doc[..., None, :]  # [B, 1, N, C(t), C(j)]
    inclusive = (same & torch.tril(ones))[..., None]
    E = torch.where(inclusive, G[..., :, None, :] - G[..., None, :, :], -torch.inf).exp()  # [B, H, N, C, C, K]
    A_kk = torch.einsum("bhntk,bhnjk,bhntjk->bhntj", k_, k_, E) * torch.tril(ones, diagonal=-1)
    A_qk = torch.einsum("bhntk,bhnjk,bhntjk->bhntj", q_, k_, E)
    Gamma = G.exp() * (doc == 0)[..., None]  # decay from the chunk start, [B, H, N, C, K]
    E_end = torch.where(same[..., -1, :, None], G[..., -1:, :] - G, -torch.inf).exp()  # token j -> chunk end
    L = torch.eye(C, dtype=acc, device=q.device) + beta_ * A_kk
    u = torch.linalg.solve_triangular(L, beta_ * v_, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(L, beta_ * k_ * Gamma, upper=False, unitriangular=True)
    qG, kE = q_ * Gamma, (k_ * E_end).transpose(-1, -2)  # kE [B, H, N, K, C]
    S = q_.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outputs = []
    for n in range(N):
        delta = u[:, :, n] - w[:, :, n] @ S  # [B, H, C, V]
        outputs.append(scale * (qG[:, :, n] @ S + A_qk[:, :, n] @ delta))
        S = Gamma[:, :, n, -1, :, None] * S + kE[:, :, n] @ delta
    o = torch.stack(outputs, dim=2).reshape(B, H, N * C, V).transpose(1, 2)[:, :T]
    return o.to(v.dtype), (S if output_final_state else None)


__all__ = ["chunk_kda"]
