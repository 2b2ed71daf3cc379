r"""Mamba-2's SSD in chunks (the "state-space dual" form), plain PyTorch, autograd backward.

Cut the sequence into chunks of C tokens. With c_t the cumulative log decay inside
the chunk and doc(t) the document id of token t, token i of a chunk reads

    o_i = scale * ( sum_{j <= i, doc j = doc i} e^{c_i - c_j} beta_j (q_i . k_j) v_j
                    + [doc i = doc of the chunk's incoming state] e^{c_i} S_in^T q_i )
    S_out = [doc last = doc in] e^{c_last} S_in
            + sum_{j, doc j = doc last} e^{c_last - c_j} beta_j k_j v_j^T

(the intra-chunk part is a masked, decay-weighted attention matrix; the inter-chunk
part one [K, V] state per chunk, carried sequentially). The masks put -inf before the
exponential, so no decay difference ever overflows. Padding to a multiple of C uses
tokens with g = 0, beta = 0: they change nothing. Gradients (inputs and initial state)
come from autograd; checked against :mod:`titan_cp.ops.mamba2.recurrent`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from titan_cp.ops.mamba2.interface import accumulation_dtype, check_ssd_inputs

CHUNK = 64


def chunk_ssd(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, doc_starts=None,
              chunk_size: int = CHUNK):
    check_ssd_inputs(q, k, v, g, beta, initial_state, doc_starts)
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = accumulation_dtype(q)
    scale = 1.0 if scale is None else scale
    C = min(chunk_size, T)
    pad = (-T) % C
    starts = torch.zeros(B, T, dtype=torch.bool, device=q.device) if doc_starts is None else doc_starts
    q_, k_, v_ = (F.pad(x.to(acc), (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g_, beta_ = (F.pad(x.to(acc), (0, 0, 0, pad)) for x in (g, beta))
    doc = F.pad(starts, (0, pad)).long().cumsum(1)  # [B, T'], document id, 0 = the incoming state's
    n = (T + pad) // C
    q_, k_, v_ = (x.reshape(B, n, C, H, x.shape[-1]) for x in (q_, k_, v_))
    g_, beta_, doc = (x.reshape(B, n, C, *x.shape[2:]) for x in (g_, beta_, doc))
    c = g_.cumsum(2)  # [B, n, C, H]
    doc_in = torch.cat([doc.new_zeros(B, 1), doc[:, :-1, -1]], dim=1)  # doc id entering each chunk [B, n]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    same_ij = (doc[:, :, :, None] == doc[:, :, None, :]) & causal  # [B, n, C, C]
    diff = c[:, :, :, None, :] - c[:, :, None, :, :]  # [B, n, i, j, H]
    L = torch.where(same_ij[..., None], diff, -torch.inf).exp()
    scores = torch.einsum("bnihk,bnjhk->bnijh", q_, k_) * L * beta_[:, :, None]
    o_intra = torch.einsum("bnijh,bnjhv->bnihv", scores, v_)
    from_in = (doc == doc_in[:, :, None])  # [B, n, C]
    decay_in = torch.where(from_in[..., None], c, -torch.inf).exp()  # e^{c_i} or 0, [B, n, C, H]
    last_same = doc == doc[:, :, -1:]  # tokens in the chunk's last document
    to_end = torch.where(last_same[..., None], c[:, :, -1:] - c, -torch.inf).exp() * beta_  # [B, n, C, H]
    carry = torch.where(from_in[:, :, -1, None], c[:, :, -1], -torch.inf).exp()  # [B, n, H]
    chunk_states = torch.einsum("bnjh,bnjhk,bnjhv->bnhkv", to_end, k_, v_)
    state = q_.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    o_inter = []
    for i in range(n):
        o_inter.append(torch.einsum("bih,bihk,bhkv->bihv", decay_in[:, i], q_[:, i], state))
        state = carry[:, i, :, None, None] * state + chunk_states[:, i]
    o = scale * (o_intra + torch.stack(o_inter, dim=1))
    o = o.reshape(B, n * C, H, V)[:, :T].to(v.dtype)
    return o, (state if output_final_state else None)


__all__ = ["CHUNK", "chunk_ssd"]
