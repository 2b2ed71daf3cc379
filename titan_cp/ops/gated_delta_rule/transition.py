r"""A kernel as CP sees it: the segment kernel (transition forward, plain backward from the true start).

Under state-passing CP (titan_cp/cp/state_passing.py) every segment but the sequence's
first is computed before its incoming state S is known. Its forward needs, besides the
outputs o and final state S_local from ``initial_state`` S_0 (zero if None):

    M [B, H, K, K]                 the segment's transition: S_end = M S + S_local
    q_transition [B, T, H, K]      scale q_t P_t, P_t the transition from the segment start to t,

so that the true outputs are o_t + q_transition_t S. The delta rule acts on every state
column independently and linearly, so running it from [S_0 | I] with values [v | 0]
(width V + K) gives final state [S_local | M] and outputs [o | q_transition]: the
*transition forward*.

The backward needs no transition columns. The segment's true outputs and final state are
the plain kernel's from the true start S_0 + S, so the gradients of q, k, v, g, beta are
the plain backward from that start, given dO and the final state's gradient T (from the
exchange's reverse fold). What the exchange needs first, the gradient of S through this
segment's outputs, G = q_transition^T dO, needs q_transition alone, so the ranks' backward
passes stay parallel. By default (``parallelism.cp_q_transition = 'recompute'``)
q_transition is not kept from the forward ([T, H, K] in float32 per layer, 3.3% of a
Qwen3.5 debug GDN layer's saved bytes): the segment kernel recomputes it in the backward
from the context it saves anyway (``q_transition``), so a CP rank keeps what one rank keeps
for the same tokens; ``'keep'`` saves it instead (cp/state_passing.py). Against carrying the K columns through the backward
too, this drops every width-(V + K) product of the backward (docs/benchmarks.md section 8).

A :class:`SegmentKernel` does the three steps:

- ``forward(..., with_transition)``: (o, q_transition, S_local, M) and a saved context,
  no autograd; ``with_transition=False`` is the plain forward (the sequence's first
  segment, whose incoming state is 0: q_transition and M are None);
- ``bind_incoming_state(saved, S)``: the context once S is known (None: plain forward);
- ``q_transition(saved)``: q_transition of a transition forward again, from its context
  (bound or not: q_transition does not depend on the start);
- ``backward(saved, dO, T)``: dq, dk, dv, dg, dbeta and the gradient of S_0.

Implementations (:func:`titan_cp.ops.gated_delta_rule.get_segment_kernel` by name):

- ``torch``: native (:class:`titan_cp.ops.gated_delta_rule.chunk.ChunkSegmentKernel`): the transition
  columns ride only through the chunk loop and the outputs; the saved chunk states become
  the true ones, so the backward is the plain hand-written one;
- any other kernel (:class:`RecomputingSegmentKernel`): the transition forward (FLA's
  pieces for ``triton``, :mod:`titan_cp.ops.gated_delta_rule.triton_transition`; values [v | 0] from
  [S_0 | I] through the kernel interface otherwise), and a backward that reruns the plain
  kernel from the true start under autograd.

o is in the dtype of v; q_transition, S_local and M in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule.interface import GatedDeltaRuleKernel


class SegmentForward(NamedTuple):
    o: torch.Tensor  # [B, T, H, V] outputs from S_0
    q_transition: torch.Tensor | None  # [B, T, H, K]; None for a plain forward
    S_local: torch.Tensor  # [B, H, K, V] final state from S_0
    M: torch.Tensor | None  # [B, H, K, K]; None for a plain forward
    saved_tensors: tuple[torch.Tensor | None, ...]  # for ctx.save_for_backward
    saved_meta: Any


class SegmentKernel(Protocol):
    def forward(self, q, k, v, g, beta, *, scale: float | None = None, initial_state: torch.Tensor | None = None,
                doc_starts: torch.Tensor | None = None, with_transition: bool = True) -> SegmentForward: ...

    def bind_incoming_state(self, tensors: tuple, meta: Any, incoming_state: torch.Tensor | None
                            ) -> tuple[tuple, Any]: ...

    def q_transition(self, tensors: tuple, meta: Any) -> torch.Tensor: ...

    def backward(self, tensors: tuple, meta: Any, d_o: torch.Tensor, d_final_state: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]: ...


def state_dtype(v: torch.Tensor) -> torch.dtype:
    """The dtype states (and q_transition) are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=8)
