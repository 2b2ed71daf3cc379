r"""The transition form of a kernel: what a CP segment needs, (o, q_transition, S_local, M).

Under state-passing CP (titan_cp/cp/state_passing.py) every segment but the sequence's
first needs, besides its outputs o and final state S_local from ``initial_state``
(zero if None):

    M [B, H, K, K]                 the segment's transition: S_end = M S_start + S_local
    q_transition [B, T, H, K]      scale q_t P_t, P_t the transition from the segment start to t,

so that the outputs for the true incoming state S are o_t + q_transition_t S.

The delta rule acts on every state column independently and linearly, so running it
from [S_0 | I] with values [v | 0] (width V + K) gives final state [S_local | M] and
outputs [o | q_transition]. Every kernel has a transition form with the signature of
:class:`TransitionKernel` (:func:`titan_cp.kernels.get_transition_kernel` by name):

- ``torch``: native, the K transition columns ride only through the chunk loop
  (:func:`titan_cp.kernels.chunk.chunk_gated_delta_rule_with_transition`);
- ``triton``: native, FLA's Triton pieces with the WY step at width V
  (:mod:`titan_cp.kernels.triton_transition`);
- any other kernel (``recurrent``, the ground truth): :func:`transition_via_interface`,
  exactly the call above through the kernel interface.

Returns o (dtype of v), q_transition, S_local and M (float32; float64 for float64 inputs).
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F

from titan_cp.kernels.interface import GatedDeltaRuleKernel


class TransitionKernel(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        *,
        scale: float | None = None,
        initial_state: torch.Tensor | None = None,
        doc_starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


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
    """[S_0 | I] [B, H, K, V + K], the state the transition form starts from (S_0 = 0 if None;
    that constant is built once per shape and must not be modified)."""
    identity = _identity_start(B, H, K, V, dtype, device)
    if initial_state is None:
        return identity
    return torch.cat([initial_state.to(dtype), identity[..., V:]], dim=-1)


def split_summary(o_and_q_transition: torch.Tensor, final: torch.Tensor, v: torch.Tensor):
    """[o | q_transition], [S_local | M] -> (o, q_transition, S_local, M).

    q_transition is copied out, so that the correction that keeps it for the backward
    does not keep the whole [o | q_transition] alive.
    """
    V = v.shape[-1]
    q_transition = o_and_q_transition[..., V:].to(state_dtype(v), copy=True)
    return o_and_q_transition[..., :V].to(v.dtype), q_transition, final[..., :V], final[..., V:]


def transition_via_interface(kernel: GatedDeltaRuleKernel) -> TransitionKernel:
    """The transition form of any kernel, through its interface: values [v | 0] from [S_0 | I]."""

    def run(q, k, v, g, beta, *, scale=None, initial_state=None, doc_starts=None):
        B, _, H, K = q.shape
        V = v.shape[-1]
        start = transition_start(initial_state, B, H, K, V, state_dtype(v), v.device)
        o_padded, final = kernel(q, k, F.pad(v, (0, K)), g, beta, scale=scale, initial_state=start,
                                 output_final_state=True, doc_starts=doc_starts)
        return split_summary(o_padded, final, v)

    return run


__all__ = ["TransitionKernel", "split_summary", "state_dtype", "transition_start", "transition_via_interface"]
