"""FLA's KDA Triton chunk kernel (titan_cp/ops/kda/triton.py) under the Triton interpreter on CPU.

In a subprocess (the interpreter is chosen before FLA's kernels are decorated;
tests/support/triton_interpreter.py): ``triton_kda`` against titan_cp's KDA recurrence,
with packed documents (FLA's varlen) and an initial state: outputs, final state and
the gradients of q, k, v, g, beta, S_0 (1e-5: FLA computes in float32); then the same
kernel as a CP segment kernel (its transition forward M, q_transition, S_local through
the kernel interface, and the backward from a true start) against the recurrence's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _main() -> None:
    from tests.support.triton_interpreter import install_interpreter_shim

    install_interpreter_shim()
    from titan_cp.ops.gated_delta_rule.transition import RecomputingSegmentKernel
    from titan_cp.ops.kda import recurrent_kda
    from titan_cp.ops.kda.triton import triton_kda
    from titan_cp.testing import rel_err

    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 40, 2, 16, 16
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, K, generator=gen) * 0.5
    beta = torch.rand(B, T, H, generator=gen)
    S0 = torch.randn(B, H, K, V, generator=gen)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [9, 17]] = True
    starts[1, 30] = True
    w = torch.randn(B, T, H, V, generator=gen)

    def run(kernel):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, S0)]
        o, S = kernel(*leaves[:5], initial_state=leaves[5], output_final_state=True, doc_starts=starts)
        return [o, S, *torch.autograd.grad((o * w).sum() + (S * S).sum(), leaves)]

    report = {"kernel": [rel_err(a, b) for a, b in zip(run(triton_kda), run(recurrent_kda))]}
    segs = [RecomputingSegmentKernel(kernel) for kernel in (triton_kda, recurrent_kda)]
    seg_starts = starts.clone()
    seg_starts[0] = False  # row 0 has no document start, so its transition M is not zero
    fwd = [s.forward(q, k, v, g, beta, initial_state=S0, doc_starts=seg_starts) for s in segs]
    report["M_row0_norm"] = [float(fwd[1].M[0].abs().max())]
    report["transition"] = [rel_err(a, b) for a, b in zip(fwd[0][:4], fwd[1][:4])]
    incoming = torch.randn(B, H, K, V, generator=gen)
    T_grad = torch.randn(B, H, K, V, generator=gen)
    bwd = []
    for s, f in zip(segs, fwd):
        tensors, meta = s.bind_incoming_state(f.saved_tensors, f.saved_meta, incoming)
        bwd.append(s.backward(tensors, meta, w, T_grad))
    report["segment_backward"] = [rel_err(a, b) for a, b in zip(*bwd)]
    print("KDA_REPORT " + json.dumps(report))


def test_fla_kda_triton_under_the_interpreter_matches_recurrent():
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "tests.unit.test_kda_triton", "--interpret"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("KDA_REPORT ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1][len("KDA_REPORT "):])
    assert len(report["kernel"]) == 8 and len(report["transition"]) == 4 and len(report["segment_backward"]) == 6
    assert report.pop("M_row0_norm")[0] > 1e-6  # the transition check compares a nonzero M
    bad = {(part, i): e for part, errs in report.items() for i, e in enumerate(errs) if not e < 1e-5}
    assert not bad, f"FLA's KDA (interpreted) != recurrent beyond 1e-5: {bad} ({report})"


if __name__ == "__main__" and "--interpret" in sys.argv:
    _main()
