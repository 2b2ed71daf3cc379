"""TorchTitan's Qwen3.5 layers with titan_cp's sequence mixing (context parallel, CPU + GPU).

Each class subclasses TorchTitan's module (same parameters, names, configs and
init, so ``Qwen35StateDictAdapter`` and HF checkpoints apply unchanged) and
replaces only the part of ``forward`` that mixes tokens along the sequence.
Tensor names carry their layout: B batch, T local sequence length, D model
dim, H key heads, Hv value heads, K/V head dims; under TP every layer sees its
local heads only (head counts come from tensor shapes).

Gated DeltaNet (:class:`CPGatedDeltaNet`), per token t of a row::

    q, k  = in_proj_q/k(x)     [B, T, H*K]     v = in_proj_v(x)  [B, T, Hv*V]
    q, k, v = silu(causal_conv_q/k/v(.))  (width W, reset at document starts)
    q, k  = l2norm(q), l2norm(k), repeated Hv/H times per key head (grouped value heads,
            ``repeat_interleave`` like transformers' Qwen3_5GatedDeltaNet)
    beta  = sigmoid(in_proj_b(x)),  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)
    o     = gated_delta_rule(q, k, v, g, beta)  (scale K^-1/2)
    y     = out_proj(RMSNormGated(o, in_proj_z(x)))

Convs + delta rule run in :func:`titan_cp.cp.mix_sequence` (every CP
exchange strategy and layout, kernels ``torch`` / ``triton`` / ``recurrent``).
Unlike TorchTitan's layer, rows of a batch are never folded into one stream:
each row is its own sequence; documents packed in a row reset at
``positions == 0``.

Gated attention (:class:`CPQwen35Attention`)::

    [q | gate] = wq(x) per head (2 x head_dim),  k = wk(x),  v = wv(x)   (GQA)
    q, k = q_norm(q), k_norm(k)                  (OffsetRMSNorm, per head)
    q, k = RoPE on the first rotary_dim channels (TorchTitan's MRoPE; text
           positions = the same id on the t/h/w sections, i.e. plain RoPE)
    o    = causal softmax(q k^T / sqrt(head_dim)) v  within the document
    y    = wo(o * sigmoid(gate))

with the softmax attention done by titan_cp's ring attention on GLOBAL
positions (this rank's shard of the layout, or the trainer's per-document
positions).

Norms and RoPE (:class:`CPOffsetRMSNorm`, :class:`CPRMSNormGated`,
:class:`CPMRoPE`) are TorchTitan's arithmetic with a dtype-following upcast:
float32 for bf16 / fp16 / fp32 inputs (exactly TorchTitan's), float64 for
float64, where TorchTitan's always cast to float32.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

import torch.nn.functional as F

from torchtitan.models.common.rope import CosSinRoPE
from torchtitan.models.qwen3_5.model import (GatedDeltaNet, OffsetRMSNorm, Qwen35Attention, Qwen35TransformerBlock,
                                             RMSNormGated)
from torchtitan.models.qwen3_5.rope import MRoPE
from torchtitan.protocols.module import Module

from titan_cp.cp.context import CPContext
from titan_cp.cp import mix_sequence
from titan_cp.ops.gated_delta_rule.mixing import GDNMixingInputs, gdn_gates
from titan_cp.cp.ring_attention import check_ring_inputs_agree, ring_attention
from titan_cp.models.common.sequence import SequenceInfo
from titan_cp.models.common.dtensor import local_tensor


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in float32 (float64 for float64 x)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class CPOffsetRMSNorm(OffsetRMSNorm):
    """TorchTitan's ``(1 + weight) * norm(x)``, upcast to float32 only for float32-or-narrower x."""

    @dataclass(kw_only=True, slots=True)
    class Config(OffsetRMSNorm.Config):
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_n = _normalized(x, self.eps)
        return ((1.0 + self.weight.to(x_n.dtype)) * x_n).to(x.dtype)


class CPRMSNormGated(RMSNormGated):
    """TorchTitan's ``silu(gate) * weight * norm(x)`` (rounded to x's dtype before the gate, as
    TorchTitan's), upcast to float32 only for float32-or-narrower x."""

    @dataclass(kw_only=True, slots=True)
    class Config(RMSNormGated.Config):
        pass

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x_n = _normalized(x, self.eps)
        y = (self.weight.to(x_n.dtype) * x_n).to(x.dtype)
        return (y * F.silu(gate.to(x_n.dtype))).to(x.dtype)


class CPMRoPE(MRoPE):
    """TorchTitan's MRoPE (rotate-half on its cos/sin cache), rotated in float32 only for float32-or-narrower q/k."""

    @dataclass(kw_only=True, slots=True)
    class Config(MRoPE.Config):
        pass

    @staticmethod
    def apply_rotary_emb(query, key, rope_cache):
        D = query.shape[-1]
        cos, sin = rope_cache[..., :D], rope_cache[..., D:]
        q, k = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (query, key))
        rotate_half = CosSinRoPE._rotate_half
        return (q * cos + rotate_half(q) * sin).type_as(query), (k * cos + rotate_half(k) * sin).type_as(key)


def dtype_following(config):
    """TorchTitan's OffsetRMSNorm / RMSNormGated / MRoPE config -> the same fields on its dtype-following twin."""
    for twin in (CPOffsetRMSNorm, CPRMSNormGated, CPMRoPE):
        if isinstance(config, twin.__mro__[1].Config):
            return twin.Config(**{f.name: getattr(config, f.name) for f in fields(config)})
    raise TypeError(f"no dtype-following twin for {type(config).__qualname__}")


