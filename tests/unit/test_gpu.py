"""The GPU checks as tests (``pytest -m gpu``; skipped without CUDA).

Both reuse benchmarks/gpu_check.py's sections with its quick shapes:

- parity: FLA's Triton kernel against titan_cp's torch kernel, fp32 and bf16,
  outputs, final state and every gradient, each measured against the float64
  truth (tolerances: gpu_check.PARITY_TOL);
- cp: the debug model under CP (P = 2 processes sharing the GPU on gloo; CP
  collectives staged through the host by titan_cp.cp.comm.HostStagedComm)
  against one rank and the float64 truth, loss and every parameter gradient
  (bounds: gpu_check.CP_FACTOR, CP_FLOOR).

Measurement (time, memory vs P) stays a script: benchmarks/gpu_check.py --sections measure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
from benchmarks import gpu_check  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and FLA + Triton for the kernel)"),
]


def quick_args(*extra: str):
    return gpu_check.parse_args(["--device", "cuda", "--kernel", "triton", "--quick", *extra])


def test_triton_kernel_parity_with_the_torch_kernel():
    result = gpu_check.kernel_parity(quick_args(), "cuda")
    assert result["status"] == "pass", result


def test_cp_on_one_gpu_matches_one_rank():
    result = gpu_check.cp_match(quick_args(), "cuda")
    assert result["status"] == "pass", result
