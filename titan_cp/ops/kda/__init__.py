"""Kimi Delta Attention (KDA): the delta rule with a per-key-channel decay (recurrent.py has the math).

Kernels (:func:`get_kernel`): ``recurrent`` (step by step, autograd). Under CP
(:func:`get_segment_kernel`) its K x K transition rides as K extra state columns
through the kernel interface (titan_cp/ops/gated_delta_rule/transition.py).
"""

from __future__ import annotations

from titan_cp.errors import unknown_choice_message
from titan_cp.ops.gated_delta_rule.transition import RecomputingSegmentKernel
from titan_cp.ops.kda.recurrent import recurrent_kda

KERNEL_NAMES = ("recurrent",)


def get_kernel(name: str):
    if name == "recurrent":
        return recurrent_kda
    raise ValueError(unknown_choice_message("model.kernel", name, KERNEL_NAMES))


def get_segment_kernel(name: str) -> RecomputingSegmentKernel:
    return RecomputingSegmentKernel(get_kernel(name))


__all__ = ["KERNEL_NAMES", "get_kernel", "get_segment_kernel", "recurrent_kda"]
