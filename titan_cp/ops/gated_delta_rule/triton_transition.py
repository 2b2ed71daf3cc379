r"""The ``triton`` kernel as a CP segment kernel, on FLA's Triton pieces (``model.kernel = "triton"``).

The segment kernel contract is in :mod:`titan_cp.ops.gated_delta_rule.transition`: a transition
forward giving, for a segment, the outputs o and final state S_local from
``initial_state`` S_0 (zero if None), the segment's transition M [K, K] and
q_transition_t = scale q_t P_t (P_t: the transition from the segment start to t); then,
once the exchange gives the true incoming state S, the plain backward from the true
start S_0 + S.

The delta rule acts on every state column alike, so the forward carries the state as
[S | P] [K, V + K] from [S_0 | I]; the transition columns have no values. FLA's chunk
forward (``fla/ops/gated_delta_rule/chunk.py``, 0.6.0) is run step by step, with each
step at the width it needs (C = 64 tokens per chunk; g in log2 units, as FLA):

    g  <- chunk_local_cumsum(g)
    w, u, A <- chunk_gated_delta_rule_fwd_intra(k, v, g, beta)          width V   (WY factors)
    u+ = [u | 0]                                                         width V + K
    h, v_new, [S_local | M] <- chunk_gated_delta_rule_fwd_h(k, w, u+, g, h0 = [S_0 | I])
    [o | q_transition] <- chunk_fwd_o(q, k, v_new, h, g, scale)          width V + K

and keeps what FLA's own autograd Function keeps (q, k, v, the cumulated g, beta, A).
The backward is FLA's ``chunk_gated_delta_rule_bwd`` from h0 = S_0 + S with the
final-state gradient the exchange gives: exactly FLA's plain backward (it recomputes
w, u and the chunk states at width V), no transition columns. The plain forward (the
rank holding only the sequence's first segment) is the same steps at width V from S_0.

Against FLA's whole ``chunk_gated_delta_rule`` with values [v | 0], the WY step stays
at width V and the backward is plain. Against FLA's own op-level CP (``fla/ops/cp``: a
state-only pre-pass for [S_local | M], the exchange, then the plain kernel from the
true state, and a pre-pass in the backward too), no second state pass runs in either
direction: the forward's widening adds column blocks (more parallel Triton programs),
not sequential chunk steps. docs/benchmarks.md section 8.

Document starts become FLA varlen segments exactly as for the plain kernel
(:mod:`titan_cp.ops.gated_delta_rule.triton`): every segment after a row's first starts from zero,
so its transition columns stay zero (a document start inside a CP segment: M = 0); in
the backward the row's final-state gradient goes to its last varlen segment and the
start's gradient comes from its first.

The FLA calls are one :class:`VarlenSegmentOps` value, so CPU tests run the same
plumbing with a recurrent stand-in (tests/unit/test_triton_kernel.py), and FLA's real
kernels under the Triton interpreter against the ``torch`` segment kernel.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule.interface import check_inputs
from titan_cp.ops.gated_delta_rule.transition import SegmentForward, split_summary, state_dtype, transition_start, true_start
from titan_cp.ops.gated_delta_rule.triton import (
    CONFIG_HINT,
    VarlenLayout,
    row_final_state_grads,
    row_final_states,
    segment_initial_state_grads,
    segment_initial_states,
    varlen_layout,
)

CHUNK_SIZE = 64  # FLA's default for the gated delta rule


@functools.cache
def _fla():
    """FLA 0.6.0's chunk forward pieces and its plain chunk backward (imported on first use; the import warns about a missing GPU on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_fwd_o
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_bwd
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2
        from fla.ops.utils.index import prepare_chunk_indices
    return dict(
        fwd_h=chunk_gated_delta_rule_fwd_h, fwd_o=chunk_fwd_o, fwd_intra=chunk_gated_delta_rule_fwd_intra,
        local_cumsum=chunk_local_cumsum, rcp_ln2=RCP_LN2, chunk_indices=prepare_chunk_indices,
        bwd=chunk_gated_delta_rule_bwd,
    )


