r"""Mamba-2's SSD as a CP segment kernel: its transition is one scalar per head.

Inside a segment every token's transition is a_t I, so the segment's is

    M = prod_t a_t  (0 if a document starts in the segment)       [B, H, 1, 1]
    q_transition_t = scale q_t prod_{j <= t} a_j  (0 from a document start on)

(the engine treats a [.., 1, 1] transition as a scalar: M S, M2 M1 and M^T are the
scalar products, titan_cp/cp/state_passing.py). The forward is the plain kernel from
S_0 plus these closed forms, no extra state columns; the backward reruns the plain
kernel from the true start under autograd
(:class:`titan_cp.ops.gated_delta_rule.transition.RecomputingSegmentKernel`).
"""

from __future__ import annotations

from titan_cp.ops.gated_delta_rule.transition import RecomputingSegmentKernel, state_dtype


def scalar_transition(kernel):
    """The transition forward of an SSD kernel: (o, q_transition, S_local, M [B, H, 1, 1])."""

    def run(q, k, v, g, beta, *, scale=None, initial_state=None, doc_starts=None):
        o, S_local = kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True,
                            doc_starts=doc_starts)
        dtype = state_dtype(v)
        log_decay = g.to(dtype).cumsum(1)  # [B, T, H]
        P_BTH = log_decay.exp()
        if doc_starts is not None:
            P_BTH = P_BTH * (doc_starts.long().cumsum(1) == 0).to(dtype)[..., None]
        scale_ = 1.0 if scale is None else scale
        q_transition = scale_ * q.to(dtype) * P_BTH[..., None]
        M = P_BTH[:, -1, :, None, None]
        return o, q_transition, S_local, M

    return run


class ScalarSegmentKernel(RecomputingSegmentKernel):
    """A segment kernel whose transition M is a scalar per head ([B, H, 1, 1])."""

    scalar_transition = True

    def __init__(self, kernel):
        super().__init__(kernel, scalar_transition(kernel))


__all__ = ["ScalarSegmentKernel", "scalar_transition"]
