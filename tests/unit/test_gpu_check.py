"""benchmarks/gpu_check.py on CPU: its harnesses with the torch kernel, so a GPU session only runs it.

- the whole script in ``--quick`` mode with ``--kernel torch`` (parity against the
  recurrent kernel, CP on 2 gloo processes through the host-staging harness,
  measurements through the loopback harness) exits 0 and reports pass;
- argument parsing, report writing / summary, and the loopback group in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
from benchmarks import gpu_check, gpu_common, gpu_measure  # noqa: E402
from tests.support.triton_interpreter import version_skip_reason  # noqa: E402


def test_quick_run_on_cpu_reports_pass(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--kernel", "torch",
           "--reference", "recurrent", "--quick", "--seq-lens", "64", "--iters", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO, env=env, check=False)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, f"gpu_check failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert report["status"] == "pass"
    sections = report["sections"]
    assert sections["parity"]["status"] == "pass" and len(sections["parity"]["cases"]) == 4
    cp = sections["cp"]
    assert cp["status"] == "pass"
    assert {(c["P"], c["layout"], c["exchange"], c["dtype"]) for c in cp["cases"]} == {
        (2, "zigzag", "allgather", "float32"), (2, "zigzag", "allgather", "bfloat16"),
        (2, "contiguous", "logscan", "float32"), (2, "contiguous", "logscan", "bfloat16"),
    }
    # Every case passes the script's own verdict: CP's error against the float64 truth is
    # within a small factor of the one-rank run's. CP vs one rank directly: fp32 agrees to
    # accumulation order; bf16 rounds its activations (unit roundoff 2^-9 = 2e-3) at other
    # points under CP (the segment summary's outputs and correction), so the two bf16 runs
    # may differ by a fraction of that rounding, never more.
    assert all(c["pass"] for c in cp["cases"])
    loss_vs_p1 = {c["dtype"]: max(d["errors"]["loss"]["cp_vs_p1"] for d in cp["cases"] if d["dtype"] == c["dtype"])
                  for c in cp["cases"]}
    assert loss_vs_p1["float32"] < 1e-5 and loss_vs_p1["bfloat16"] < 2 ** -9 / 4, loss_vs_p1
    measure = sections["measure"]
    assert measure["status"] == "done"
    assert [(r["P"], r["status"]) for r in measure["model_rows"]] == [(1, "ok"), (2, "ok")]
    two = measure["model_rows"][1]
    assert two["comm_bytes_received_per_step"] > 0  # the CP exchange ran (loopback)
    assert measure["kernel_rows"][0]["titan_cp_ms"] > 0 and measure["kernel_rows"][0]["fla_cp_ms"] is None
    assert "PASS" in proc.stdout


def test_parse_args():
    args = gpu_check.parse_args(["--quick", "--sections", "cp", "--dtypes", "float32"])
    assert args.sections == ("cp",) and args.dtypes == ("float32",) and args.cp_sizes == (2,) and args.iters <= 2
    full = gpu_check.parse_args([])
    assert full.sections == gpu_check.SECTIONS and full.cp_sizes == (2, 4, 8)
    assert full.seq_lens == (16384, 65536, 262144) and full.measure_sizes == (1, 2, 4, 8)
    assert gpu_check.parse_args(["--cp-sizes", "2", "8"]).cp_sizes == (2, 8)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "parity", "bogus"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dtypes", "float16"])


def test_report_status_and_summary(tmp_path):
    report = {"meta": {"date": "2026-11-23", "device": "cpu", "kernel": "torch"},
              "sections": {"parity": {"status": "skipped", "reason": "same kernel"}, "measure": {"status": "done"}}}
    assert gpu_check.overall_status(report) == "pass"
    report["sections"]["cp"] = {"status": "fail", "cases": []}
    assert gpu_check.overall_status(report) == "fail"
    report["sections"]["measure"] = {"status": "error", "reason": "boom"}
    report["status"] = gpu_check.overall_status(report)
    assert report["status"] == "error"
    path = tmp_path / "sub" / "r.json"
    gpu_check.write_report(report, path)
    assert json.loads(path.read_text())["status"] == "error"
    text = gpu_check.summarize(report)
    assert "ERROR" in text and "[measure] error: boom" in text


def test_triton_on_cpu_is_a_recorded_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the triton kernel is available")
    out = tmp_path / "r.json"
    code = gpu_check.main(["--device", "cpu", "--kernel", "triton", "--sections", "cp", "--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 2 and report["sections"]["cp"]["status"] == "error"
    assert "model.kernel = 'triton'" in report["sections"]["cp"]["reason"]


def test_loopback_group_simulates_one_rank():
    group = gpu_measure.LoopbackGroup(4, 2)
    with gpu_measure.loopback_collectives():
        assert dist.get_rank(group) == 2 and dist.get_world_size(group=group) == 4
        assert dist.get_global_rank(group, 3) == 3
        x = torch.arange(6.0).view(2, 3)
        out = torch.empty(8, 3)
        dist.all_gather_into_tensor(out, x, group=group)
        assert torch.equal(out.view(4, 2, 3), x.expand(4, 2, 3))
        parts = [torch.empty(2, 3) for _ in range(4)]
        dist.all_gather(parts, x, group=group)
        assert all(torch.equal(p, x) for p in parts)
        buf = torch.ones(3)
        ops = [dist.P2POp(dist.isend, x[0], 1, group=group), dist.P2POp(dist.irecv, buf, 1, group=group, tag=5)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        assert torch.equal(buf, torch.zeros(3))
    assert dist.get_rank is not None and dist.P2POp.__name__ == "P2POp"  # restored


def test_titan_cp_cp_runs_on_a_loopback_group():
    """The measure section's premise: titan_cp's CP layer runs for rank r of P in one process."""
    from titan_cp.cp.context import CPContext
    from titan_cp.cp.comm import comm_stats
    from titan_cp.models.common.sequence import SequenceInfo
    from titan_cp.models.gdn.layers import GatedDeltaNet

    torch.manual_seed(0)
    layer = GatedDeltaNet(dim=16, num_heads=2, head_dim=8, expand_v=1.0, num_v_heads=None, conv_size=4,
                          norm_eps=1e-6, kernel="torch")
    layer.init_weights(0.02)
    with gpu_measure.loopback_collectives():
        for layout, exchange in (("contiguous", "allgather"), ("zigzag", "allgather"), ("contiguous", "logscan")):
            layer.cp = CPContext(group=gpu_measure.LoopbackGroup(4, 1), layout=layout, exchange=exchange)
            comm_stats.reset()
            x = torch.randn(1, 16, 16, requires_grad=True)
            layer(x, SequenceInfo()).sum().backward()
            assert x.grad.isfinite().all() and comm_stats.total().bytes_received > 0


# ------------------------------------------------------------- FLA's op-level CP under the interpreter
# The measure section times FLA's op-level CP (fla.ops.cp) for rank r of P on a LoopbackGroup.
# Under Triton's interpreter (tests/support/triton_interpreter.py) that code path
# runs on CPU, and with loopback data (every rank sends what this rank has) FLA's CP and
# titan_cp's CP must give the same output and gradients for a middle rank: both fold r copies
# of this shard's summary forward and P-1-r copies of its state gradient backward. (Not for the
# first and last rank: FLA's last rank never computes its forward summary and its first rank
# never computes its backward one, since no rank would read them; under loopback those zeros
# are what "every other rank" sends. Timing-wise that is FLA's real behaviour.) This checks the
# harness, FLA's CP call and titan_cp's CP math together.


def _fla_cp_main() -> None:
    import fla.ops.cp.chunk_bwd
    import fla.ops.cp.chunk_delta_h
    import fla.ops.cp.chunk_fwd
    import fla.ops.cp.chunk_merge

    from titan_cp.cp.context import CPContext

    for module in (fla.ops.cp.chunk_bwd, fla.ops.cp.chunk_delta_h, fla.ops.cp.chunk_fwd, fla.ops.cp.chunk_merge):
        module._check_cp_device = lambda device: None  # FLA's CP insists on NVIDIA sm80+; the interpreter is fine
    P, shard, H, K, V = 4, 40, 2, 16, 16
    tensors, _, _ = gpu_common.gdn_inputs(1, shard, H, K, V, seed=0, device="cpu", dtype=torch.float32)
    grad_o = torch.randn(1, shard, H, V, generator=torch.Generator().manual_seed(1))
    report = {}
    with gpu_measure.loopback_collectives():
        for rank in range(1, P - 1):
            cp = CPContext(group=gpu_measure.LoopbackGroup(P, rank), layout="contiguous", exchange="allgather")
            results = []
            for op in (gpu_measure.fla_cp_op(P, rank, shard, "cpu"), gpu_measure.titan_cp_gdn_op("torch", cp)):
                leaves = [t.clone().requires_grad_() for t in tensors[:5]]
                o = op(*leaves)
                o.backward(grad_o)
                results.append([o.detach()] + [x.grad for x in leaves])
            report[rank] = {n: gpu_check.rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv", "dg", "dbeta"),
                                                                          *results)}
    print("FLA_CP_REPORT " + json.dumps(report))


@pytest.mark.skipif(version_skip_reason() is not None, reason=str(version_skip_reason()))
def test_fla_op_level_cp_equals_titan_cp_on_loopback_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "tests.unit.test_gpu_check", "--fla-cp"], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FLA_CP_REPORT ")]
    assert proc.returncode == 0 and lines, f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1][len("FLA_CP_REPORT "):])
    print(report)
    bad = {(rank, n): e for rank, errs in report.items() for n, e in errs.items() if e > 1e-5}
    assert not bad, f"FLA op-level CP != titan_cp CP (loopback, interpreter) beyond 1e-5: {bad}"


if __name__ == "__main__" and "--fla-cp" in sys.argv:
    from tests.support.triton_interpreter import install_interpreter_shim

    install_interpreter_shim()
    _fla_cp_main()