def _identity_start(B: int, H: int, K: int, V: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    start = torch.zeros(B, H, K, V + K, dtype=dtype, device=device)
    start[..., V:] = torch.eye(K, dtype=dtype, device=device)
    return start


def transition_start(initial_state: torch.Tensor | None, B: int, H: int, K: int, V: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """[S_0 | I] [B, H, K, V + K], the state the transition forward starts from (S_0 = 0 if None;
    that constant is built once per shape and must not be modified)."""
    identity = _identity_start(B, H, K, V, dtype, device)
    if initial_state is None:
        return identity
    return torch.cat([initial_state.to(dtype), identity[..., V:]], dim=-1)


def true_start(initial_state: torch.Tensor | None, incoming_state: torch.Tensor) -> torch.Tensor:
    """The segment's true start S_0 + S (S_0 = 0 if None), in the incoming state's dtype."""
    return incoming_state if initial_state is None else initial_state.to(incoming_state.dtype) + incoming_state


def split_summary(o_and_q_transition: torch.Tensor, final: torch.Tensor, v: torch.Tensor):
    """[o | q_transition], [S_local | M] -> (o, q_transition, S_local, M) (q_transition copied
    out, so that keeping it for the backward does not keep the whole [o | q_transition])."""
    V = v.shape[-1]
    q_transition = o_and_q_transition[..., V:].to(state_dtype(v), copy=True)
    return o_and_q_transition[..., :V].to(v.dtype), q_transition, final[..., :V], final[..., V:]


def transition_via_interface(kernel: GatedDeltaRuleKernel):
    """The transition forward of any kernel, through its interface: values [v | 0] from [S_0 | I].
    Returns (o, q_transition, S_local, M)."""

    def run(q, k, v, g, beta, *, scale=None, initial_state=None, doc_starts=None):
        B, _, H, K = q.shape
        V = v.shape[-1]
        start = transition_start(initial_state, B, H, K, V, state_dtype(v), v.device)
        o_padded, final = kernel(q, k, F.pad(v, (0, K)), g, beta, scale=scale, initial_state=start,
                                 output_final_state=True, doc_starts=doc_starts)
        return split_summary(o_padded, final, v)

    return run


class RecomputingSegmentKernel:
    """A segment kernel from any kernel with autograd: the transition forward ``transition``
    (default: :func:`transition_via_interface`), and a backward that runs ``kernel`` again from
    the true start S_0 + S under autograd and backpropagates dO and T through it (one plain
    forward more than a native backward, no transition columns)."""

    def __init__(self, kernel: GatedDeltaRuleKernel, transition=None):
        self.kernel = kernel
        self.transition = transition or transition_via_interface(kernel)

    def forward(self, q, k, v, g, beta, *, scale=None, initial_state=None, doc_starts=None, with_transition=True):
        with torch.no_grad():
            if with_transition:
                o, q_transition, S_local, M = self.transition(q, k, v, g, beta, scale=scale,
                                                              initial_state=initial_state, doc_starts=doc_starts)
            else:
                o, S_local = self.kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                         output_final_state=True, doc_starts=doc_starts)
                q_transition = M = None
        tensors = (q, k, v, g, beta, initial_state, doc_starts)
        return SegmentForward(o, q_transition, S_local, M, tensors, (scale, initial_state is not None))

    def bind_incoming_state(self, tensors, meta, incoming_state):
        if incoming_state is None:
            return tensors, meta
        q, k, v, g, beta, initial_state, doc_starts = tensors
        return (q, k, v, g, beta, true_start(initial_state, incoming_state), doc_starts), meta

    def q_transition(self, tensors, meta):
        """The transition forward once more (no autograd), its q_transition alone."""
        q, k, v, g, beta, _, doc_starts = tensors
        with torch.no_grad():
            return self.transition(q, k, v, g, beta, scale=meta[0], doc_starts=doc_starts)[1]

    def backward(self, tensors, meta, d_o, d_final_state):
        q, k, v, g, beta, start, doc_starts = tensors
        scale, has_initial_state = meta
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
            start_leaf = None if start is None else start.detach().requires_grad_()
            o, final_state = self.kernel(*leaves, scale=scale, initial_state=start_leaf, output_final_state=True,
                                         doc_starts=doc_starts)
            inputs = leaves + ([start_leaf] if start_leaf is not None else [])
            grads = torch.autograd.grad((o, final_state), inputs, (d_o, d_final_state), allow_unused=True)
        grads = [torch.zeros_like(x) if d is None else d for x, d in zip(inputs, grads)]
        d_start = grads[5] if has_initial_state else None
        return (*grads[:5], d_start)


__all__ = ["RecomputingSegmentKernel", "SegmentForward", "SegmentKernel", "split_summary", "state_dtype",
           "transition_start", "transition_via_interface", "true_start"]
