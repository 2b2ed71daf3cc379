"""FLA's KDA Triton chunk kernel (``fla.ops.kda.chunk_kda``) behind titan_cp's kernel signature.

Rows with document starts become FLA's varlen sequences (``cu_seqlens``) by the same
conversion as GDN's Triton kernel (titan_cp/ops/gated_delta_rule/triton.py,
``call_rows_as_varlen``). q, k arrive L2-normalised and g as the log decay, so FLA's
in-kernel l2norm / gate / beta-sigmoid options stay off. Needs a CUDA GPU (or, in tests,
the Triton interpreter: tests/support/triton_interpreter.py).
"""

from __future__ import annotations

from titan_cp.ops.gated_delta_rule.triton import call_rows_as_varlen
from titan_cp.ops.kda.recurrent import check_kda_inputs


def fla_kda_varlen(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu):
    from fla.ops.kda import chunk_kda  # FLA's package import pulls Triton: only when this kernel runs

    o, final = chunk_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    return o.to(v.dtype), final


def triton_kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, doc_starts=None):
    check_kda_inputs(q, k, v, g, beta, initial_state, doc_starts)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    (o,), final = call_rows_as_varlen(fla_kda_varlen, (q, k, v, g, beta), initial_state, doc_starts,
                                      scale=scale, output_final_state=output_final_state)
    return o, final


__all__ = ["fla_kda_varlen", "triton_kda"]
