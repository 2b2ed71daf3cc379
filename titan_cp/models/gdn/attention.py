"""Softmax attention layer for hybrid GDN models (the 'A' letters of ``model.layer_pattern``).

Math (per token t of a sequence, GQA with Hq query heads and Hkv kv heads, G = Hq / Hkv)
------------------------------------------------------------------------------------------
    q_t = RoPE(x_t W_q, p_t)   [Hq, D]      k_t = RoPE(x_t W_k, p_t)   [Hkv, D]
    v_t = x_t W_v              [Hkv, D]
    o_t[h] = sum_{s allowed(t)} softmax_s(q_t[h] . k_s[h // G] / sqrt(D)) v_s[h // G]
    y_t = concat_h(o_t[h]) W_o

``allowed(t)``: keys s <= t (causal), restricted to t's document when the
batch is packed (``seq.doc_ids`` given: same document id).

RoPE is the rotate-half (GPT-NeoX / HF Llama / Qwen3) convention: the head
dimension is split into halves x = [x1, x2] (D/2 each) and pair i = (x1[i], x2[i])
is rotated by the angle p * theta^(-2i/D):

    RoPE(x, p) = [x1 cos - x2 sin,  x2 cos + x1 sin]

``p`` is ``seq.positions``: the position of the token inside its document for
packed data (restarting at 0 at each document start), otherwise its global
position in the sequence (``GDNModel.sequence_info`` fills both in, also under
CP where this rank's tokens are not contiguous). Angles are computed in
float64 from the integer positions (exact for long contexts), q/k rotated in
float32 and cast back to the activation dtype.

Layout and parallelism
----------------------
Parameters use TorchTitan's names ``wq``, ``wk``, ``wv``, ``wo`` (no bias), so
the classic TP plan applies unchanged: colwise ``wq/wk/wv`` (they shard the
heads), rowwise ``wo``. Head counts are read from tensor shapes in
``forward`` (only ``head_dim`` is fixed), so the layer runs on whatever heads
TP leaves it; TP must divide both ``n_heads`` and ``n_kv_heads``.

Sequence mixing is :func:`titan_cp.cp.ring_attention.ring_attention` in every
case: with ``self.cp`` None (or a group of size 1) it is plain causal
(document-masked) attention; under CP, ``x`` is this rank's shard in layout
``cp.layout`` (contiguous or zigzag) and K/V travel around the CP ring. Tensor
layouts: x [B, T, dim] -> q [B, T, Hq, D], k/v [B, T, Hkv, D] -> transposed to
[B, H, T, D] for the ring -> out [B, T, Hq * D] -> wo -> [B, T, dim].
"""

from __future__ import annotations

import torch
from torch import nn

from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import rank_segments
from titan_cp.cp.ring_attention import check_ring_inputs_agree, ring_attention
from titan_cp.models.common.sequence import SequenceInfo


def rope_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, 1, D/2] (``dtype``) of the angles positions * theta^(-2i/D), i < D/2."""
    exponents = torch.arange(0, head_dim, 2, device=positions_BT.device, dtype=torch.float64) / head_dim
    inv_freq = theta ** -exponents  # [D/2]
    angles = positions_BT.to(torch.float64)[..., None] * inv_freq  # [B, T, D/2]
    return angles.cos().to(dtype).unsqueeze(2), angles.sin().to(dtype).unsqueeze(2)


def apply_rope(x_BTHD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: [x1 cos - x2 sin, x2 cos + x1 sin], computed in cos's dtype."""
    x = x_BTHD.to(cos.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BTHD.dtype)


class Attention(nn.Module):
    """Causal softmax attention with RoPE and GQA; ring attention under context parallelism.

    ``mixes_sequence`` marks it for the CP coverage guard; ``self.cp`` (set by
    the parallelize function, None without CP) picks the ring's group and
    layout; ``layer_name`` labels its communication records.
    """

    mixes_sequence = True

    def __init__(self, *, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float = 10000.0):
        super().__init__()
        if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
            raise ValueError(
                f"model.attn_num_heads = {n_heads} must be a multiple of model.attn_num_kv_heads = {n_kv_heads} "
                "(grouped-query attention)."
            )
        if head_dim % 2 != 0:
            raise ValueError(f"model.attn_head_dim = {head_dim} must be even (RoPE rotates pairs of channels).")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta = float(rope_theta)
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.cp: CPContext | None = None
        self.layer_name = ""

    def init_weights(self, init_std: float) -> None:
        """TorchTitan's init: truncated normal 0.02 for wq/wk/wv, the depth-scaled ``init_std`` for wo."""
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)

    def _positions(self, seq: SequenceInfo, B: int, T: int, device: torch.device) -> torch.Tensor:
        """RoPE positions [B, T]: ``seq.positions``, else this rank's global token indices."""
        if seq.positions is not None:
            return seq.positions
        cp = self.cp
        P = cp.size if cp is not None else 1
        index = torch.arange(T * P, device=device)
        if P > 1:
            index = rank_segments(index, 0, cp.rank, P, cp.layout)
        return index.expand(B, T)

    def project_qkv(self, x_BTD: torch.Tensor, positions_BT: torch.Tensor):
        """q [B, T, Hq, D], k, v [B, T, Hkv, D] with RoPE at ``positions_BT`` (also used by decoding)."""
        B, T, _ = x_BTD.shape
        D = self.head_dim
        q_BTHD = self.wq(x_BTD).view(B, T, -1, D)  # local heads under TP
        k_BTHD = self.wk(x_BTD).view(B, T, -1, D)
        v_BTHD = self.wv(x_BTD).view(B, T, -1, D)
        # float32 for bf16 / fp16 / fp32, float64 for float64 (float64 runs stay float64)
        cos, sin = rope_cos_sin(positions_BT, D, self.rope_theta, torch.promote_types(q_BTHD.dtype, torch.float32))
        return apply_rope(q_BTHD, cos, sin), apply_rope(k_BTHD, cos, sin), v_BTHD

    def forward(self, x_BTD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BTHD, k_BTHD, v_BTHD = self.project_qkv(x_BTD, self._positions(seq, B, T, x_BTD.device))

        cp = self.cp
        check_ring_inputs_agree(cp, self.layer_name, q_BTHD, k_BTHD, seq.doc_ids is not None)
        o_BHTD = ring_attention(
            q_BTHD.transpose(1, 2),
            k_BTHD.transpose(1, 2),
            v_BTHD.transpose(1, 2),
            cp,
            doc_ids=seq.doc_ids,
            layer_name=self.layer_name,
        )
        return self.wo(o_BHTD.transpose(1, 2).reshape(B, T, -1))
