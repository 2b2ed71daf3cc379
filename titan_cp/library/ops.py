r"""Op-level CP for people with their own layers: the gated delta rule and softmax attention.

The gated delta rule under CP
-----------------------------
Per head (state S: [K, V]; a_t = exp(g_t)):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = scale * S_t^T q_t

Each rank holds segments of the sequence (the CP layout). Inside a segment
the final state is affine in the incoming one, S_end = M S_start + S_local,
so a rank

  1. computes per segment, in one kernel pass, the outputs o_local and final
     state S_local from S_0 (``initial_state`` for segment 0, zero for the
     others), the transition M and q_t M_<=t: the delta rule acts on every state
     column alike, so M rides as K extra state columns from [S_0 | I]
     (the kernel's transition forward, ``titan_cp.ops.gated_delta_rule.transition``; the
     rank holding only segment 0 runs the plain forward);
  2. exchanges the summaries (M, S_local) over the CP group (``cp.exchange``:
     ``allgather`` or ``logscan``; K (K + V) floats per head and segment, not
     per token) and folds its predecessors' into its true S_start;
  3. corrects its outputs: o_t = o_local_t + (q_t M_<=t) S_start.

The backward: G = (q M)^T dO from each segment's outputs, the exchange's
reverse fold gives each segment's final-state gradient, then the plain kernel
backward from the segment's true start S_0 + S_start (no transition columns). This
is exactly what a single process computes on the whole sequence, for any
batch size, with document starts (a start inside a segment makes its M zero:
no state crosses it) and with an initial state (the rank holding segment 0
folds it into its summary; its gradient arrives on that rank, the others get
zeros). FLA's op-level
CP (``fla.ops.cp``) needs B == 1 and no initial state.
"""

from __future__ import annotations

import math

import torch

from titan_cp.cp.context import CPContext, dtype_code
from titan_cp.cp.state_passing import as_segment_rows, delta_rule_over_segments
from titan_cp.cp.ring_attention import ring_attention as _ring_attention
from titan_cp.errors import ConfigError
from titan_cp.ops.gated_delta_rule import check_inputs, get_kernel


def gated_delta_rule(
    q_BTHK: torch.Tensor,
    k_BTHK: torch.Tensor,
    v_BTHV: torch.Tensor,
    g_BTH: torch.Tensor,
    beta_BTH: torch.Tensor,
    *,
    cp: CPContext | None = None,
    kernel: str = "torch",
    scale: float | None = None,
    initial_state_BHKV: torch.Tensor | None = None,
    doc_starts_BT: torch.Tensor | None = None,
    name: str = "gated_delta_rule",
) -> torch.Tensor:
    """The gated delta rule on this rank's shards of (q, k, v, g, beta); returns o [B, T, H, V].

    q, k [B, T, H, K] (L2-normalised), v [B, T, H, V], g [B, T, H] (log decay <= 0),
    beta [B, T, H]: this rank's tokens, as :func:`titan_cp.shard_sequence` cuts them.
    ``doc_starts_BT`` [B, T] bool: this rank's shard of the document starts (packed rows).
    ``initial_state_BHKV`` [B, H, K, V]: the state before the sequence's first token (pass
    the same tensor on every rank; the rank holding segment 0 uses it, so its gradient is
    nonzero there and zero on the other ranks: sum it over the group). ``kernel``: ``torch``,
    ``recurrent`` or ``triton``. ``scale`` defaults to K ** -0.5. ``cp`` None: no CP.
    Every rank must call it with the same shapes and dtype (checked once per ``name``).
    """
    run = get_kernel(kernel)  # an unknown or unusable kernel fails here, on every rank
    check_inputs(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, initial_state_BHKV, doc_starts_BT)
    scale = q_BTHK.shape[-1] ** -0.5 if scale is None else scale
    if cp is None or cp.size == 1:
        o, _ = run(q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH, scale=scale,
                   initial_state=initial_state_BHKV, doc_starts=doc_starts_BT)
        return o
    if cp.exchange == "alltoall":
        raise ConfigError(
            "gated_delta_rule(cp=...): exchange 'alltoall' is head-parallel and works on whole layers "
            "(titan_cp.make_cp_aware); the op-level call passes states: use cp_context(exchange='allgather') "
            "or 'logscan'."
        )
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    n = len(cp.local_segments)
    if T % n:
        raise ValueError(
            f"{name}: this rank holds {T} tokens, not divisible into its {n} segments of layout "
            f"'{cp.layout}'; shard the batch with titan_cp.shard_sequence."
        )
    T_seg = T // n
    cp.check_same_everywhere(name, (dtype_code(v_BTHV.dtype), B, T_seg, H, K, V),
                             "(dtype, batch, segment length, heads, K, V)")

    rows = [as_segment_rows(x, n) for x in (q_BTHK, k_BTHK, v_BTHV, g_BTH, beta_BTH)]
    o = delta_rule_over_segments(*rows, cp, kernel, name, doc_starts=as_segment_rows(doc_starts_BT, n),
                                 initial_state=initial_state_BHKV, scale=scale)
    return o.reshape(B, T, H, V)


def ring_attention(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    *,
    cp: CPContext | None = None,
    scale: float | None = None,
    doc_ids_BT: torch.Tensor | None = None,
    name: str = "attention",
) -> torch.Tensor:
    """Causal softmax attention over the CP ring on this rank's shards; returns out [B, Hq, T, D].

    q [B, Hq, T, D], k/v [B, Hkv, T, D] (Hq a multiple of Hkv: GQA), this rank's tokens.
    ``doc_ids_BT`` [B, T] (integer, non-decreasing along the full sequence, e.g. the global
    index of each token's document start) keeps attention inside documents. ``scale``
    defaults to D ** -0.5. Differentiable in q, k, v.
    """
    scale = 1.0 / math.sqrt(q_BHTD.shape[-1]) if scale is None else scale
    return _ring_attention(q_BHTD, k_BHTD, v_BHTD, cp, scale=scale, doc_ids=doc_ids_BT, layer_name=name)
