r"""The CP segment summary on FLA's Triton pieces, in one pass (``model.kernel = "triton"``).

Same contract as the ``torch`` kernel's
:func:`titan_cp.kernels.chunk.chunk_gated_delta_rule_with_transition`: for a segment,
the outputs o and final state S_local from ``initial_state`` (zero if None), the
segment's transition M [K, K] and q_transition_t = scale q_t P_t (P_t: the transition
from the segment start to t), so that the outputs for a true incoming state S are
o_t + q_transition_t S (titan_cp/cp/state_passing.py).

The delta rule acts on every state column alike, so the state is carried as
[S | P] [K, V + K] from [S_0 | I]; the transition columns have no values. FLA's chunk
algorithm (``fla/ops/gated_delta_rule/chunk.py``, 0.6.0) is run step by step, with
each step at the width it needs (C = 64 tokens per chunk; g in log2 units, as FLA):

forward
    g  <- chunk_local_cumsum(g)
    w, u, A <- chunk_gated_delta_rule_fwd_intra(k, v, g, beta)          width V   (WY factors)
    u+ = [u | 0]                                                         width V + K
    h, v_new, [S_local | M] <- chunk_gated_delta_rule_fwd_h(k, w, u+, g, h0 = [S_0 | I])
    [o | q_transition] <- chunk_fwd_o(q, k, v_new, h, g, scale)          width V + K
backward, from do, d q_transition, d[S_local | M]
    w, u (V) and h (V + K) recomputed; do+ = [do | d q_transition]
    dv <- chunk_bwd_dv_local(q, k, g, do+)                               width V + K
    dh, dh0, dv <- chunk_gated_delta_rule_bwd_dhu(q, k, w, g, h0, dht = d[S_local | M], do+, dv)
    dq, dk, dw, dg <- chunk_bwd_dqkwg(q, k, v_new, w, g, h, dv, do+, dh)
    dk', dv, dbeta, dg' <- prepare_wy_repr_bwd(k, v, beta, g, A, dw, du = dv[..., :V])   width V
    dg <- reverse chunk_local_cumsum(dg + dg')

Against the kernel-interface form (FLA's whole ``chunk_gated_delta_rule`` with values
[v | 0]), this keeps the WY step, its backward and the saved values at width V; the
state pass, the outputs and their backward carry the K transition columns either way.
Against FLA's own op-level CP (``fla/ops/cp``: a state-only pre-pass for [S_local | M],
the exchange, then the plain kernel from the true state), it runs no second state pass
in either direction; the widening adds column blocks (more parallel Triton programs) to
the kernels it touches, not sequential chunk steps. docs/benchmarks.md section 8.

Document starts become FLA varlen segments exactly as for the plain kernel
(:mod:`titan_cp.kernels.triton`): every segment after a row's first starts from zero,
so its transition columns stay zero (a document start inside a CP segment: M = 0).

CPU testing: tests/test_triton_kernel.py runs this with FLA's real kernels under the
Triton interpreter against the ``torch`` kernel's transition form.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from titan_cp.kernels.interface import check_inputs
from titan_cp.kernels.transition import split_summary, transition_start
from titan_cp.kernels.triton import CONFIG_HINT, call_rows_as_varlen

CHUNK_SIZE = 64  # FLA's default for the gated delta rule


@functools.cache
def _fla():
    """FLA 0.6.0's chunk pieces (imported on first use; the import warns about a missing GPU on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local, chunk_fwd_o
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2
        from fla.ops.utils.index import prepare_chunk_indices
    return dict(
        bwd_dhu=chunk_gated_delta_rule_bwd_dhu, fwd_h=chunk_gated_delta_rule_fwd_h, bwd_dqkwg=chunk_bwd_dqkwg,
        bwd_dv_local=chunk_bwd_dv_local, fwd_o=chunk_fwd_o, fwd_intra=chunk_gated_delta_rule_fwd_intra,
        wy_bwd=prepare_wy_repr_bwd, recompute_w_u=recompute_w_u_fwd, local_cumsum=chunk_local_cumsum,
        rcp_ln2=RCP_LN2, chunk_indices=prepare_chunk_indices,
    )


