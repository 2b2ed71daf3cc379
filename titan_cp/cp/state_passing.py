"""State-passing CP for GDN: shard summaries, their exchange, the corrected outputs.

Everything in a GDN layer is token-local except the short convs and the gated
delta rule (titan_cp/ops/gated_delta_rule/mixing.py). With a state-passing strategy
(``parallelism.cp_exchange = 'allgather' | 'logscan'``) each rank:

  a. cuts its tokens into its segments (1 for contiguous, 2 for zigzag) and
     treats each segment as a row: [B, T, ...] -> [B * n_local, T_seg, ...];
  b. gets the W-1 pre-conv tokens before each segment (cp/halo.py) and runs
     the conv on [halo | segment];
  c. computes each segment's summary in one kernel pass, the kernel's
     transition forward (titan_cp/ops/gated_delta_rule/transition.py). Because the delta
     rule acts on every state column independently and linearly, running it
     from state [0 | I] with values [v | 0] (width V + K) gives
        final state  [S_local | M]          (zero-start state, transition)
        outputs      [o_local | q_t M_<=t]  (scale included).
     The rank holding only the sequence's first segment (incoming state 0)
     runs the plain forward;
  d. exchanges the summaries (below) to get each segment's true incoming
     state S_start, and corrects the outputs:
        o_t = o_local_t + (q_t M_<=t) S_start.
  Backward (:class:`_SegmentsWithStatePassing`, one autograd node for c + d):
  the gradient of each S_start through its segment's outputs,
  G = (q M)^T dO. q M comes from one of two places (``parallelism.cp_q_transition``,
  titan_cp/cp/settings.py): ``recompute`` (default) reruns it from the kernel's saved
  context (the segment kernel's ``q_transition``: nothing [T, H, K]-sized is kept for
  it, so a rank keeps what one rank keeps for its tokens plus the [K, K] transitions
  of the fold); ``keep`` saves it from the forward ([T, H, K] float32 per layer, one
  transition forward less in the backward). Then the exchange's reverse fold gives
  every segment's final-state gradient T; then each segment runs the plain
  kernel backward from its true start S_start (no transition columns: the
  segment's true outputs and final state are the plain kernel's from there).
  Autograd does the rest (the convs, the halo's reverse send).

Document starts (packed sequences) reset both the conv history and the state
(``doc_starts``); a segment with a document start has M = 0, so no state
crosses it.

The exchange math
-----------------
Cut a sequence into segments 0..n-1 (in sequence order; see cp/layout.py for
which rank holds which). Inside segment s the gated delta rule is affine in
the state it starts from (every column of S evolves independently and
linearly), so

    S_end(s) = M_s S_start(s) + S_local(s)                                  (1)

with M_s [K, K] per head (the product of the segment's transitions
a_t (I - beta_t k_t k_t^T), zero if a document starts inside s) and
S_local(s) [K, V] the final state from a zero start. The incoming states are
the exclusive fold of these affine maps:

    S_start(0) = 0,   S_start(s+1) = M_s S_start(s) + S_local(s)            (2)

Summaries compose associatively, (M2, S2) o (M1, S1) = (M2 M1, M2 S1 + S2),
so (2) can be computed by any prefix-scan schedule.

Backward. Let G_s = dL/dS_start(s) (from segment s's outputs) and
T_s = dL/dS_end(s) (through every later segment). Differentiating (2):

    T_{n-1} = 0,   T_{s-1} = G_s + M_s^T T_s                                (3)
    dL/dS_local(s) = T_s,   dL/dM_s = T_s S_start(s)^T

(3) is the fold (2) run over the segments in reverse with elements
(M_s^T, G_s): the backward is the same exchange on the state gradients.

Strategies (``parallelism.cp_exchange``)
----------------------------------------
- ``allgather``: one all-gather of every segment's [M | S_local]
  (H K (K+V) floats per segment and batch row, independent of L); each rank
  folds its predecessors locally. Backward: one all-gather of the G_s
  (H K V floats). Bytes received per rank: (n_segments - n_local) summaries;
  1 collective. Works for any layout.
- ``logscan``: a Hillis-Steele exclusive scan over the ranks (contiguous
  layout): in round d = 0..ceil(log2 P)-1 rank r sends its running inclusive
  aggregate to r + 2^d and composes what it gets from r - 2^d into both its
  inclusive and exclusive aggregates. ceil(log2 P) rounds, one summary sent
  and received per round. Backward: the mirrored (suffix) scan of (M^T, G).

Scalar transitions (Mamba-2: M_t = a_t I per head, titan_cp/ops/mamba2/). A segment
kernel with ``scalar_transition = True`` returns M as [B, H, 1, 1]; every product
above is then the scalar one (:func:`apply_transition`: M S, M2 M1, M^T = M), and
a summary is H (1 + K V) floats instead of H K (K + V). A [.., 1, 1] matrix and a
scalar are the same map, so the rule is exact for either kind.

Summaries travel in float32 (float64 for float64 inputs). The head-parallel
``alltoall`` strategy does not use summaries; it lives in cp/head_parallel.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from titan_cp.cp.comm import all_gather_stacked, exchange_p2p
from titan_cp.cp.context import CPContext, dtype_code
from titan_cp.cp.halo import conv_halo
from titan_cp.cp.layout import segments_of_rank
from titan_cp.ops.gated_delta_rule.mixing import GDNMixingInputs, conv_qkv, conv_qkv_input
from titan_cp.ops.gated_delta_rule import get_segment_kernel
from titan_cp.ops.denormals import flush_denormals
from titan_cp.ops.gated_delta_rule.transition import state_dtype


def apply_transition(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M X for a transition M [.., K, K] (matrix) or [.., 1, 1] (a scalar per head)."""
    return M * X if M.shape[-1] == 1 and M.shape[-2] == 1 else M @ X


