"""Incremental decoding of a GDNModel: prefill a prompt, then one token at a time from carried state.

Every layer carries a cache across calls of :func:`forward_cached` (tokens
``[B, T]`` at positions ``P .. P+T-1``, P = tokens seen so far):

Gated DeltaNet layer (constant size, O(1) work per token)
    conv_history  [B, W-1, C]   the last W-1 *pre-conv* q|k|v channels (C = 2 H K + Hv V),
                                zeros before the first token: the conv's left padding
    state         [B, Hv, K, V] float32, the delta-rule state S after the last token

    q, k, v = convs over [conv_history | new tokens] (the CP halo path of
              :mod:`titan_cp.ops.gated_delta_rule.mixing`, with the history as the halo)
    o, S    = gated_delta_rule(q, k, v, g, beta, initial_state=S)
              (the model's chunk kernel for a prompt, the one-step recurrence for T = 1:
               S <- exp(g) (I - beta k k^T) S + beta k v^T,  o = K^-1/2 S^T q)

KDA layer: the same cache (conv history of its q|k|v, state [B, Hv, K, V]); the step is
    S <- (I - beta k k^T) diag(exp g) S + beta k v^T,  o = K^-1/2 S^T q   (titan_cp.ops.kda)

Mamba-2 layer: the same cache, conv history of its pre-conv x|B|C [B, W-1, E + 2 G N] and
state [B, H, N, P]; the step is  S <- exp(dt A) S + dt B x^T,  y = S^T C + D x  (titan_cp.ops.mamba2,
through the layer's own titan_cp.ops.mamba2.mixing.mamba2_mixer with the history as the conv halo)

Softmax attention layer (hybrid models; a KV cache)
    k, v          [B, P, Hkv, D]  keys (after RoPE at their positions) and values so far

    new queries at positions P+i attend to every cached key and to new keys j <= i.

Everything else in a block is token-local, so running the blocks over the new
tokens with these caches gives exactly the logits of a full forward over all
P+T tokens (tests/unit/test_decode.py checks every step, fp32). One document per
row (no packing), no CP: decoding runs on one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule.mixing import conv_qkv
from titan_cp.ops import kda, mamba2
from titan_cp.ops.mamba2.mixing import mamba2_mixer
from titan_cp.ops.gated_delta_rule import get_kernel
from titan_cp.ops.gated_delta_rule.mixing import causal_short_conv
from titan_cp.models.gdn.attention import Attention
from titan_cp.models.gdn.layers import GatedDeltaNet, KimiDeltaAttention
from titan_cp.models.gdn.mamba2_layer import Mamba2Mixer


@dataclass
class GDNCache:
    conv_history_BWC: torch.Tensor  # [B, W-1, C] pre-conv q|k|v of the last W-1 tokens
    state_BHKV: torch.Tensor  # [B, Hv, K, V] float32


@dataclass
class KVCache:
    k_BTHD: torch.Tensor  # [B, P, Hkv, D], RoPE applied
    v_BTHD: torch.Tensor


@dataclass
class DecodeCache:
    """Per-layer caches (None before the first call) and the number of tokens seen."""

    layers: list[GDNCache | KVCache | None]
    length: int = 0

    @classmethod
    def empty(cls, model) -> "DecodeCache":
        return cls(layers=[None] * len(model.layers))


def _gdn_cached(layer: GatedDeltaNet, x_BTD: torch.Tensor, cache: GDNCache | None) -> tuple[torch.Tensor, GDNCache]:
    inputs = layer.mixing_inputs(x_BTD)
    x_BTC = torch.cat([inputs.q_BTC, inputs.k_BTC, inputs.v_BTC], dim=-1)
    B, T, C = x_BTC.shape
    W = inputs.q_conv_weight.shape[-1]
    history_BWC = x_BTC.new_zeros(B, W - 1, C) if cache is None else cache.conv_history_BWC
    q, k, v = conv_qkv(inputs, history_BWC)
    kernel = get_kernel("recurrent" if T == 1 else layer.kernel)
    o_BTHV, state = kernel(q, k, v, inputs.g_BTH, inputs.beta_BTH,
                           initial_state=None if cache is None else cache.state_BHKV, output_final_state=True)
    new_history = torch.cat([history_BWC, x_BTC], dim=1)[:, T:]
    return layer.output(o_BTHV, x_BTD), GDNCache(new_history, state)


def _kda_cached(layer: KimiDeltaAttention, x_BTD: torch.Tensor,
                cache: GDNCache | None) -> tuple[torch.Tensor, GDNCache]:
    x_BTC, weight = layer.conv_input(x_BTD)
    B, T, C = x_BTC.shape
    history_BWC = x_BTC.new_zeros(B, weight.shape[-1] - 1, C) if cache is None else cache.conv_history_BWC
    q, k, v, g, beta = layer.heads(causal_short_conv(x_BTC, weight, history_BWC), x_BTD)
    kernel = kda.get_kernel("recurrent" if T == 1 else layer.kernel)
    o_BTHV, state = kernel(q, k, v, g, beta, initial_state=None if cache is None else cache.state_BHKV,
                           output_final_state=True)
    new_history = torch.cat([history_BWC, x_BTC], dim=1)[:, T:]
    return layer.output(o_BTHV, x_BTD), GDNCache(new_history, state)


def _mamba2_cached(layer: Mamba2Mixer, x_BTD: torch.Tensor, cache: GDNCache | None) -> tuple[torch.Tensor, GDNCache]:
    T = x_BTD.shape[1]
    new: dict[str, torch.Tensor] = {}

    def conv(xBC_BTC, weight, bias, starts):
        B, _, C = xBC_BTC.shape
        history_BWC = xBC_BTC.new_zeros(B, weight.shape[-1] - 1, C) if cache is None else cache.conv_history_BWC
        new["history"] = torch.cat([history_BWC, xBC_BTC], dim=1)[:, T:]
        return causal_short_conv(xBC_BTC, weight, history_BWC, bias_C=bias)

    def ssd(q, k, v, g, beta, *, initial_state=None, doc_starts=None):
        kernel = mamba2.get_kernel("recurrent" if T == 1 else layer.kernel)
        o, new["state"] = kernel(q, k, v, g, beta, scale=1.0, output_final_state=True,
                                 initial_state=None if cache is None else cache.state_BHKV)
        return o

    y = mamba2_mixer(layer, x_BTD, conv=conv, ssd=ssd)
    return y, GDNCache(new["history"], new["state"])


def _attention_cached(layer: Attention, x_BTD: torch.Tensor, cache: KVCache | None,
                      start: int) -> tuple[torch.Tensor, KVCache]:
    B, T, _ = x_BTD.shape
    positions_BT = torch.arange(start, start + T, device=x_BTD.device).expand(B, T)
    q_BTHD, k_BTHD, v_BTHD = layer.project_qkv(x_BTD, positions_BT)
    if cache is not None:
        k_BTHD = torch.cat([cache.k_BTHD, k_BTHD], dim=1)
        v_BTHD = torch.cat([cache.v_BTHD, v_BTHD], dim=1)
    # query i (position start+i) sees keys at positions <= start+i
    allowed_TS = torch.arange(start + T, device=x_BTD.device) <= torch.arange(start, start + T,
                                                                            device=x_BTD.device)[:, None]
    o_BHTD = F.scaled_dot_product_attention(q_BTHD.transpose(1, 2), k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2),
                                            attn_mask=allowed_TS, enable_gqa=True)
    return layer.wo(o_BHTD.transpose(1, 2).reshape(B, T, -1)), KVCache(k_BTHD, v_BTHD)


@torch.no_grad()
def forward_cached(model, tokens_BT: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
    """Logits [B, T, vocab] of ``tokens_BT`` continuing ``cache`` (updated in place)."""
    h = model.tok_embeddings(tokens_BT)
    for i, block in enumerate(model.layers.values()):
        x = block.attention_norm(h)
        if isinstance(block.attention, Attention):
            y, cache.layers[i] = _attention_cached(block.attention, x, cache.layers[i], cache.length)
        elif isinstance(block.attention, KimiDeltaAttention):
            y, cache.layers[i] = _kda_cached(block.attention, x, cache.layers[i])
        elif isinstance(block.attention, Mamba2Mixer):
            y, cache.layers[i] = _mamba2_cached(block.attention, x, cache.layers[i])
        else:
            y, cache.layers[i] = _gdn_cached(block.attention, x, cache.layers[i])
        h = h + y
        if block.feed_forward is not None:
            h = h + block.feed_forward(block.ffn_norm(h))
    cache.length += tokens_BT.shape[1]
    return model.lm_head(model.norm(h))


def sample(logits_BV: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator | None):
    """Next tokens [B]: argmax at temperature 0, else a draw from softmax(logits / T) over the top k."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_BT: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt + up to ``max_new_tokens`` new tokens [B, <= T + max_new_tokens]; stops when all rows hit EOS."""
    cache = DecodeCache.empty(model)
    logits = forward_cached(model, prompt_BT, cache)[:, -1]
    out = [prompt_BT]
    done = torch.zeros(prompt_BT.shape[0], dtype=torch.bool, device=prompt_BT.device)
    for _ in range(max_new_tokens):
        token_B = sample(logits, temperature=temperature, top_k=top_k, generator=generator)
        if eos_id is not None:
            token_B = torch.where(done, torch.full_like(token_B, eos_id), token_B)
            done |= token_B == eos_id
        out.append(token_B[:, None])
        if bool(done.all()):
            break
        logits = forward_cached(model, token_B[:, None], cache)[:, -1]
    return torch.cat(out, dim=1)
