"""Op-level CP for any linear-attention family: one kernel over this rank's shards, every exchange.

A family (GDN, Mamba-2, ...) is, for the engine, two things with one signature
(``kernel(q, k, v, g, beta, *, scale, initial_state, output_final_state, doc_starts)``,
titan_cp/ops/gated_delta_rule/interface.py):

- ``kernel``: the plain kernel (initial state in, final state out, document resets);
- ``segment_kernel``: the same kernel as a CP segment kernel (its transition forward:
  outputs, S_local, the segment's transition M ([K, K], or a scalar per head with
  ``scalar_transition = True``) and q_transition; its backward from the true start;
  titan_cp/ops/gated_delta_rule/transition.py).

:func:`kernel_over_shards` runs it under ``cp.exchange``: ``allgather`` / ``logscan``
pass the summaries (cp/state_passing.py, whose fold treats either kind of M), and
``alltoall`` turns sequence shards into whole sequences of H/P heads (the
all-to-all of cp/head_parallel.py), runs the plain kernel, and turns them back.
Every layout works for all three. The initial state's gradient is this rank's share:
sum it over the group to get the one-rank gradient.
"""

from __future__ import annotations

import torch

from titan_cp.cp.comm import all_gather_list
from titan_cp.cp.context import CPContext, dtype_code
from titan_cp.cp.head_parallel import _heads_to_seq, _seq_to_heads
from titan_cp.cp.halo import conv_halo
from titan_cp.cp.layout import reassemble
from titan_cp.cp.state_passing import as_segment_rows, delta_rule_over_segments
from titan_cp.ops import mamba2
from titan_cp.ops.gated_delta_rule.mixing import causal_short_conv
from titan_cp.ops.mamba2.mixing import mamba2_mixer


def _head_parallel(q, k, v, g, beta, kernel, cp: CPContext, name, initial_state, doc_starts, scale):
    B, T, H, K = q.shape
    V = v.shape[-1]
    P = cp.size
    if H % P:
        raise ValueError(f"{name}: exchange 'alltoall' splits the {H} heads over {P} CP ranks; heads must "
                         f"divide by the CP degree (or use exchange 'allgather' / 'logscan').")
    qf, kf, vf = _seq_to_heads([x.flatten(2) for x in (q, k, v)], cp, name)
    gf, bf = _seq_to_heads([g.flatten(2), beta.flatten(2)], cp, name)
    L, h = qf.shape[1], H // P
    starts = None
    if doc_starts is not None:
        starts = reassemble(all_gather_list(doc_starts, cp.group, P), dim=1, layout=cp.layout)
    initial = None if initial_state is None else initial_state[:, cp.rank * h:(cp.rank + 1) * h]
    o, _ = kernel(qf.reshape(B, L, h, K), kf.reshape(B, L, h, K), vf.reshape(B, L, h, V),
                  gf.reshape(B, L, h, *g.shape[3:]), bf.reshape(B, L, h), scale=scale, initial_state=initial,
                  doc_starts=starts)
    return _heads_to_seq(o.flatten(2), cp, name).reshape(B, T, H, V)


def kernel_over_shards(q, k, v, g, beta, *, kernel, segment_kernel, cp: CPContext | None, name: str = "kernel",
                       initial_state=None, doc_starts=None, scale=None) -> torch.Tensor:
    """o [B, T, H, V] of this rank's tokens (q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, ...],
    beta [B, T, H] as titan_cp.cp.layout.rank_segments cuts them), exactly as one rank computes it."""
    if cp is None or cp.size == 1:
        return kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state, doc_starts=doc_starts)[0]
    B, T, H, K = q.shape
    V = v.shape[-1]
    n = len(cp.local_segments)
    if T % n:
        raise ValueError(f"{name}: this rank holds {T} tokens, not divisible into its {n} segments of layout "
                         f"'{cp.layout}'; shard the batch with titan_cp.cp.layout.rank_segments.")
    cp.check_same_everywhere(name, (dtype_code(v.dtype), B, T // n, H, K, V),
                             "(dtype, batch, segment length, heads, K, V)")
    if cp.exchange == "alltoall":
        return _head_parallel(q, k, v, g, beta, kernel, cp, name, initial_state, doc_starts, scale)
    rows = [as_segment_rows(x, n) for x in (q, k, v, g, beta)]
    o = delta_rule_over_segments(*rows, cp, segment_kernel, name, doc_starts=as_segment_rows(doc_starts, n),
                                 initial_state=initial_state, scale=scale)
    return o.reshape(B, T, H, V)


def short_conv_over_shards(x_BTC, weight_C1W, bias_C, doc_starts_BT, cp: CPContext, name: str) -> torch.Tensor:
    """SiLU(causal depthwise conv + bias) of this rank's tokens: each segment reads the W-1 pre-conv
    tokens before it from their holder (cp/halo.py), document resets included."""
    n = len(cp.local_segments)
    B, T, C = x_BTC.shape
    W = weight_C1W.shape[-1]
    starts = as_segment_rows(doc_starts_BT, n)
    x, halo, halo_starts = conv_halo(as_segment_rows(x_BTC, n), starts, W - 1, cp, name, n)
    return causal_short_conv(x, weight_C1W, halo, starts, halo_starts, bias_C=bias_C).reshape(B, T, C)


def mamba2_mixer_over_shards(mixer, h_BTD, *, cp: CPContext, kernel: str = "torch", name: str = "mamba2",
                             doc_starts_BT=None) -> torch.Tensor:
    """A Mamba-2 mixer (transformers' parameterisation, titan_cp.ops.mamba2.mixing) on this rank's
    tokens: the conv through the halo, the SSD through ``cp.exchange`` (any of the three). Under TP x CP
    both see this TP rank's heads only (``Mamba2Weights.of(mixer)``): the halo carries their x | B | C
    channels, the exchange their summaries."""
    return mamba2_mixer(
        mixer, h_BTD, doc_starts_BT=doc_starts_BT,
        conv=lambda x, w, b, starts: short_conv_over_shards(x, w, b, starts, cp, name),
        ssd=lambda *a, **kw: kernel_over_shards(*a, kernel=mamba2.get_kernel(kernel),
                                                segment_kernel=mamba2.get_segment_kernel(kernel), cp=cp, name=name,
                                                scale=1.0, **kw),
    )


__all__ = ["kernel_over_shards", "mamba2_mixer_over_shards", "short_conv_over_shards"]