def identity_transition_like(M: torch.Tensor) -> torch.Tensor:
    """The identity of M's kind: I [.., K, K] or ones [.., 1, 1]."""
    return torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)


def compose(
    later: tuple[torch.Tensor, torch.Tensor], earlier: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M2, S2) o (M1, S1) = (M2 M1, M2 S1 + S2): apply ``earlier`` then ``later``."""
    M2, S2 = later
    M1, S1 = earlier
    return apply_transition(M2, M1), apply_transition(M2, S1) + S2


def pack_summary(M: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """[.., m, m] and [.., K, V] -> one payload [.., m m + K V] (m = K, or 1 for a scalar)."""
    return torch.cat([M.flatten(-2), S.flatten(-2)], dim=-1).contiguous()


def unpack_summary(payload: torch.Tensor, m: int, S_shape) -> tuple[torch.Tensor, torch.Tensor]:
    lead = payload.shape[:-1]
    return payload[..., : m * m].reshape(*lead, m, m), payload[..., m * m:].reshape(*lead, *S_shape)


def exclusive_fold(Ms: list[torch.Tensor], Ss: list[torch.Tensor]) -> list[torch.Tensor]:
    """Equation (2) sequentially: the incoming state of every segment, in order."""
    starts = [torch.zeros_like(Ss[0])]
    for M, S in zip(Ms[:-1], Ss[:-1]):
        starts.append(apply_transition(M, starts[-1]) + S)
    return starts


# --------------------------------------------------------------------------- allgather
# Each strategy is a pair of functions: fold (forward: S_start of the local segments, and what
# its backward keeps) and reverse fold (backward: T = dL/dS_end of the local segments from G).


def _all_gather_segments(local_BNX: torch.Tensor, cp: CPContext, layer_name: str, kind: str) -> list[torch.Tensor]:
    """All-gather [B, n_local, ...] from every rank; return per-segment tensors in sequence order."""
    gathered = all_gather_stacked(local_BNX, cp, layer_name, kind)  # [P, B, n_local, ...]
    per_segment: list[torch.Tensor | None] = [None] * cp.n_segments
    for rank in range(cp.size):
        for i, seg in enumerate(segments_of_rank(rank, cp.size, cp.layout)):
            per_segment[seg] = gathered[rank, :, i]
    return per_segment  # type: ignore[return-value]


def _allgather_fold(M_BNHKK, S_BNHKV, cp: CPContext, layer_name: str):
    payload = pack_summary(M_BNHKK, S_BNHKV)
    m = M_BNHKK.shape[-1]
    per_segment = _all_gather_segments(payload, cp, layer_name, "state_fwd")
    Ms, Ss = zip(*(unpack_summary(p, m, S_BNHKV.shape[-2:]) for p in per_segment))
    with flush_denormals():  # M decays below normal floats (kernels/denormals.py)
        starts = exclusive_fold(Ms, Ss)
    mine = torch.stack([starts[s] for s in cp.local_segments], dim=1)
    # The reverse fold stops at this rank's first segment s0: it reads M_s of the later segments only.
    later = Ms[min(cp.local_segments) + 1:]
    return mine, (torch.stack(later),) if later else ()


def _allgather_reverse_fold(grad_start_BNHKV, saved, cp: CPContext, layer_name: str):
    grads = _all_gather_segments(grad_start_BNHKV, cp, layer_name, "state_bwd")  # G_s of every segment
    # Equation (3): the fold in reverse with elements (M^T, G), from the last segment down to
    # this rank's first one, s0 (saved: M_s for s > s0).
    n, first = cp.n_segments, min(cp.local_segments)
    Ms = saved[0] if saved else None
    grad_end = {}
    running = torch.zeros_like(grads[0])
    with flush_denormals():
        for s in range(n - 1, first - 1, -1):
            grad_end[s] = running
            if s > first:
                running = grads[s] + apply_transition(Ms[s - first - 1].transpose(-1, -2), running)
    return torch.stack([grad_end[s] for s in cp.local_segments], dim=1)


# --------------------------------------------------------------------------- logscan


def _exclusive_scan_over_ranks(
    M: torch.Tensor, S: torch.Tensor, cp: CPContext, reverse: bool, layer_name: str, kind: str
) -> torch.Tensor:
    """Hillis-Steele exclusive scan of (M, S) over ranks; returns the S part of the exclusive aggregate.

    ``reverse`` scans from the last rank to the first (the backward's suffix scan).
    Each round: send the running inclusive aggregate 2^d ranks ahead, receive
    from 2^d ranks behind, compose it under both aggregates.
    """
    P, me = cp.size, cp.rank
    pos = P - 1 - me if reverse else me  # position along the scan direction

    def rank_at(position: int) -> int:
        return P - 1 - position if reverse else position

    m = M.shape[-1]
    incl_M, incl_S = M, S
    excl_M = identity_transition_like(M)
    excl_S = torch.zeros_like(S)
    for d in range(math.ceil(math.log2(P))):
        offset = 2**d
        payload = pack_summary(incl_M, incl_S)
        received = torch.empty_like(payload)
        outgoing = [(payload, rank_at(pos + offset), 0)] if pos + offset < P else []
        incoming = [(received, rank_at(pos - offset), 0)] if pos - offset >= 0 else []
        exchange_p2p(cp, outgoing, incoming, layer_name, kind)
        if pos - offset >= 0:
            earlier = unpack_summary(received, m, S.shape[-2:])
            excl_M, excl_S = compose((excl_M, excl_S), earlier)
            incl_M, incl_S = compose((incl_M, incl_S), earlier)
    return excl_S


def _logscan_fold(M_BNHKK, S_BNHKV, cp: CPContext, layer_name: str):
    with flush_denormals():
        start = _exclusive_scan_over_ranks(M_BNHKK, S_BNHKV, cp, False, layer_name, "state_fwd")
    return start, (M_BNHKK,)


def _logscan_reverse_fold(grad_start_BNHKV, saved, cp: CPContext, layer_name: str):
    (M,) = saved
    with flush_denormals():
        return _exclusive_scan_over_ranks(M.transpose(-1, -2).contiguous(), grad_start_BNHKV.contiguous(), cp, True,
                                          layer_name, "state_bwd")


EXCHANGE_FOLDS = {"allgather": (_allgather_fold, _allgather_reverse_fold),
             "logscan": (_logscan_fold, _logscan_reverse_fold)}
"""Strategy name -> (fold, reverse fold). Fold: (M [B, n, H, K, K] or [B, n, H, 1, 1], S_local [B, n, H, K, V]) -> the
incoming states S_start [B, n, H, K, V] of the local segments and what the reverse fold keeps;
reverse fold: G = dL/dS_start through each local segment's own outputs -> T = dL/dS_end."""


def _exchange(cp: CPContext):
    if cp.exchange not in EXCHANGE_FOLDS:
        raise ValueError(f"state passing: strategy '{cp.exchange}' does not pass states")
    return EXCHANGE_FOLDS[cp.exchange]


# --------------------------------------------------------------------------- the layer's mixing


def as_segment_rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
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
            f"segments of layout '{cp.layout}'; shard the batch with titan_cp.cp.layout.rank_segments."
        )
    rows = replace(
        inp,
        **{name: as_segment_rows(getattr(inp, name), n)
           for name in ("q_BTC", "k_BTC", "v_BTC", "g_BTH", "beta_BTH", "doc_starts_BT")},
    )
    T_seg = T // n
    W = inp.q_conv_weight.shape[-1]
    cp.check_same_everywhere(
        layer_name,
        (dtype_code(inp.q_BTC.dtype), B, T_seg, inp.q_BTC.shape[-1], inp.v_BTC.shape[-1]),
        "(dtype, batch, segment length, key channels, value channels)",
    )

    # b. conv halo: pre-conv q|k|v plus a document-start channel, W-1 tokens per segment. Only
    # each segment's tail (its last min(T_seg, W-1) tokens) travels.
    starts = rows.doc_starts_BT
    x, halo, halo_starts = conv_halo(conv_qkv_input(rows), starts, W - 1, cp, layer_name, n)
    q, k, v = conv_qkv(rows, halo, halo_starts, x_BTC=x)

    # c + d. one kernel call per segment, the summary exchange, the corrected outputs.
    o = delta_rule_over_segments(q, k, v, rows.g_BTH, rows.beta_BTH, cp, kernel, layer_name, doc_starts=starts)
    Hv, V = v.shape[2:]
    return o.reshape(B, T, Hv, V)


