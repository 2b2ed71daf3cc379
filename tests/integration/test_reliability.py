"""Checkpoint integrity, one metrics record per step, rank-0 logging and max_loss under CP.

Unit tests on files first; then two shared torchrun launches on 2 CPU ranks
(CP = 2, GDN debug flavor, 2 layers, seq_len 128, 6 steps, an async
checkpoint every step, TensorBoard on):

1. an uninterrupted run;
2. a copy of its dump folder whose newest checkpoints are damaged three ways
   (step-6: a shard truncated; step-5: 4 KiB of random bytes written into a
   shard, same size; step-4: no manifest, i.e. a save that did not finish),
   restarted with the same command: it must name each damaged file, fall back
   to step-3, and reproduce steps 4-6 of the uninterrupted run (losses and
   final parameters), with one metrics record per step and its own
   TensorBoard folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.train_runs import REPO, SYNTHETIC_DATA, common_args, run_env, needs_torchrun
from titan_cp.components.checkpoint_integrity import MANIFEST, check_files, read_manifest, verify_checkpoint, write_manifest
from titan_cp.components.metrics import StepJsonl, read_metrics_jsonl

STEPS = 6
GOOD_STEP = 3  # the newest undamaged checkpoint of the damaged copy
# Resuming on the same layout replays the same fp32 operations in the same
# order: measured bit-identical; 1e-6 relative leaves room for BLAS threading.
RESUME_REL_TOL = 1e-6


# --- manifests on plain files ---------------------------------------------------------------


def _fake_checkpoint(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(os.urandom(300))
    (folder / "__0_0.distcp").write_bytes(os.urandom(10_000))
    (folder / "__1_0.distcp").write_bytes(os.urandom(9_000))


def _write_random_bytes(path: Path, offset: int = 1000, n: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(n))


def test_manifest_catches_each_kind_of_damage(tmp_path):
    ckpt = tmp_path / "step-1"
    _fake_checkpoint(ckpt)
    assert verify_checkpoint(str(ckpt)) is None, "no manifest must read as an unfinished save"
    write_manifest(str(ckpt), 1)
    manifest = read_manifest(str(ckpt))
    assert manifest["step"] == 1 and sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert verify_checkpoint(str(ckpt)) == []
    assert not list(ckpt.glob(MANIFEST + ".tmp*")), "the temporary manifest was left behind"

    damaged = {
        "truncated": lambda p: os.truncate(p, 5000),
        "random bytes": _write_random_bytes,
        "missing": os.remove,
    }
    for what, damage in damaged.items():
        copy = tmp_path / what
        shutil.copytree(ckpt, copy)
        damage(copy / "__0_0.distcp")
        problems = verify_checkpoint(str(copy))
        assert len(problems) == 1 and str(copy / "__0_0.distcp") in problems[0], (what, problems)
    meta = tmp_path / "metadata"
    shutil.copytree(ckpt, meta)
    os.truncate(meta / ".metadata", 10)
    assert [p for p in verify_checkpoint(str(meta)) if ".metadata" in p]
    # one rank's share of the files is checked on its own
    assert check_files(str(ckpt), manifest, ["__1_0.distcp"]) == []


def test_explicitly_named_damaged_checkpoint_is_refused(tmp_path):
    """checkpoint.initial_load_path / load_step naming a damaged folder: an error naming the file, no load."""
    from titan_cp.components.checkpoint_integrity import CheckpointCorrupted, VerifiedCheckpointManager

    ckpt = tmp_path / "step-2"
    _fake_checkpoint(ckpt)
    write_manifest(str(ckpt), 2)
    _write_random_bytes(ckpt / "__1_0.distcp")
    manager = VerifiedCheckpointManager.__new__(VerifiedCheckpointManager)  # only dcp_load's check is exercised
    manager._verified = set()
    with pytest.raises(CheckpointCorrupted, match=re.escape(str(ckpt / "__1_0.distcp"))):
        manager.dcp_load({}, str(ckpt), from_hf=False, from_quantized=False)


def test_step_jsonl_keeps_one_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = StepJsonl(str(path))
    for step in range(1, 6):
        first.write({"step": step, "loss": float(step)})
    resumed = StepJsonl(str(path))  # a run resumed from a step-3 checkpoint re-runs 4 and 5
    for step in (4, 5, 6):
        resumed.write({"step": step, "loss": 10.0 * step})
    records = read_metrics_jsonl(str(path))
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert [records[s]["loss"] for s in range(1, 7)] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]
    fresh = StepJsonl(str(path))  # an unrelated fresh run in the same folder starts the file anew
    fresh.write({"step": 1, "loss": 7.0})
    assert read_metrics_jsonl(str(path)) == {1: {"step": 1, "loss": 7.0}}
    with open(path, "a") as f:
        f.write(json.dumps({"step": 1, "loss": 0.0}) + "\n")
    with pytest.raises(ValueError, match="step 1 is recorded twice"):
        read_metrics_jsonl(str(path))


def test_tensorboard_folder_per_run_even_in_the_same_second(tmp_path):
    from titan_cp.components.metrics import _run_folder

    first, second = _run_folder(str(tmp_path)), _run_folder(str(tmp_path))
    assert first != second and os.path.isdir(first) and os.path.isdir(second)


# --- real runs ------------------------------------------------------------------------------


def _launch(dump: Path) -> str:
    cmd = [
        "torchrun", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
        "--job.config_file", str(REPO / "train_configs" / "cp2.toml"),
        *common_args(), *SYNTHETIC_DATA,
        "--training.steps", str(STEPS),
        "--training.local_batch_size", "4",
        "--checkpoint.interval", "1",
        "--checkpoint.async_mode", "async",  # manifests of async saves: written when the save is awaited
        "--metrics.enable_tensorboard",
        "--job.dump_folder", str(dump),
    ]
    env = {**run_env(), "LOG_RANK": "0"}  # the default: rank 0 logs everything, other ranks warnings only
    proc = subprocess.run(cmd, cwd=dump.parent, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (dump.parent / f"{dump.name}.log").write_text(log)
    assert proc.returncode == 0, f"run in {dump} failed (rc {proc.returncode}):\n{log[-6000:]}"
    return log


class Runs:
    def __init__(self, root: Path):
        self.root = root
        self.full = root / "full"
        self.full_log = _launch(self.full)
        self.pristine = root / "pristine_step6"
        shutil.copytree(self.full / "checkpoint" / f"step-{STEPS}", self.pristine)
        # the same folder after a crash that damaged the newest checkpoints, then the same command again
        self.damaged = root / "damaged"
        shutil.copytree(self.full, self.damaged)
        ckpt = self.damaged / "checkpoint"
        os.truncate(ckpt / "step-6" / "__1_0.distcp", os.path.getsize(ckpt / "step-6" / "__1_0.distcp") // 2)
        _write_random_bytes(ckpt / "step-5" / "__0_0.distcp")
        os.remove(ckpt / "step-4" / MANIFEST)
        self.damaged_files = {
            6: str(ckpt / "step-6" / "__1_0.distcp"),
            5: str(ckpt / "step-5" / "__0_0.distcp"),
            4: f"{ckpt / 'step-4'}: it has no {MANIFEST}",
        }
        self.resumed_log = _launch(self.damaged)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("reliability"))


def _records(dump: Path) -> dict[int, dict]:
    return read_metrics_jsonl(str(dump / "metrics.jsonl"))


def _model_params(folder: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{folder.name}-{abs(hash(str(folder)))}.pt"
    dcp_to_torch_save(str(folder), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@needs_torchrun
def test_damaged_checkpoints_named_and_skipped(runs):
    warnings = [line for line in runs.resumed_log.splitlines() if "Skipping checkpoint" in line]
    for step, named in runs.damaged_files.items():
        assert sum(named in line for line in warnings) == 1, f"step-{step}: {named!r} not named once in {warnings}"
    assert f"step-{GOOD_STEP + 1}" in runs.damaged_files[4]
    assert re.search(rf"Checkpoint \S*step-{GOOD_STEP} matches its manifest", runs.resumed_log)
    assert f"Training starts at step {GOOD_STEP + 1}" in runs.resumed_log
    # every save of the uninterrupted run finished with a manifest that checks out
    for step in range(1, STEPS + 1):
        assert verify_checkpoint(str(runs.full / "checkpoint" / f"step-{step}")) == []


@needs_torchrun
def test_fallback_resume_reproduces_uninterrupted_run(runs, tmp_path):
    full, resumed = _records(runs.full), _records(runs.damaged)
    for step in range(GOOD_STEP + 1, STEPS + 1):
        want, got = full[step]["loss"], resumed[step]["loss"]
        assert abs(got - want) <= RESUME_REL_TOL * abs(want), (step, got, want)
    want = _model_params(runs.pristine, tmp_path)
    got = _model_params(runs.damaged / "checkpoint" / f"step-{STEPS}", tmp_path)
    model_keys = [k for k in want if not k.startswith(("optimizer", "lr_scheduler", "dataloader", "train_state"))]
    assert len(model_keys) > 10 and set(want) == set(got)
    for key in want:
        scale = want[key].abs().max().clamp_min(1e-30)
        assert (got[key] - want[key]).abs().max() <= RESUME_REL_TOL * scale, key
    assert verify_checkpoint(str(runs.damaged / "checkpoint" / f"step-{STEPS}")) == []


@needs_torchrun
def test_metrics_one_record_per_step_and_one_tensorboard_folder_per_run(runs):
    full, resumed = _records(runs.full), _records(runs.damaged)  # read_metrics_jsonl rejects repeats
    assert sorted(full) == sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, GOOD_STEP + 1):  # kept from the first run, not re-logged
        assert resumed[step] == full[step]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_dirs = sorted(p for p in (runs.damaged / "tb").iterdir())
    assert len(tb_dirs) == 2, f"expected the first run's and the resumed run's folders, got {tb_dirs}"
    steps_per_dir = []
    for d in tb_dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        steps_per_dir.append([e.step for e in acc.Scalars("loss_metrics/global_avg_loss")])
    assert steps_per_dir == [list(range(1, STEPS + 1)), list(range(GOOD_STEP + 1, STEPS + 1))]


@needs_torchrun
def test_max_loss_at_least_loss_under_cp(runs):
    """max_loss is the worst CP shard's mean loss: between loss and cp x loss (it was loss / cp)."""
    for step, rec in _records(runs.full).items():
        assert rec["loss"] * (1 - 1e-6) <= rec["max_loss"] <= 2 * rec["loss"], (step, rec["loss"], rec["max_loss"])
    assert any(rec["max_loss"] > rec["loss"] * (1 + 1e-4) for rec in _records(runs.full).values()), \
        "two CP shards of packed documents should not have identical losses"


