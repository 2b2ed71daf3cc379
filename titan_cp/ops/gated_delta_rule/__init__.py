"""The gated delta rule behind one interface, several implementations chosen by name.

The recurrence, the tensor layouts and the signature every kernel implements
are in :mod:`titan_cp.ops.gated_delta_rule.interface` (:class:`GatedDeltaRuleKernel`,
:func:`check_inputs`). In short, per head with state S [K, V]:

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   a_t = exp(g_t)
    o_t = scale * S_t^T q_t

Kernels (``model.kernel`` in the config, :func:`get_kernel` by name):

- ``torch``: chunked WY/UT-transform algorithm in plain PyTorch with a
  hand-written backward (kernels/chunk.py). Runs anywhere; the CPU default.
- ``recurrent``: the step-by-step recurrence with autograd (kernels/recurrent.py).
  The ground truth for tests; slow.
- ``triton``: FLA's ``chunk_gated_delta_rule`` Triton kernels (kernels/triton.py).
  Needs a CUDA GPU and ``pip install flash-linear-attention``.

Context parallelism runs each kernel as a segment kernel: the transition forward
(o, q_transition, S_local, M) in one pass, and the plain backward from the segment's
true incoming state (:mod:`titan_cp.ops.gated_delta_rule.transition`, :func:`get_segment_kernel`).
"""

from __future__ import annotations

from titan_cp.errors import unknown_choice_message
from titan_cp.ops.gated_delta_rule.chunk import ChunkSegmentKernel, chunk_gated_delta_rule
from titan_cp.ops.gated_delta_rule.interface import KERNEL_NAMES, GatedDeltaRuleKernel, check_inputs
from titan_cp.ops.gated_delta_rule.recurrent import recurrent_gated_delta_rule
from titan_cp.ops.gated_delta_rule.transition import RecomputingSegmentKernel, SegmentKernel
from titan_cp.ops.gated_delta_rule.triton import check_triton_available, triton_gated_delta_rule
from titan_cp.ops.gated_delta_rule.triton_transition import VarlenSegmentKernel


def get_kernel(name: str) -> GatedDeltaRuleKernel:
    """Return the kernel called ``name`` (``model.kernel``); a clear error for unknown or unusable ones."""
    if name == "torch":
        return chunk_gated_delta_rule
    if name == "recurrent":
        return recurrent_gated_delta_rule
    if name == "triton":
        check_triton_available()
        return triton_gated_delta_rule
    raise ValueError(unknown_choice_message("model.kernel", name, KERNEL_NAMES))


def get_segment_kernel(name: str) -> SegmentKernel:
    """Kernel ``name`` as a CP segment kernel: native for ``torch`` and ``triton`` (FLA's pieces:
    its chunk forward at width V + K, its plain backward); through the kernel interface with a
    recomputing backward for the others (:mod:`titan_cp.ops.gated_delta_rule.transition`)."""
    kernel = get_kernel(name)  # the same clear error for unknown or unusable kernels
    if name == "torch":
        return ChunkSegmentKernel()
    if name == "triton":
        return VarlenSegmentKernel()
    return RecomputingSegmentKernel(kernel)


__all__ = ["KERNEL_NAMES", "GatedDeltaRuleKernel", "SegmentKernel", "check_inputs", "get_kernel",
           "get_segment_kernel"]