class _FLASegmentSummary(torch.autograd.Function):
    """q, k [1|B, T, H, K], v [.., V], g, beta [.., H] (FLA layout, varlen when cu_seqlens is
    given); start [N, H, K, V + K] float32 = [S_0 | I] per sequence. Returns
    [o | q_transition] [.., V + K] (input dtype) and [S_local | M] [N, H, K, V + K] float32."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, start, scale, cu_seqlens, chunk_indices):
        fla = _fla()
        K = k.shape[-1]
        common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=CHUNK_SIZE)
        g = fla["local_cumsum"](g, chunk_size=CHUNK_SIZE, scale=fla["rcp_ln2"], cu_seqlens=cu_seqlens,
                                chunk_indices=chunk_indices)
        w, u, A = fla["fwd_intra"](k=k, v=v, g=g, beta=beta, **common)
        h, v_new, final = fla["fwd_h"](k=k, w=w, u=F.pad(u, (0, K)), g=g, initial_state=start,
                                       output_final_state=True, **common)
        o = fla["fwd_o"](q=q, k=k, v=v_new, h=h, g=g, scale=scale, **common)
        ctx.save_for_backward(q, k, v, g, beta, A, start, cu_seqlens, chunk_indices)
        ctx.scale = scale
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final):
        fla = _fla()
        q, k, v, g, beta, A, start, cu_seqlens, chunk_indices = ctx.saved_tensors
        K, V = k.shape[-1], v.shape[-1]
        common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=CHUNK_SIZE)
        w, u = fla["recompute_w_u"](k=k, v=v, beta=beta, A=A, g=g, cu_seqlens=cu_seqlens,
                                    chunk_indices=chunk_indices)
        h, v_new, _ = fla["fwd_h"](k=k, w=w, u=F.pad(u, (0, K)), g=g, initial_state=start,
                                   output_final_state=False, **common)
        d_o = d_o.to(q.dtype).contiguous()
        dv = fla["bwd_dv_local"](q=q, k=k, g=g, do=d_o, scale=ctx.scale, **common)
        dh, d_start, dv = fla["bwd_dhu"](q=q, k=k, w=w, g=g, h0=start, dht=d_final.float().contiguous(), do=d_o,
                                         dv=dv, scale=ctx.scale, **common)
        dq, dk, dw, dg = fla["bwd_dqkwg"](q=q, k=k, v=v_new, w=w, g=g, h=h, dv=dv, do=d_o, dh=dh, scale=ctx.scale,
                                          **common)
        # The transition columns of u+ are constant zeros: only the V value columns reach v.
        dk_wy, dv, dbeta, dg_wy = fla["wy_bwd"](k=k, v=v, beta=beta, g=g, A=A, dw=dw,
                                                du=dv[..., :V].contiguous(), cu_seqlens=cu_seqlens,
                                                chunk_indices=chunk_indices)
        dk.add_(dk_wy)
        dg.add_(dg_wy)
        dg = fla["local_cumsum"](dg, chunk_size=CHUNK_SIZE, reverse=True, cu_seqlens=cu_seqlens,
                                 chunk_indices=chunk_indices)
        return dq.to(q), dk.to(k), dv.to(v), dg.to(g), dbeta.to(beta), d_start, None, None, None


def fla_varlen_with_transition(q, k, v, g, beta, *, scale, initial_state, cu_seqlens, cu_seqlens_cpu):
    """:class:`_FLASegmentSummary` in FLA's varlen calling convention (``initial_state`` = [S_0 | I] per
    sequence): returns [o | q_transition] and [S_local | M]."""
    chunk_indices = None
    if cu_seqlens is not None:
        chunk_indices = _fla()["chunk_indices"](cu_seqlens, CHUNK_SIZE, cu_seqlens_cpu=cu_seqlens_cpu)
    return _FLASegmentSummary.apply(*(x.contiguous() for x in (q, k, v, g, beta)), initial_state.contiguous(),
                                    scale, cu_seqlens, chunk_indices)


def gated_delta_rule_with_transition_via_varlen(summary_varlen, q, k, v, g, beta, *, scale=None,
                                                initial_state=None, doc_starts=None):
    """The transition form on top of a varlen summary function (FLA's, or a CPU stand-in in tests).

    ``summary_varlen(q, k, v, g, beta, *, scale, initial_state, cu_seqlens, cu_seqlens_cpu)`` returns
    [o | q_transition] and [S_local | M] from [S_0 | I]. Returns o [B, T, H, V] (dtype of v),
    q_transition [B, T, H, K], S_local [B, H, K, V] and M [B, H, K, K] (float32).
    """
    check_inputs(q, k, v, g, beta, initial_state, doc_starts)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    start = transition_start(initial_state, B, H, K, V, torch.float32, q.device)  # FLA's states are float32
    (o_and_q_transition,), final = call_rows_as_varlen(summary_varlen, (q, k, v, g, beta), start, doc_starts,
                                                       scale=scale)
    return split_summary(o_and_q_transition, final, v)


def triton_gated_delta_rule_with_transition(q, k, v, g, beta, *, scale=None, initial_state=None, doc_starts=None):
    """The CP segment summary with FLA's Triton kernels (CUDA only); see the module docstring."""
    if q.device.type != "cuda":
        raise RuntimeError(f"{CONFIG_HINT}. Got tensors on {q.device}.")
    return gated_delta_rule_with_transition_via_varlen(fla_varlen_with_transition, q, k, v, g, beta, scale=scale,
                                                       initial_state=initial_state, doc_starts=doc_starts)


__all__ = [
    "fla_varlen_with_transition",
    "gated_delta_rule_with_transition_via_varlen",
    "triton_gated_delta_rule_with_transition",
]
