"""benchmarks/cp_parity.py: one-rank reference, then CP on 2 torchrun ranks; a wrong reference fails loudly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ["-m", "benchmarks.cp_parity"]  # run from ROOT
TINY = ["--n_layers", "2", "--dim", "32", "--hidden_dim", "64", "--num_heads", "2", "--head_dim", "8",
        "--vocab_size", "97", "--seq_len", "64", "--batch", "2"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _single(ref: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *SCRIPT, "--mode", "single", "--save_ref", str(ref), *TINY, *extra],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT, check=False)


def _cp(ref: Path, P: int = 2, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={P}", *SCRIPT,
           "--mode", "cp", "--cp_size", str(P), "--ref", str(ref), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def packed_ref(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("numerics") / "ref.pt"
    proc = _single(ref, "--packed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "saved reference" in proc.stdout
    return ref


def test_cp_on_two_ranks_matches_reference(packed_ref):
    proc = _cp(packed_ref, 2, "--layout", "zigzag", "--exchange", "allgather")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout
    for name in ("logits", "loss", "grad layers.0.attention.q_proj.weight", "grad lm_head.weight"):
        assert name in proc.stdout


def test_perturbed_reference_fails_loudly(packed_ref, tmp_path):
    ref = torch.load(packed_ref, weights_only=False)
    grad = ref["grads"]["layers.1.attention.A_log"]
    grad += 1e-3 * grad.abs().max()  # a relative error of 1e-3, far beyond rtol 1e-5
    bad = tmp_path / "perturbed.pt"
    torch.save(ref, bad)
    proc = _cp(bad, 2, "--exchange", "logscan")
    assert proc.returncode != 0
    assert "FAIL" in proc.stdout and "grad layers.1.attention.A_log" in proc.stdout.split("FAIL:")[-1]
    assert "PASS" not in proc.stdout


def test_rtol_and_cp_size_are_checked(packed_ref):
    # a tolerance below fp32 rounding fails; a wrong --cp_size is refused with a clear message
    proc = _cp(packed_ref, 2, "--rtol", "1e-12")
    assert proc.returncode != 0 and "FAIL" in proc.stdout
    proc = subprocess.run([sys.executable, *SCRIPT, "--mode", "cp", "--cp_size", "2", "--ref", str(packed_ref)],
                          capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT, check=False)
    assert proc.returncode != 0 and "WORLD_SIZE" in proc.stderr
