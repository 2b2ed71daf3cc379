"""Kimi Delta Attention (KDA): the delta rule with a per-key-channel decay (recurrent.py has the math).

Kernels (:func:`get_kernel`): ``torch`` (chunked WY form, autograd, chunk.py), ``recurrent``
(step by step, autograd) and ``triton``
(FLA's chunk_kda, triton.py; a CUDA GPU). Under CP
(:func:`get_segment_kernel`) its K x K transition rides as K extra state columns
through the kernel interface (titan_cp/ops/gated_delta_rule/transition.py).
"""

from __future__ import annotations

from titan_cp.errors import unknown_choice_message
from titan_cp.ops.gated_delta_rule.transition import RecomputingSegmentKernel
from titan_cp.ops.gated_delta_rule.triton import check_triton_available
from titan_cp.ops.kda.chunk import chunk_kda
from titan_cp.ops.kda.recurrent import recurrent_kda
from titan_cp.ops.kda.triton import triton_kda

KERNEL_NAMES = ("torch", "recurrent", "triton")


def get_kernel(name: str):
    if name == "torch":
        return chunk_kda
    if name == "recurrent":
        return recurrent_kda
    if name == "triton":
        check_triton_available()
        return triton_kda
    raise ValueError(unknown_choice_message("model.kernel", name, KERNEL_NAMES))


def get_segment_kernel(name: str) -> RecomputingSegmentKernel:
    return RecomputingSegmentKernel(get_kernel(name))


__all__ = ["KERNEL_NAMES", "chunk_kda", "get_kernel", "get_segment_kernel", "recurrent_kda", "triton_kda"]