def delta_rule_over_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cp: CPContext,
    kernel,
    layer_name: str,
    *,
    doc_starts: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Steps c and d on segment rows: q, k [B n, T_seg, H, K], v [B n, T_seg, H, V] (n local segments).

    One :class:`_SegmentsWithStatePassing` node. ``initial_state`` [B, H, K, V] is S_0 of
    segment 0 (folded into that segment's summary); the other segments start from 0 * it, so
    every rank gets a gradient for it (zero except on segment 0's rank). ``kernel``: a GDN
    kernel name, or any segment kernel object (e.g. Mamba-2's, titan_cp.ops.mamba2).
    """
    N, T_seg, H, V = v.shape
    n = len(cp.local_segments)
    initial_rows = None
    if initial_state is not None:
        initial = initial_state.to(state_dtype(v))
        initial_rows = torch.stack([initial if s == 0 else initial * 0 for s in cp.local_segments], dim=1)
        initial_rows = initial_rows.reshape(N, H, *initial.shape[-2:])
    segment_kernel = get_segment_kernel(kernel) if isinstance(kernel, str) else kernel
    return _SegmentsWithStatePassing.apply(q, k, v, g, beta, initial_rows, doc_starts, segment_kernel,
                                           cp, layer_name, scale, N // n)


class _SegmentsWithStatePassing(torch.autograd.Function):
    """Steps c and d of the module docstring as one autograd node, on segment rows [B n, T_seg, ...].

    forward:  (o_local, q M, S_local, M) <- the segment kernel's transition forward (the plain
              forward on the rank holding only the sequence's first segment, M = 0);
              S_start <- the fold of the exchange strategy;  o = o_local + (q M) S_start;
              the kernel's saved context is bound to S_start (its true start).
    backward: G = (q M)^T dO (the gradient of S_start through this segment's outputs; q M kept
              from the forward with ``cp.q_transition == 'keep'``, else recomputed by the segment
              kernel from its saved context);
              T = dL/dS_end <- the exchange's reverse fold of G;
              dq, dk, dv, dg, dbeta, dS_0 <- the kernel's plain backward from the true start, given dO, T.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_rows, doc_starts, segment_kernel, cp: CPContext, layer_name, scale,
                B):
        N, _, H, V = v.shape
        K = q.shape[-1]
        n = N // B
        with_transition = cp.local_segments != [0]  # else: only the sequence's first segment, S_start = 0
        seg = segment_kernel.forward(q, k, v, g, beta, scale=scale, initial_state=initial_rows,
                                     doc_starts=doc_starts, with_transition=with_transition)
        m = 1 if getattr(segment_kernel, "scalar_transition", False) else K
        M = seg.M if with_transition else seg.S_local.new_zeros(N, H, m, m)
        fold, _ = _exchange(cp)
        S_start, fold_saved = fold(M.reshape(B, n, H, m, m), seg.S_local.reshape(B, n, H, K, V), cp, layer_name)
        S_start = S_start.reshape(N, H, K, V)
        tensors, meta = seg.saved_tensors, seg.saved_meta
        o = seg.o
        if with_transition:
            with flush_denormals():  # q M decays below normal floats (kernels/denormals.py)
                correction_NHTV = seg.q_transition.transpose(1, 2) @ S_start
                o = o + correction_NHTV.transpose(1, 2).to(o.dtype)
            tensors, meta = segment_kernel.bind_incoming_state(tensors, meta, S_start)
        # q_transition: kept ('keep') or recomputed by the backward from the kernel's context ('recompute').
        kept = (seg.q_transition,) if with_transition and cp.q_transition == "keep" else ()
        ctx.save_for_backward(*kept, *fold_saved, *tensors)
        ctx.n_kept, ctx.n_fold_saved, ctx.kernel_meta, ctx.segment_kernel = len(kept), len(fold_saved), meta, \
            segment_kernel
        ctx.with_transition = with_transition
        ctx.cp, ctx.layer_name, ctx.shape = cp, layer_name, (B, n, H, K, V)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o_NTHV):
        saved = ctx.saved_tensors
        kept, rest = saved[: ctx.n_kept], saved[ctx.n_kept:]
        fold_saved, tensors = rest[: ctx.n_fold_saved], rest[ctx.n_fold_saved:]
        B, n, H, K, V = ctx.shape
        if not ctx.with_transition:  # no output depends on S_start
            G = d_o_NTHV.new_zeros(B * n, H, K, V, dtype=state_dtype(d_o_NTHV))
        else:
            q_transition_NTHK = kept[0] if kept else ctx.segment_kernel.q_transition(tensors, ctx.kernel_meta)
            with flush_denormals():
                G = q_transition_NTHK.permute(0, 2, 3, 1) @ d_o_NTHV.transpose(1, 2).to(q_transition_NTHK.dtype)
        _, reverse_fold = _exchange(ctx.cp)
        T = reverse_fold(G.reshape(B, n, H, K, V), fold_saved, ctx.cp, ctx.layer_name).reshape(B * n, H, K, V)
        d_q, d_k, d_v, d_g, d_beta, d_initial = ctx.segment_kernel.backward(tensors, ctx.kernel_meta, d_o_NTHV, T)
        return d_q, d_k, d_v, d_g, d_beta, d_initial, None, None, None, None, None, None