@needs_torchrun
def test_two_rank_run_logs_each_line_once(runs):
    lines = runs.full_log.splitlines()

    def count(pattern: str) -> int:
        return sum(1 for line in lines if re.search(pattern, line))

    for step in range(1, STEPS + 1):
        assert count(rf"step: {step}/{STEPS}\s.*loss:") == 1, f"step {step} line not printed exactly once"
        if step > 1:
            assert count(rf"step: {step}/{STEPS}\s.*ETA \d+:\d\d:\d\d") == 1, f"no ETA on step {step}"
    for once in ("Training starts at step 1", "Training completed", "Building gdn debug", "Trainer is initialized"):
        assert count(re.escape(once)) == 1, f"{once!r} printed {count(re.escape(once))} times"
    assert count(r"INFO - \[rank 1\]") == 0


def test_rank_filter_passes_warnings_from_every_rank():
    import logging

    from titan_cp.components.run_logging import RankFilter

    def record(level: int) -> logging.LogRecord:
        return logging.LogRecord("root", level, __file__, 1, "msg", None, None)

    quiet, loud = RankFilter(1, {0}), RankFilter(0, {0})
    assert not quiet.filter(record(logging.INFO))
    warning = record(logging.WARNING)
    assert quiet.filter(warning) and warning.getMessage() == "[rank 1] msg"
    assert loud.filter(record(logging.INFO)) and RankFilter(3, None).filter(record(logging.INFO))
    # the step line comes from the rank holding the loss (the last stage under PP) only
    from titan_cp.components.run_logging import STEP_LINE_ATTR, set_step_line_rank

    step_line = record(logging.INFO)
    setattr(step_line, STEP_LINE_ATTR, True)
    try:
        set_step_line_rank(1)
        assert RankFilter(1, {0}).filter(step_line) and not RankFilter(0, {0}).filter(step_line)
    finally:
        set_step_line_rank(0)
    assert RankFilter(0, {0}).filter(step_line) and not RankFilter(1, {0}).filter(step_line)
