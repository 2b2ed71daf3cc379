"""The sequence mixing of a GDN layer without context parallelism: short convs, l2norm, delta rule.

A Gated DeltaNet layer (titan_cp/models/gdn/layers.py) projects x into pre-conv
q, k, v [B, T, C], a log decay g and a write strength beta [B, T, Hv]
(token-local), then mixes along the sequence in two places only:

1. the causal depthwise short convs on q, k, v (width W, SiLU after):
   token t reads tokens t-W+1..t (:func:`causal_short_conv`);
2. the gated delta rule over the L2-normalised q, k and v
   (:mod:`titan_cp.ops.gated_delta_rule`): token t reads the state built from every token
   before it.

:class:`GDNMixingInputs` carries everything the mixing needs;
:func:`mix_local` runs both steps on whole sequences. Context parallelism
(titan_cp/cp/) runs the same ops on shards: the state-passing strategies give
the conv a halo of the W-1 tokens before each shard and the kernel an
augmented initial state (cp/state_passing.py); the head-parallel strategy
calls :func:`mix_local` on full sequences of a subset of heads
(cp/head_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule import get_kernel


@dataclass
class GDNMixingInputs:
    """Everything after the token-local projections of a GDN layer (local heads under TP)."""

    q_BTC: torch.Tensor  # pre-conv q, C = H * K
    k_BTC: torch.Tensor  # pre-conv k
    v_BTC: torch.Tensor  # pre-conv v, C = Hv * V
    g_BTH: torch.Tensor  # log decay (float32), Hv heads
    beta_BTH: torch.Tensor  # float32, Hv heads
    q_conv_weight: torch.Tensor  # [H*K, 1, W]
    k_conv_weight: torch.Tensor
    v_conv_weight: torch.Tensor  # [Hv*V, 1, W]
    head_dim: int  # K
    head_v_dim: int  # V
    doc_starts_BT: torch.Tensor | None = None


def gdn_gates(a_BTH: torch.Tensor, b_BTH: torch.Tensor, A_log_H: torch.Tensor, dt_bias_H: torch.Tensor):
    """The per-token, per-value-head gates of GDN, in float32 (float64 when any input is
    float64, so float64 runs stay float64 end to end; Mamba-2's decay parametrisation):

        g    = -exp(A_log) * softplus(a + dt_bias)   (log decay, <= 0)
        beta = sigmoid(b)                              (write strength in (0, 1))

    ``a``/``b`` are the a/b projections of x [B, T, Hv]; ``A_log``/``dt_bias`` are local
    (per-rank) tensors [Hv]. Returns (g_BTH, beta_BTH).
    """
    acc = torch.promote_types(torch.promote_types(a_BTH.dtype, A_log_H.dtype), torch.float32)
    acc = torch.promote_types(torch.promote_types(acc, dt_bias_H.dtype), b_BTH.dtype)
    g_BTH = -A_log_H.to(acc).exp() * F.softplus(a_BTH.to(acc) + dt_bias_H.to(acc))
    return g_BTH, b_BTH.to(acc).sigmoid()


def causal_short_conv(
    x_BTC: torch.Tensor,
    weight_C1W: torch.Tensor,
    history_BHC: torch.Tensor | None = None,
    doc_starts_BT: torch.Tensor | None = None,
    history_starts_BH: torch.Tensor | None = None,
    bias_C: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiLU(depthwise causal conv1d) with an optional history, document resets and bias (Mamba-2's).

        y_t = silu( sum_{j=0}^{W-1} w[:, j] * x_{t-W+1+j} * [doc(t-W+1+j) == doc(t)] )

    ``history_BHC`` holds the W-1 tokens before x (zeros if None: the sequence
    start); ``*_starts`` flag document starts (a tap never reads across one).

    The taps are multiplied and summed, and SiLU applied, in float32 (float64 for
    float64 inputs), as FLA's causal_conv1d does; the result is rounded to x's
    dtype once. Under bf16 that is one rounding (relative error <= 2^-8 per output)
    instead of one per product and per partial sum.
    """
    W = weight_C1W.shape[-1]
    B, T, C = x_BTC.shape
    acc = torch.promote_types(x_BTC.dtype, torch.float32)
    if history_BHC is None:
        history_BHC = x_BTC.new_zeros(B, W - 1, C)
    x_ext = torch.cat([history_BHC, x_BTC], dim=1).to(acc)  # [B, W-1+T, C]
    weight_WC = weight_C1W[:, 0, :].t().to(acc)
    if doc_starts_BT is None and history_starts_BH is None:
        y = sum(x_ext[:, j:j + T] * weight_WC[j] for j in range(W))
    else:
        starts_ext = torch.cat([
            history_starts_BH if history_starts_BH is not None else doc_starts_BT.new_zeros(B, W - 1),
            doc_starts_BT if doc_starts_BT is not None else history_starts_BH.new_zeros(B, T),
        ], dim=1)
        doc_ext = starts_ext.long().cumsum(dim=1)
        doc_now = doc_ext[:, W - 1:]
        y = sum(
            x_ext[:, j:j + T] * weight_WC[j] * (doc_ext[:, j:j + T] == doc_now).unsqueeze(-1).to(acc)
            for j in range(W)
        )
    if bias_C is not None:
        y = y + bias_C.to(acc)
    return F.silu(y).to(x_BTC.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FLA's l2norm: x / sqrt(sum x^2 + eps) over the head dim, computed in float32
    (float64 for float64 inputs)."""
    x_f = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x_f * torch.rsqrt(x_f.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def conv_qkv_input(inp: GDNMixingInputs) -> torch.Tensor:
    """The three convs' input as one tensor: [B, T, C_q + C_k + C_v], pre-conv q | k | v."""
    return torch.cat([inp.q_BTC, inp.k_BTC, inp.v_BTC], dim=-1)


def conv_qkv(
    inp: GDNMixingInputs,
    halo_BHC: torch.Tensor | None = None,
    halo_starts_BH: torch.Tensor | None = None,
    x_BTC: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three short convs as one (channels concatenated), then heads split and q, k L2-normalised.

    ``halo_BHC`` [B, W-1, C_q + C_k + C_v] (and its document starts) is the
    pre-conv history before the rows (CP); None means the sequence start.
    ``x_BTC``: :func:`conv_qkv_input` of ``inp`` if the caller has it already.
    Returns q, k [B, T, Hv, K] (repeated from H to Hv heads when value heads
    are grouped) and v [B, T, Hv, V].
    """
    x = conv_qkv_input(inp) if x_BTC is None else x_BTC
    weight = torch.cat([inp.q_conv_weight, inp.k_conv_weight, inp.v_conv_weight], dim=0)
    y = causal_short_conv(x, weight, halo_BHC, inp.doc_starts_BT, halo_starts_BH)
    ck, cv = inp.q_BTC.shape[-1], inp.v_BTC.shape[-1]
    q, k, v = y.split([ck, ck, cv], dim=-1)
    B, T = x.shape[:2]
    q = l2norm(q.reshape(B, T, -1, inp.head_dim))
    k = l2norm(k.reshape(B, T, -1, inp.head_dim))
    v = v.reshape(B, T, -1, inp.head_v_dim)
    groups = v.shape[2] // q.shape[2]  # grouped value heads: repeat q, k to Hv heads
    if groups > 1:
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    return q, k, v


def mix_local(inp: GDNMixingInputs, kernel: str) -> torch.Tensor:
    """Convs + delta rule on whole sequences (no CP). Returns o [B, T, Hv, V]."""
    q, k, v = conv_qkv(inp)
    o, _ = get_kernel(kernel)(q, k, v, inp.g_BTH, inp.beta_BTH, doc_starts=inp.doc_starts_BT)
    return o


__all__ = ["GDNMixingInputs", "causal_short_conv", "conv_qkv", "conv_qkv_input", "l2norm", "mix_local"]