def _fla_forward(q, k, v, g, beta, start, scale, cu_seqlens, chunk_indices):
    """FLA's chunk forward from ``start`` [N, H, K, W] float32 (W = V: plain; W = V + K: [S_0 | I],
    the transition columns with zero values). Returns o [.., W] (input dtype), the final
    states [N, H, K, W] float32 and what the backward keeps (the cumulated g, A)."""
    fla = _fla()
    extra_columns = 0 if start is None else start.shape[-1] - v.shape[-1]
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=CHUNK_SIZE)
    g = fla["local_cumsum"](g, chunk_size=CHUNK_SIZE, scale=fla["rcp_ln2"], cu_seqlens=cu_seqlens,
                            chunk_indices=chunk_indices)
    w, u, A = fla["fwd_intra"](k=k, v=v, g=g, beta=beta, **common)
    h, v_new, final = fla["fwd_h"](k=k, w=w, u=F.pad(u, (0, extra_columns)), g=g, initial_state=start,
                                   output_final_state=True, **common)
    o = fla["fwd_o"](q=q, k=k, v=v_new, h=h, g=g, scale=scale, **common)
    return o, final, (g, A)


def _fla_backward(q, k, v, beta, saved, start, d_o, d_final, scale, cu_seqlens, chunk_indices):
    """FLA's plain chunk backward from ``start`` [N, H, K, V]: (dq, dk, dv, dg, dbeta, d start)."""
    g, A = saved
    dq, dk, dv, dbeta, dg, d_start, *_ = _fla()["bwd"](
        q=q, k=k, v=v, g=g, beta=beta, A=A, scale=scale, initial_state=start, do=d_o, dht=d_final,
        cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=CHUNK_SIZE)
    return dq, dk, dv, dg, dbeta, d_start


def _fla_chunk_indices(cu_seqlens, cu_seqlens_cpu):
    return _fla()["chunk_indices"](cu_seqlens, CHUNK_SIZE, cu_seqlens_cpu=cu_seqlens_cpu)


class VarlenSegmentOps(NamedTuple):
    """A varlen chunk kernel split for a segment kernel (FLA's calling convention: [1, total, ...]
    inputs with ``cu_seqlens``, or [B, T, ...] rows without; states [N, H, K, *] float32).

    forward(q, k, v, g, beta, start, scale, cu_seqlens, chunk_indices) -> (o, final, saved)
    backward(q, k, v, beta, saved, start, d_o, d_final, scale, cu_seqlens, chunk_indices)
        -> (dq, dk, dv, dg, dbeta, d start)
    chunk_indices(cu_seqlens, cu_seqlens_cpu) -> the kernel's chunk index table (or None)
    """

    forward: Callable
    backward: Callable
    chunk_indices: Callable


FLA_OPS = VarlenSegmentOps(_fla_forward, _fla_backward, _fla_chunk_indices)


