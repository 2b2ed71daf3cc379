"""Mamba-2's SSD scan behind the gated-delta-rule signature (:mod:`titan_cp.ops.mamba2.interface`).

Kernels (:func:`get_kernel` by name): ``torch`` (chunked SSD, autograd backward,
chunk.py) and ``recurrent`` (step by step, recurrent.py). :func:`get_segment_kernel`
gives the CP segment kernel: scalar transition per head (segment.py).
"""

from __future__ import annotations

from titan_cp.errors import unknown_choice_message
from titan_cp.ops.mamba2.chunk import chunk_ssd
from titan_cp.ops.mamba2.interface import KERNEL_NAMES
from titan_cp.ops.mamba2.recurrent import recurrent_ssd
from titan_cp.ops.mamba2.segment import ScalarSegmentKernel


def get_kernel(name: str):
    if name == "torch":
        return chunk_ssd
    if name == "recurrent":
        return recurrent_ssd
    raise ValueError(unknown_choice_message("model.kernel", name, KERNEL_NAMES))


def get_segment_kernel(name: str) -> ScalarSegmentKernel:
    return ScalarSegmentKernel(get_kernel(name))


__all__ = ["KERNEL_NAMES", "chunk_ssd", "get_kernel", "get_segment_kernel", "recurrent_ssd"]
