"""Real `torchrun train.py` runs on CPU ranks, shared by the training-run tests: one tiny setup, a runner, loss checks.

The setup (GDN debug flavor, 2 layers, seq_len 128, global batch 4 rows,
synthetic packed documents whose global batch does not depend on the
data-parallel degree, fp32) and one initialisation: a seed checkpoint made
once on one rank and loaded by every run (``checkpoint.initial_load_path``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

from titan_cp.components.metrics import read_metrics_jsonl

STEPS = 6
CKPT_STEP = 3
GLOBAL_BATCH = 4
SEQ_LEN = 128

# Tolerance of a layout's per-step loss against the 1-rank run. Everything is
# fp32 and deterministic; layouts differ only in the order of floating-point
# reductions: TP splits the contraction of o_proj / w2 over ranks, CP folds
# chunk states across ranks in a different association, FSDP/DP
# reduce-scatters gradients in a different order. Each reorder costs a few ulp
# (fp32 eps = 1.2e-7) per accumulation, and 6 AdamW steps at lr 3e-3 barely
# amplify it: measured differences on this setup are <= 1.2e-7 relative (one
# ulp of the loss). rel 1e-5 leaves ~100x headroom for other BLAS builds and
# thread counts while still catching real errors (a wrong shard, a state not
# handed over or leaking across a document start, a dropped gradient all move
# the loss by >= 1e-3).
REL_TOL = 1e-5
# The same run interrupted at CKPT_STEP and resumed on the same layout.
RESUME_REL_TOL = 1e-6

LAYOUTS = {  # run name -> (ranks, train_configs file, extra overrides)
    "cp2": (2, "cp2", []),
    # TorchTitan's "headtail" sharding feeding the model's zigzag fold, end to end
    "cp2_zigzag": (2, "cp2", ["--parallelism.cp_layout", "zigzag"]),
    "tp2": (2, "tp2", []),
    "dp2_cp2": (4, "dp2_cp2", []),
    "cp2_tp2": (4, "cp2_tp2", []),
    "dp2_cp2_tp2": (8, "dp2_cp2_tp2", []),
}
DP = {"dp2_cp2": 2, "dp2_cp2_tp2": 2}

needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env["OMP_NUM_THREADS"] = "1"  # 2 cores shared by up to 8 ranks
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env["LOG_RANK"] = "all"  # every rank prints its step lines
    return env


def common_args() -> list[str]:
    return [
        "--model.n_layers", "2",
        "--training.seq_len", str(SEQ_LEN),
        "--training.steps", str(STEPS),
        "--optimizer.lr", "3e-3",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--checkpoint.enable",
        "--checkpoint.interval", str(CKPT_STEP),
        "--checkpoint.last_save_model_only", "false",
        "--comm.trace_buf_size", "0",
        "--debug.enable_structured_logging", "false",
    ]


SYNTHETIC_DATA = [
    "--data.dataset", "synthetic",
    "--data.kind", "pattern",
    "--data.mean_doc_len", "40",  # several document boundaries per row, some across CP shards
]
# The shipped corpus: real packed documents ([BOS] text [EOS], positions restarting at each).
# TorchTitan's text loader splits it by data-parallel rank, so only dp = 1 layouts share its batches.
SHIPPED_DATA = ["--data.dataset", "tiny_corpus"]


class Runner:
    """Launches and caches torchrun runs for the module (shared between assertions)."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, dict[int, dict]] = {}

    def launch(self, name: str, nproc: int, config: str, extra: list[str], data: list[str] = SYNTHETIC_DATA
               ) -> dict[int, dict]:
        if name in self.done:
            return self.done[name]
        dump = self.root / name
        cmd = [
            # --tee 3: every output line carries its rank ("[default<rank>]:")
            "torchrun", "--standalone", f"--nproc_per_node={nproc}", "--tee", "3", str(REPO / "train.py"),
            "--job.config_file", str(REPO / "train_configs" / f"{config}.toml"),
            *common_args(),
            *data,
            "--job.dump_folder", str(dump),
            *extra,
        ]
        proc = subprocess.run(cmd, check=False, cwd=self.root, env=run_env(), capture_output=True, text=True, timeout=900)
        (self.root / f"{name}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise AssertionError(f"run {name} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
        metrics = dump / "metrics.jsonl"
        self.done[name] = read_metrics_jsonl(str(metrics)) if metrics.exists() else {}
        return self.done[name]

    @property
    def seed_path(self) -> str:
        if "seed" not in self.done:
            self.launch("seed", 1, "debug_cpu", ["--checkpoint.create_seed_checkpoint",
                                                  "--parallelism.data_parallel_shard_degree", "1"])
        return str(self.root / "seed" / "checkpoint" / "step-0")

    def layout(self, name: str, extra: list[str] = (), data: list[str] = SYNTHETIC_DATA) -> dict[int, dict]:
        """A training run from the seed checkpoint; name is 'ref' (1 rank) or a LAYOUTS key."""
        run_name = name if data is SYNTHETIC_DATA else f"{name}_shipped"
        if name == "ref":
            nproc, config, layout_args = 1, "debug_cpu", []
        else:
            nproc, config, layout_args = LAYOUTS[name]
        return self.launch(run_name, nproc, config, [
            "--training.local_batch_size", str(GLOBAL_BATCH // DP.get(config, 1)),
            "--checkpoint.initial_load_path", self.seed_path,
            "--checkpoint.initial_load_model_only", "true",
            *layout_args,
            *extra,
        ], data)

    def resume(self, name: str, from_run: str, nproc: int, config: str) -> dict[int, dict]:
        """Continue ``from_run``'s step-CKPT_STEP checkpoint (full state) on another layout."""
        ckpt = self.root / from_run / "checkpoint" / f"step-{CKPT_STEP}"
        assert ckpt.is_dir(), f"{from_run} saved no step-{CKPT_STEP} checkpoint"
        return self.launch(name, nproc, config, [
            "--training.local_batch_size", str(GLOBAL_BATCH // DP.get(config, 1)),
            "--checkpoint.initial_load_path", str(ckpt),
            "--checkpoint.initial_load_model_only", "false",
        ])


def losses_at(records: dict[int, dict], steps) -> list[float]:
    missing = [s for s in steps if s not in records]
    assert not missing, f"no loss logged for steps {missing}"
    return [records[s]["loss"] for s in steps]


def assert_losses_close(got: list[float], want: list[float], rel: float, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert math.isfinite(g), f"{what}: loss {i} is {g}"
        assert abs(g - w) <= rel * abs(w), (
            f"{what}: losses differ beyond rel {rel}:\n got  {got}\n want {want}\n"
            f" rel diffs {[abs(a - b) / abs(b) for a, b in zip(got, want)]}"
        )
