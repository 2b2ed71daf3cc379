"""Run one config's launches and check them: each check is a (name, passed, detail) row.

Checks, per config (``Settings``: steps N, checkpoint step c, tolerance r):

- ``runs``: ``torchrun train.py`` exits 0 (its log is kept next to the run);
- ``loss finite and falls``: every logged loss is finite, the last below the first;
- ``matches CP=1``: every step's loss within relative r of the 1-rank reference run
  of the same model, seed checkpoint and global batch (configs on more than one rank);
- ``checkpoint resumes``: the run continued from its step-c checkpoint logs steps
  c+1..N with the uninterrupted run's losses (relative r);
- ``metrics reach TensorBoard``: the run's TensorBoard folder has per-rank peak memory
  and CP bytes for every rank, and CP traffic is nonzero under CP.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from titan_cp.components.metrics import read_metrics_jsonl
from titan_cp.cli.smoke.plan import REPO, Settings, ShippedConfig


@dataclass
class Launch:
    ok: bool
    records: dict[int, dict]
    log: Path
    seconds: float
    detail: str = ""


@dataclass
class Outcome:
    config: ShippedConfig
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    step_time_s: float | None = None
    peak_gib_per_rank: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


def launch(cmd: list[str], dump: Path, s: Settings) -> Launch:
    """Run ``cmd`` (a torchrun of train.py writing into ``dump``); keep its output in ``dump``.log."""
    shutil.rmtree(dump, ignore_errors=True)  # a stale checkpoint or metrics file would be read as this run's
    dump.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    log = dump.with_suffix(".log")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=s.timeout_s)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = f"{e.stdout or ''}{e.stderr or ''}\n[smoke] timed out after {s.timeout_s:.0f} s", -1
    seconds = time.perf_counter() - start
    log.write_text(" ".join(cmd) + "\n\n" + (output if isinstance(output, str) else output.decode()))
    metrics = dump / "metrics.jsonl"
    records = read_metrics_jsonl(str(metrics)) if metrics.exists() else {}
    detail = "" if rc == 0 else f"exit {rc}, see {log}: " + _last_error(output if isinstance(output, str) else "")
    return Launch(rc == 0, records, log, seconds, detail)


def _last_error(output: str) -> str:
    """The first exception line a rank printed (not torchrun's ChildFailedError trailer)."""
    lines = [ln for ln in output.splitlines() if ("Error:" in ln or "error:" in ln) and "ChildFailedError" not in ln]
    return lines[0].strip()[:300] if lines else "no error line"


def _losses(records: dict[int, dict], steps) -> list[float] | None:
    if any(step not in records for step in steps):
        return None
    return [records[step]["loss"] for step in steps]


def _close(got: list[float], want: list[float], rel: float) -> tuple[bool, str]:
    diffs = [abs(g - w) / max(abs(w), 1e-30) for g, w in zip(got, want)]
    worst = max(diffs) if diffs else 0.0
    return worst <= rel, f"max relative difference {worst:.1e} over {len(diffs)} steps (tolerance {rel:g})"


def check_config(c: ShippedConfig, run: Launch, resume: Launch | None, reference: Launch | None,
                 s: Settings) -> Outcome:
    out = Outcome(c)
    out.checks.append(("runs", run.ok, run.detail or f"{run.seconds:.0f} s"))
    steps = range(1, s.steps + 1)
    losses = _losses(run.records, steps)
    if losses is None:
        out.checks.append(("loss finite and falls", False, f"steps logged: {sorted(run.records)}"))
    else:
        finite = all(math.isfinite(x) for x in losses)
        falls = finite and losses[-1] < losses[0]
        out.checks.append(("loss finite and falls", falls, f"{losses[0]:.4f} -> {losses[-1]:.4f}"))
    if c.world > 1:
        want = None if reference is None else _losses(reference.records, steps)
        if losses is None or want is None:
            out.checks.append(("matches CP=1", False, "reference run missing" if want is None else "run missing"))
        else:
            out.checks.append(("matches CP=1", *_close(losses, want, s.rel_tol)))
    later = range(s.checkpoint_step + 1, s.steps + 1)
    resumed = None if resume is None else _losses(resume.records, later)
    if resumed is None or losses is None:
        why = "no resume run" if resume is None else (resume.detail or f"steps logged: {sorted(resume.records)}")
        out.checks.append(("checkpoint resumes", False, why))
    else:
        ok, detail = _close(resumed, losses[s.checkpoint_step:], s.rel_tol)
        out.checks.append(("checkpoint resumes", ok, f"from step {s.checkpoint_step}: {detail}"))
    tb_ok, tb_detail, out.step_time_s = _check_tensorboard(c, s)
    out.checks.append(("metrics reach TensorBoard", tb_ok, tb_detail))
    last = run.records.get(s.steps, {})
    out.peak_gib_per_rank = [last.get(f"memory/peak(GiB)/rank{r}", float("nan")) for r in range(c.world)]
    return out


def _check_tensorboard(c: ShippedConfig, s: Settings) -> tuple[bool, str, float | None]:
    """(passed, detail, median step time in s after the first step) from the run's TensorBoard folder."""
    tb_dirs = sorted((s.out / c.name / "run" / "tb").glob("*"))
    if not tb_dirs:
        return False, "no TensorBoard folder", None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dirs[-1]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    wanted = [f"{name}/rank{r}" for r in range(c.world) for name in ("memory/peak(GiB)", "cp/bytes_sent_per_step")]
    missing = [t for t in wanted if t not in tags]
    times = sorted(e.value for e in acc.Scalars("time_metrics/end_to_end(s)")[1:]) if (
        "time_metrics/end_to_end(s)" in tags) else []  # step 1 warms up
    step_time = times[len(times) // 2] if times else None
    if missing:
        return False, f"missing scalars {missing[:4]}", step_time
    sent = max((e.value for e in acc.Scalars("cp/bytes_sent_per_step/max")), default=0.0)
    if c.cp > 1 and sent <= 0:
        return False, "CP run recorded no CP bytes", step_time
    return True, f"{len(wanted)} per-rank scalars, CP {sent / 2**20:.3f} MiB/step sent (max rank)", step_time
