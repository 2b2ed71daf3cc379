"""Sequence mixing of a GDN layer (short convs + gated delta rule), with or without CP.

Everything in a GDN layer is token-local except two things, both handled here:

1. the causal short convs on q, k, v (width W): token t reads t-W+1..t;
2. the gated delta rule: token t reads the state built from every token before it.

Without CP both run on the full local sequence. With a state-passing CP
strategy (``allgather`` / ``logscan``) each rank:

  a. cuts its tokens into its segments (1 for contiguous, 2 for zigzag) and
     treats each segment as a row: [B, T, ...] -> [B * n_local, T_seg, ...];
  b. gets the W-1 pre-conv tokens before each segment (cp/halo.py) and runs
     the conv on [halo | segment];
  c. runs the kernel ONCE per segment with values [v | 0] (width V + K) and
     initial state [0 | I]. Because the delta rule acts on every state column
     independently and linearly, this one call returns
        final state  [S_local | M]          (zero-start state, transition)
        outputs      [o_local | q_t M_<=t]  (scale included)
     using nothing but the kernel interface (initial state in, final out);
  d. exchanges the summaries (cp/exchange.py) to get each segment's true
     incoming state S_start, and corrects the outputs:
        o_t = o_local_t + (q_t M_<=t) S_start.
  Autograd does the rest: the kernel's backward, the exchange's reverse fold,
  the halo's reverse send.

Document starts (packed sequences) reset both the conv history and the state
(``doc_starts``); a segment with a document start has M = 0, so no state
crosses it. The head-parallel ``alltoall`` strategy is in cp/alltoall.py and
reuses :func:`mix_local` on full sequences of a subset of heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from titan_cp.cp.context import CPContext, dtype_code
from titan_cp.cp.exchange import exchange_states
from titan_cp.cp.halo import exchange_halo
from titan_cp.kernels import get_kernel


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


def causal_short_conv(
    x_BTC: torch.Tensor,
    weight_C1W: torch.Tensor,
    history_BHC: torch.Tensor | None = None,
    doc_starts_BT: torch.Tensor | None = None,
    history_starts_BH: torch.Tensor | None = None,
) -> torch.Tensor:
    """SiLU(depthwise causal conv1d) with an optional history and document resets.

        y_t = silu( sum_{j=0}^{W-1} w[:, j] * x_{t-W+1+j} * [doc(t-W+1+j) == doc(t)] )

    ``history_BHC`` holds the W-1 tokens before x (zeros if None: the sequence
    start); ``*_starts`` flag document starts (a tap never reads across one).
    """
    W = weight_C1W.shape[-1]
    B, T, C = x_BTC.shape
    if history_BHC is None:
        history_BHC = x_BTC.new_zeros(B, W - 1, C)
    x_ext = torch.cat([history_BHC, x_BTC], dim=1)  # [B, W-1+T, C]
    weight_WC = weight_C1W[:, 0, :].t().to(x_BTC.dtype)
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
            x_ext[:, j:j + T] * weight_WC[j] * (doc_ext[:, j:j + T] == doc_now).unsqueeze(-1).to(x_BTC.dtype)
            for j in range(W)
        )
    return F.silu(y)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """FLA's l2norm: x / sqrt(sum x^2 + eps) over the head dim, computed in float32."""
    x_f = x.float()
    return (x_f * torch.rsqrt(x_f.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _conv_qkv(inp: GDNMixingInputs, halo_BHC=None, halo_starts_BH=None):
    """Run the three convs as one (concatenated channels); return q, k, v with heads split."""
    x = torch.cat([inp.q_BTC, inp.k_BTC, inp.v_BTC], dim=-1)
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
    q, k, v = _conv_qkv(inp)
    o, _ = get_kernel(kernel)(q, k, v, inp.g_BTH, inp.beta_BTH, doc_starts=inp.doc_starts_BT)
    return o


def _as_segment_rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """[B, n * T_seg, ...] -> [B * n, T_seg, ...]: one row per local segment."""
    if t is None:
        return None
    B, T = t.shape[:2]
    return t.reshape(B * n, T // n, *t.shape[2:])


def mix_state_passing(inp: GDNMixingInputs, kernel: str, cp: CPContext, layer_name: str) -> torch.Tensor:
    """Steps a-d of the module docstring. Returns o [B, T_local, Hv, V]."""
    B, T = inp.q_BTC.shape[:2]
    n = len(cp.local_segments)
    if T % n:
        raise ValueError(
            f"context parallel {layer_name}: this rank holds {T} tokens, not divisible into its {n} "
            f"segments of layout '{cp.layout}'; shard the batch with titan_cp.cp.layout.shard_sequence."
        )
    rows = replace(
        inp,
        **{name: _as_segment_rows(getattr(inp, name), n)
           for name in ("q_BTC", "k_BTC", "v_BTC", "g_BTH", "beta_BTH", "doc_starts_BT")},
    )
    T_seg = T // n
    W = inp.q_conv_weight.shape[-1]
    cp.check_same_everywhere(
        layer_name,
        (dtype_code(inp.q_BTC.dtype), B, T_seg, inp.q_BTC.shape[-1], inp.v_BTC.shape[-1]),
        "(dtype, batch, segment length, key channels, value channels)",
    )

    # b. conv halo: pre-conv q|k|v plus a document-start channel, W-1 tokens per segment.
    x = torch.cat([rows.q_BTC, rows.k_BTC, rows.v_BTC], dim=-1)
    starts = rows.doc_starts_BT
    if starts is not None:
        x = torch.cat([x, starts.unsqueeze(-1).to(x.dtype)], dim=-1)
    halo = exchange_halo(x.reshape(B, n, T_seg, -1), W - 1, cp, layer_name).reshape(B * n, W - 1, -1)
    halo_starts = None
    if starts is not None:
        halo, halo_starts = halo[..., :-1], halo[..., -1] > 0.5
    q, k, v = _conv_qkv(rows, halo, halo_starts)

    # c. one kernel call per segment with values [v | 0] from state [0 | I].
    N, _, Hv, V = v.shape
    K = q.shape[-1]
    state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    v_aug = torch.cat([v, v.new_zeros(N, T_seg, Hv, K)], dim=-1)
    identity_start = torch.zeros(N, Hv, K, V + K, dtype=state_dtype, device=v.device)
    identity_start[..., V:] = torch.eye(K, dtype=state_dtype, device=v.device)
    o_aug, final = get_kernel(kernel)(
        q, k, v_aug, rows.g_BTH, rows.beta_BTH,
        initial_state=identity_start, output_final_state=True, doc_starts=starts,
    )
    S_local, M = final[..., :V], final[..., V:]

    # d. exchange summaries, correct the outputs with the true incoming state.
    S_start = exchange_states(
        M.reshape(B, n, Hv, K, K), S_local.reshape(B, n, Hv, K, V), cp, layer_name
    ).reshape(N, Hv, K, V)
    qM = o_aug[..., V:].to(state_dtype)
    o = o_aug[..., :V] + torch.einsum("nthk,nhkv->nthv", qM, S_start).to(v.dtype)
    return o.reshape(B, T, Hv, V)


@torch.compiler.disable
def mix_sequence(inp: GDNMixingInputs, *, kernel: str, cp: CPContext | None, layer_name: str = "") -> torch.Tensor:
    """The sequence-mixing part of a GDN layer under any CP strategy. Returns o [B, T, Hv, V].

    Runs eagerly under torch.compile (a graph break around it): the kernels
    and CP communication stay as written, the token-local rest of the block
    is compiled.
    """
    if cp is None or cp.size == 1:
        return mix_local(inp, kernel)
    if cp.exchange == "alltoall":
        from titan_cp.cp.alltoall import mix_head_parallel

        return mix_head_parallel(inp, kernel, cp, layer_name)
    return mix_state_passing(inp, kernel, cp, layer_name)