class CPGatedDeltaNet(GatedDeltaNet):
    """TorchTitan's Qwen3.5 GatedDeltaNet whose convs + delta rule run through titan_cp's CP mixing.

    ``mixing_kernel``: titan_cp kernel name (``torch``, ``triton``, ``recurrent``),
    set by the model from ``model.kernel``; TorchTitan's FLA-only ``kernel``
    module is dropped.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(GatedDeltaNet.Config):
        pass

    mixes_sequence = True

    def __init__(self, config: Config):
        super().__init__(config)
        del self.kernel  # TorchTitan's FLA dispatch; mix_sequence replaces it
        self.mixing_kernel = "torch"
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            # Their sequence mixing (with the CP halo) runs inside mix_sequence below.
            conv.mixes_sequence = True
        self.cp: CPContext | None = None
        self.layer_name = ""

    def forward(self, x_BTD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:  # type: ignore[override]
        B, T, _ = x_BTD.shape
        g_BTH, beta_BTH = gdn_gates(self.in_proj_a(x_BTD), self.in_proj_b(x_BTD), local_tensor(self.A_log),
                                    local_tensor(self.dt_bias))
        inputs = GDNMixingInputs(
            q_BTC=self.in_proj_q(x_BTD),
            k_BTC=self.in_proj_k(x_BTD),
            v_BTC=self.in_proj_v(x_BTD),
            g_BTH=g_BTH,
            beta_BTH=beta_BTH,
            q_conv_weight=local_tensor(self.conv_q.weight),
            k_conv_weight=local_tensor(self.conv_k.weight),
            v_conv_weight=local_tensor(self.conv_v.weight),
            head_dim=self.key_head_dim,
            head_v_dim=self.value_head_dim,
            doc_starts_BT=seq.doc_starts,
        )
        o_BTHV = mix_sequence(inputs, kernel=self.mixing_kernel, cp=self.cp, layer_name=self.layer_name)
        z_BTHV = self.in_proj_z(x_BTD).view(B, T, -1, self.value_head_dim)
        y_BTHV = self.norm(o_BTHV, z_BTHV)
        return self.out_proj(y_BTHV.reshape(B, T, -1))


class RingAttention(Module):
    """Stands in for TorchTitan's ``inner_attention`` (flex/sdpa/varlen): titan_cp's ring attention.

    No parameters. Its config type keeps the trainer from building flex/varlen
    masks: documents come from ``positions`` instead (SequenceInfo.doc_ids).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config):
        super().__init__()

    def forward(self, q_BHTD, k_BHTD, v_BHTD, *, scale: float, cp: CPContext | None,
                doc_ids: torch.Tensor | None, layer_name: str) -> torch.Tensor:
        return ring_attention(q_BHTD, k_BHTD, v_BHTD, cp, scale=scale, doc_ids=doc_ids, layer_name=layer_name)


class CPQwen35Attention(Qwen35Attention):
    """TorchTitan's gated full attention with titan_cp's ring attention (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Qwen35Attention.Config):
        pass

    mixes_sequence = True

    def __init__(self, config: Config):
        super().__init__(config)
        self.cp: CPContext | None = None
        self.layer_name = ""

    def forward(self, x_BTD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:  # type: ignore[override]
        B, T, _ = x_BTD.shape
        D, R = self.head_dim, self.rotary_dim
        xq, gate_BTHD = self.wq(x_BTD).view(B, T, -1, 2 * D).chunk(2, dim=-1)
        q_BTHD = self.q_norm(xq)
        k_BTHD = self.k_norm(self.wk(x_BTD).view(B, T, -1, D))
        v_BTHD = self.wv(x_BTD).view(B, T, -1, D)
        q_rot, k_rot = self.rope(q_BTHD[..., :R], k_BTHD[..., :R], seq.positions)
        q_BTHD = torch.cat([q_rot, q_BTHD[..., R:]], dim=-1)
        k_BTHD = torch.cat([k_rot, k_BTHD[..., R:]], dim=-1)
        cp = self.cp
        check_ring_inputs_agree(cp, self.layer_name, q_BTHD, k_BTHD, seq.doc_ids is not None)
        o_BHTD = self.inner_attention(
            q_BTHD.transpose(1, 2), k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2),
            scale=self.scaling, cp=cp, doc_ids=seq.doc_ids, layer_name=self.layer_name,
        )
        o_BTHD = o_BHTD.transpose(1, 2) * torch.sigmoid(gate_BTHD)
        return self.wo(o_BTHD.reshape(B, T, -1))


class CPQwen35Block(Qwen35TransformerBlock):
    """TorchTitan's hybrid block; its mixer gets the shared :class:`SequenceInfo` instead of masks."""

    @dataclass(kw_only=True, slots=True)
    class Config(Qwen35TransformerBlock.Config):
        pass

    def forward(self, x_BTD: torch.Tensor, seq: SequenceInfo) -> torch.Tensor:  # type: ignore[override]
        x_BTD = x_BTD + self.attn(self.attention_norm(x_BTD), seq)
        h_BTD = self.ffn_norm(x_BTD)
        return x_BTD + (self.moe(h_BTD) if self.moe_enabled else self.feed_forward(h_BTD))