class VarlenSegmentKernel:
    """A varlen kernel (:class:`VarlenSegmentOps`) as a CP segment kernel on [B, T] rows with
    document starts (:class:`titan_cp.ops.gated_delta_rule.transition.SegmentKernel`). ``require_cuda``: the
    Triton path refuses CPU tensors with the ``model.kernel`` hint (tests pass False)."""

    def __init__(self, ops: VarlenSegmentOps = FLA_OPS, require_cuda: bool = True):
        self.ops, self.require_cuda = ops, require_cuda

    def forward(self, q, k, v, g, beta, *, scale=None, initial_state=None, doc_starts=None, with_transition=True):
        check_inputs(q, k, v, g, beta, initial_state, doc_starts)
        if self.require_cuda and q.device.type != "cuda":
            raise RuntimeError(f"{CONFIG_HINT}. Got tensors on {q.device}.")
        B, T, H, K = q.shape
        V = v.shape[-1]
        scale = K ** -0.5 if scale is None else float(scale)
        states = state_dtype(v)  # FLA's states are float32 (float64 in float64 CPU tests)
        initial = None if initial_state is None else initial_state.to(states)
        start_rows = transition_start(initial, B, H, K, V, states, q.device) if with_transition else initial
        layout = None if doc_starts is None else varlen_layout(doc_starts, B, T)
        inputs = [_flat(x, layout) for x in (q, k, v, g, beta)]
        cu_seqlens = chunk_indices = None
        if layout is not None:
            cu_seqlens = layout.cu_seqlens
            chunk_indices = self.ops.chunk_indices(cu_seqlens, cu_seqlens.cpu())
        with torch.no_grad():
            o, final, saved = self.ops.forward(*inputs, _segment_states(start_rows, layout), scale, cu_seqlens,
                                               chunk_indices)
        o = o.reshape(B, T, *o.shape[2:])
        final = final if layout is None else row_final_states(final, layout)
        if with_transition:
            o, q_transition, S_local, M = split_summary(o, final, v)
        else:
            o, q_transition, S_local, M = o.to(v.dtype), None, final, None
        rows = (None,) * 3 if layout is None else (layout.first_segment_of_row, layout.last_segment_of_row,
                                                   layout.row_keeps_state)
        tensors = (*inputs, initial, cu_seqlens, chunk_indices, *rows, *saved)
        meta = (scale, B, T, initial_state is not None, [x.dtype for x in (q, k, v, g, beta)])
        return SegmentForward(o, q_transition, S_local, M, tensors, meta)

    def bind_incoming_state(self, tensors, meta, incoming_state):
        if incoming_state is None:
            return tensors, meta
        start = true_start(tensors[5], incoming_state.to(state_dtype(tensors[2])))
        return (*tensors[:5], start, *tensors[6:]), meta

    def q_transition(self, tensors, meta):
        """The transition forward at width V + K once more, from [0 | I]; its q_transition alone."""
        q, k, v, g, beta, _, cu_seqlens, chunk_indices, first, last, keeps, *_ = tensors
        scale, B, T = meta[:3]
        layout = None if cu_seqlens is None else VarlenLayout(cu_seqlens, first, last, keeps)
        H, K, V = q.shape[2], q.shape[3], v.shape[-1]
        start_rows = transition_start(None, B, H, K, V, state_dtype(v), q.device)
        with torch.no_grad():
            o = self.ops.forward(q, k, v, g, beta, _segment_states(start_rows, layout), scale, cu_seqlens,
                                 chunk_indices)[0]
        return o.reshape(B, T, *o.shape[2:])[..., V:].to(state_dtype(v))

    def backward(self, tensors, meta, d_o, d_final_state):
        q, k, v, g, beta, start_rows, cu_seqlens, chunk_indices, first, last, keeps, *saved = tensors
        scale, B, T, has_initial_state, dtypes = meta
        layout = None if cu_seqlens is None else VarlenLayout(cu_seqlens, first, last, keeps)
        d_final = d_final_state.to(state_dtype(v))
        if layout is not None:  # each row's final-state gradient belongs to its last varlen segment
            d_final = row_final_state_grads(d_final, layout)
        grads = self.ops.backward(q, k, v, beta, tuple(saved), _segment_states(start_rows, layout),
                                  _flat(d_o, layout).to(q.dtype).contiguous(), d_final.contiguous(), scale,
                                  cu_seqlens, chunk_indices)
        *d_inputs, d_start = grads
        d_inputs = [d.reshape(B, T, *d.shape[2:]).to(dtype) for d, dtype in zip(d_inputs, dtypes)]
        if not has_initial_state:
            return (*d_inputs, None)
        if layout is not None:  # a row's start gradient is its first segment's (0 if it begins a document)
            d_start = segment_initial_state_grads(d_start, layout)
        return (*d_inputs, d_start)


def _flat(x: torch.Tensor, layout) -> torch.Tensor:
    """[B, T, ...] rows -> FLA's varlen [1, B * T, ...] (rows as they are without a layout)."""
    return (x if layout is None else x.reshape(1, -1, *x.shape[2:])).contiguous()


def _segment_states(start_rows: torch.Tensor | None, layout) -> torch.Tensor | None:
    if start_rows is None or layout is None:
        return None if start_rows is None else start_rows.contiguous()
    return segment_initial_states(start_rows, layout).contiguous()


__all__ = ["FLA_OPS", "VarlenSegmentKernel", "VarlenSegmentOps"]
