"""The CI smoke command: what it plans for a runner, a short CPU run, and a run broken on purpose."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from titan_cp.cli.smoke import plan

REPO = Path(__file__).resolve().parents[2]
SHORT = ["--nproc", "2", "--device", "cpu", "--configs", "cp2", "--steps", "3", "--checkpoint-step", "2"]

# Started in every process of the broken run: TorchTitan shards the batch zigzag ("headtail")
# while the model folds states in contiguous order. Valid config, finite falling loss, wrong math.
WRONG_LAYOUT = '''
import builtins, sys
_import = builtins.__import__
def _wrong_layout(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    for home in ("titan_cp.cp.settings",):  # where the table lives
        table = getattr(sys.modules.get(home), "LAYOUT_TO_LOAD_BALANCER", None)
        if table is not None and table.get("contiguous") is None:
            table["contiguous"] = "headtail"
    return module
builtins.__import__ = _wrong_layout
'''


def test_plan_for_a_cpu_and_a_gpu_runner(tmp_path):
    configs = plan.discover()
    names = {c.name for c in configs}
    assert {"debug_cpu", "cp2", "tp2", "dp2_cp2", "gdn_340m_cp8"} <= names
    refs = plan.plan(configs, plan.Settings(2, "cpu", tmp_path))
    runs = {c.name: c for c in configs if not c.skip}
    assert {"debug_cpu", "cp2", "tp2"} <= set(runs) and "dp2_cp2" not in runs
    assert "needs 4 ranks" in next(c.skip for c in configs if c.name == "dp2_cp2")
    assert "GPU config" in next(c.skip for c in configs if c.name == "gdn_340m_cp8")
    # cp2 and tp2 share model and global batch (4): one reference and seed; debug_cpu
    # (data_parallel_shard_degree = -1) fills the 2 ranks with dp 2: global batch 8, its own
    assert runs["cp2"].reference is runs["tp2"].reference is not runs["debug_cpu"].reference
    assert runs["debug_cpu"].world == 2 and runs["debug_cpu"].global_batch == 8
    assert runs["cp2"].reference.members == ["cp2", "tp2"] and runs["cp2"].reference in refs

    configs = plan.discover()
    plan.plan(configs, plan.Settings(8, "cuda", tmp_path))
    gpu = {c.name: c for c in configs if not c.skip}
    assert gpu["gdn_340m_cp8"].world == 8 and gpu["dp2_cp2_tp2"].world == 8
    cmd = plan.run_command(plan.Settings(8, "cuda", tmp_path), gpu["gdn_340m_cp8"])
    assert cmd[cmd.index("--model.kernel") + 1] == "triton"
    mamba2 = plan.run_command(plan.Settings(8, "cuda", tmp_path), gpu["mamba2_debug_cp2"])
    assert mamba2[mamba2.index("--model.kernel") + 1] == "torch"  # the Mamba-2 ops have no triton kernel
    assert gpu["qwen3_5_moe_debug_pp2_cp2"].world == 4  # PP 2 x CP 2: PP counts in the ranks
    assert cmd[cmd.index("--parallelism.data_parallel_shard_degree") + 1] == "1"


@pytest.mark.parametrize("nproc, device", [(2, "cpu"), (8, "cuda")])
def test_every_planned_launch_passes_the_config_checks(tmp_path, nproc, device):
    """The smoke's overrides are valid for every config it would run (no launch: the front end only)."""
    from titan_cp.train.toml_config import config_from_args

    s = plan.Settings(nproc, device, tmp_path)
    configs = plan.discover()
    plan.plan(configs, s)
    for c in (c for c in configs if not c.skip):
        for cmd, ranks in ((plan.run_command(s, c), c.world), (plan.resume_command(s, c), c.world),
                           (plan.reference_command(s, c.reference), 1), (plan.seed_command(s, c.reference), 1)):
            args = cmd[cmd.index(str(plan.REPO / "train.py")) + 1:]
            config = config_from_args(args, world_size=ranks, check_runtime=False)
            assert config.training.steps == s.steps and config.checkpoint.enable, c.name


def _smoke(out: Path, *extra: str, env_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (env_path, REPO) if p)
    return subprocess.run([sys.executable, "-m", "titan_cp.cli.smoke", *SHORT, "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


def _junit(out: Path) -> dict[tuple[str, str], str]:
    """(config, check) -> 'pass' | 'fail' | 'skip' from the JUnit XML."""
    cases = {}
    for case in ET.parse(out / "junit.xml").getroot().iter("testcase"):
        state = "fail" if case.find("failure") is not None else "skip" if case.find("skipped") is not None else "pass"
        cases[(case.get("classname").removeprefix("smoke."), case.get("name"))] = state
    return cases


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smoke")


def test_cpu_smoke_passes(smoke_out):
    proc = _smoke(smoke_out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    cases = _junit(smoke_out)
    checks = ("runs", "loss finite and falls", "matches CP=1", "checkpoint resumes", "metrics reach TensorBoard")
    assert all(cases[("cp2", c)] == "pass" for c in checks), cases
    assert cases[("dp2_cp2", "smoke")] == "skip"
    summary = (smoke_out / "summary.md").read_text()
    assert "| cp2 | 2 | dp1 cp2 tp1 contiguous/allgather | PASS |" in summary and summary in proc.stdout
    assert list((smoke_out / "cp2" / "run" / "tb").glob("*")), "no TensorBoard logs to upload"


def test_smoke_fails_when_the_layout_breaks_exactness(smoke_out, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(WRONG_LAYOUT)
    broken = smoke_out / "broken"
    if (smoke_out / "junit.xml").exists():  # reuse the passing run's seed and reference (same CP = 1 math)
        shutil.copytree(smoke_out, broken, ignore=shutil.ignore_patterns("cp2", "broken"))
    proc = _smoke(broken, "--reuse", env_path=tmp_path)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-5000:]
    cases = _junit(broken)
    assert cases[("cp2", "matches CP=1")] == "fail", cases
    assert cases[("cp2", "runs")] == cases[("cp2", "loss finite and falls")] == "pass", cases
    assert "FAIL: matches CP=1" in (broken / "summary.md").read_text()
