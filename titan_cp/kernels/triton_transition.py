r"""The transition forward of a CP segment on FLA's Triton pieces (``model.kernel = "triton"``).

For a segment: the outputs o and final state S_local from ``initial_state`` (zero if
None), the segment's transition M [K, K] and q_transition_t = scale q_t P_t (P_t: the
transition from the segment start to t), so that the outputs for a true incoming state
S are o_t + q_transition_t S (titan_cp/kernels/transition.py). The backward is not here:
a CP segment's backward is the plain kernel's from its true start S_0 + S
(:class:`titan_cp.kernels.transition.RecomputingSegmentKernel` over FLA's own
``chunk_gated_delta_rule``).

The delta rule acts on every state column alike, so the state is carried as
[S | P] [K, V + K] from [S_0 | I]; the transition columns have no values. FLA's chunk
forward (``fla/ops/gated_delta_rule/chunk.py``, 0.6.0) is run step by step, with each
step at the width it needs (C = 64 tokens per chunk; g in log2 units, as FLA):

    g  <- chunk_local_cumsum(g)
    w, u, A <- chunk_gated_delta_rule_fwd_intra(k, v, g, beta)          width V   (WY factors)
    u+ = [u | 0]                                                         width V + K
    h, v_new, [S_local | M] <- chunk_gated_delta_rule_fwd_h(k, w, u+, g, h0 = [S_0 | I])
    [o | q_transition] <- chunk_fwd_o(q, k, v_new, h, g, scale)          width V + K

Against FLA's whole ``chunk_gated_delta_rule`` with values [v | 0], this keeps the WY
step at width V. Against FLA's own op-level CP (``fla/ops/cp``: a state-only pre-pass
for [S_local | M], the exchange, then the plain kernel from the true state), it runs no
second state pass before the exchange: the widening adds column blocks (more parallel
Triton programs), not sequential chunk steps. docs/benchmarks.md section 8.

Document starts become FLA varlen segments exactly as for the plain kernel
(:mod:`titan_cp.kernels.triton`): every segment after a row's first starts from zero,
so its transition columns stay zero (a document start inside a CP segment: M = 0).

CPU testing: tests/test_triton_kernel.py runs this with FLA's real kernels under the
Triton interpreter against the ``torch`` kernel's transition forward.
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
    """FLA 0.6.0's chunk forward pieces (imported on first use; the import warns about a missing GPU on CPU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_fwd_o
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
        from fla.ops.utils import chunk_local_cumsum
        from fla.ops.utils.constant import RCP_LN2
        from fla.ops.utils.index import prepare_chunk_indices
    return dict(
        fwd_h=chunk_gated_delta_rule_fwd_h, fwd_o=chunk_fwd_o, fwd_intra=chunk_gated_delta_rule_fwd_intra,
        local_cumsum=chunk_local_cumsum, rcp_ln2=RCP_LN2, chunk_indices=prepare_chunk_indices,
    )


def _fla_transition_forward(q, k, v, g, beta, start, scale, cu_seqlens, chunk_indices):
    """q, k [1|B, T, H, K], v [.., V], g, beta [.., H] (FLA layout, varlen when cu_seqlens is
    given); start [N, H, K, V + K] float32 = [S_0 | I] per sequence. Returns
    [o | q_transition] [.., V + K] (input dtype) and [S_local | M] [N, H, K, V + K] float32."""
    fla = _fla()
    K = k.shape[-1]
    common = dict(cu_seqlens=cu_seqlens, chunk_indices=chunk_indices, chunk_size=CHUNK_SIZE)
    g = fla["local_cumsum"](g, chunk_size=CHUNK_SIZE, scale=fla["rcp_ln2"], cu_seqlens=cu_seqlens,
                            chunk_indices=chunk_indices)
    w, u, _ = fla["fwd_intra"](k=k, v=v, g=g, beta=beta, **common)
    h, v_new, final = fla["fwd_h"](k=k, w=w, u=F.pad(u, (0, K)), g=g, initial_state=start,
                                   output_final_state=True, **common)
    o = fla["fwd_o"](q=q, k=k, v=v_new, h=h, g=g, scale=scale, **common)
    return o, final


def fla_varlen_with_transition(q, k, v, g, beta, *, scale, initial_state, cu_seqlens, cu_seqlens_cpu):
    """:func:`_fla_transition_forward` in FLA's varlen calling convention (``initial_state`` = [S_0 | I] per
    sequence): returns [o | q_transition] and [S_local | M]."""
    chunk_indices = None
    if cu_seqlens is not None:
        chunk_indices = _fla()["chunk_indices"](cu_seqlens, CHUNK_SIZE, cu_seqlens_cpu=cu_seqlens_cpu)
    with torch.no_grad():
        return _fla_transition_forward(*(x.contiguous() for x in (q, k, v, g, beta)), initial_state.contiguous(),
                                       scale, cu_seqlens, chunk_indices)


def gated_delta_rule_with_transition_via_varlen(summary_varlen, q, k, v, g, beta, *, scale=None,
                                                initial_state=None, doc_starts=None):
    """The transition forward on top of a varlen summary function (FLA's, or a CPU stand-in in tests).

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
