"""An installed titan_cp (a wheel in a fresh virtual environment) runs from outside the checkout.

Built once per module: ``pip wheel`` of a clean copy of this repository's
``pyproject.toml``, ``README.md`` and ``titan_cp/`` (so no stale ``build/``
of the checkout leaks into the wheel, and nothing is written into it), a fresh venv that
sees the system packages (torch, TorchTitan, ...) but not this checkout's
editable install, ``pip install --no-deps`` of the wheel. Then, from an empty
directory outside the repository: the ``titan_cp`` console script and every
command's ``--help``, and 2-rank CP 2 training of the GDN and the Qwen3.5
debug models through TorchTitan's own entry point and through
``titan_cp train`` with a TOML file; each run must log finite losses for
every step. Everything those runs read (flavors, tokenizer, corpus) is
package data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.train_runs import needs_torchrun

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


class Installed:
    def __init__(self, root: Path):
        source, wheels, venv = root / "source", root / "wheels", root / "venv"
        self.cwd = root / "outside"
        self.cwd.mkdir()
        shutil.copytree(REPO / "titan_cp", source / "titan_cp", ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copyfile(REPO / name, source / name)
        self._run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                   str(wheels), str(source)])
        self._run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
        self.bin = venv / "bin"
        self.wheel = next(wheels.glob("titan_cp-*.whl"))
        self._run([str(self.bin / "python"), "-m", "pip", "install", "-q", "--no-deps", str(self.wheel)])

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", LOG_RANK="0")
        return env

    def _run(self, cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
        cwd = getattr(self, "cwd", None)
        proc = subprocess.run(cmd, cwd=cwd, env=self.env() if hasattr(self, "bin") else None,
                              capture_output=True, text=True, timeout=timeout, check=False)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def run(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return self._run(list(args), timeout=timeout)

    def losses(self, dump_folder: str) -> list[float]:
        records = [json.loads(line) for line in (self.cwd / dump_folder / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    return Installed(tmp_path_factory.mktemp("wheel"))


def test_imports_the_installed_copy_not_the_checkout(installed):
    proc = installed.run("python", "-c", "import titan_cp.models.gdn as g; print(g.__file__); print(g.FLAVORS)")
    where, flavors = proc.stdout.splitlines()[-2:]
    assert str(installed.bin.parent) in where and str(REPO) not in where
    assert "debug" in flavors and "340M" in flavors


def test_the_wheel_holds_every_package_file_and_the_assets(installed):
    shipped = set(zipfile.ZipFile(installed.wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "titan_cp"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked and {"titan_cp/assets/tokenizer/tokenizer.json", "titan_cp/assets/data/tiny_corpus.jsonl"} <= set(tracked)
    missing = sorted(set(tracked) - shipped)
    assert not missing, f"in the checkout's titan_cp/ but not in the wheel: {missing}"


def test_console_script_and_every_command_print_help(installed):
    from titan_cp.cli import COMMANDS

    top = installed.run("titan_cp", "--help").stdout
    for command in COMMANDS:
        assert command in top
        out = installed.run("titan_cp", command, "--help").stdout
        assert "usage" in out.lower() or command in out.lower(), f"titan_cp {command} --help printed:\n{out[:500]}"


def test_smoke_needs_a_checkout_and_says_so(installed):
    proc = subprocess.run(["titan_cp", "smoke", "--nproc", "2", "--device", "cpu"], cwd=installed.cwd,
                          env=installed.env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "checkout" in proc.stderr and "pip install -e ." in proc.stderr, proc.stderr[-2000:]


def _assert_trained(installed: Installed, dump_folder: str) -> None:
    losses = installed.losses(dump_folder)
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses


NATIVE = {"gdn": ("titan_cp.models.gdn", "gdn_debug"), "qwen3_5": ("titan_cp.models.qwen3_5", "qwen3_5_debug")}


@needs_torchrun
@pytest.mark.parametrize("family", sorted(NATIVE))
def test_torchtitan_entry_point_trains_cp2(installed, family):
    module, config = NATIVE[family]
    installed.run("python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  "-m", "torchtitan.train", "--module", module, "--config", config,
                  "--parallelism.context_parallel_degree", "2", "--training.steps", str(STEPS),
                  "--training.seq_len", "128", "--training.local_batch_size", "2",
                  "--checkpoint.interval", "100", "--dump_folder", f"native_{family}")
    _assert_trained(installed, f"native_{family}")


@needs_torchrun
@pytest.mark.parametrize("family", ["gdn", pytest.param("qwen3_5", marks=pytest.mark.slow)])  # ~30 s; native run above
def test_titan_cp_train_runs_a_toml_job_cp2(installed, family):
    job = installed.cwd / f"{family}.toml"
    job.write_text(f'[model]\nname = "{family}"\n[training]\nsteps = {STEPS}\nseq_len = 128\nlocal_batch_size = 2\n'
                   f'[parallelism]\ncontext_parallel_degree = 2\n[job]\ndump_folder = "toml_{family}"\n'
                   '[checkpoint]\ninterval = 100\n')
    installed.run("titan_cp", "train", "--nproc_per_node=2", "--job.config_file", str(job))
    _assert_trained(installed, f"toml_{family}")
