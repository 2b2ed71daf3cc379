#!/usr/bin/env bash
# Install titan_cp and everything its runs and tests need, on a fresh machine.
# torch is pinned first: on CPU machines `torch==2.13.0` is a local CPU wheel, and
# with it installed nothing else pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
# FLA's op code only (pure Python + Triton sources, no CUDA): lets the CPU tests run FLA's real
# Triton kernels and FLA's HF models under the Triton interpreter (tests/test_triton_kernel.py).
python3 -m pip install -q --no-deps fla-core==0.6.0 flash-linear-attention==0.6.0
