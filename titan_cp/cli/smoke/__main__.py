"""``python -m titan_cp.cli.smoke --nproc N``: see the package docstring."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from titan_cp.cli.smoke import checks, plan, report


@dataclass
class Args:
    nproc: int
    """ranks this runner has (GPUs, or CPU processes)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when torch sees at least --nproc GPUs, else cpu"""
    configs: tuple[str, ...] = ()
    """only these train_configs (file stems); default: every one that fits"""
    config_dir: Path = plan.TRAIN_CONFIGS
    """the folder of TOML jobs (the checkout's train_configs/)"""
    out: Path = Path("outputs/smoke")
    """runs, logs, summary.md, junit.xml"""
    seq_len: int = 128
    steps: int = 6
    checkpoint_step: int = 3
    """save here, resume from here"""
    rel_tol: float | None = None
    """per-step loss tolerance (default 1e-5 on CPU, 1e-3 on GPU)"""
    timeout: float = 900.0
    """seconds per launch"""
    reuse: bool = False
    """reuse seed checkpoints and reference runs found in --out"""


def parse(argv: list[str] | None = None) -> Args:
    import tyro

    return tyro.cli(Args, args=argv, prog="python -m titan_cp.cli.smoke",
                    description=sys.modules["titan_cp.cli.smoke"].__doc__)


def settings_from(a: Args) -> plan.Settings:
    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= a.nproc else "cpu"
    if not 0 < a.checkpoint_step < a.steps:
        raise SystemExit(f"--checkpoint-step {a.checkpoint_step} must lie inside 1..{a.steps - 1} (--steps {a.steps})")
    rel_tol = a.rel_tol if a.rel_tol is not None else (1e-5 if device == "cpu" else 1e-3)
    return plan.Settings(a.nproc, device, a.out.resolve(), a.seq_len, a.steps, a.checkpoint_step, rel_tol,
                         a.timeout, a.reuse)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    plan.require_checkout()
    s = settings_from(a)
    start = time.perf_counter()
    configs = plan.discover(a.config_dir)
    unknown = sorted(set(a.configs or ()) - {c.name for c in configs})
    if unknown:
        raise SystemExit(f"--configs {unknown}: not in {a.config_dir} ({[c.name for c in configs]})")
    references = plan.plan(configs, s, a.configs)
    print(f"smoke: {s.nproc} ranks on {s.device} (kernel {s.kernel}), seq_len {s.seq_len}, {s.steps} steps, "
          f"checkpoint at {s.checkpoint_step}; results in {s.out}", flush=True)
    outcomes = []
    for ref in references:
        ref_dump = s.out / ref.key / "run"
        reference = None
        if not ref.config.own_initial_weights and not (s.reuse and plan.seed_path(s, ref).is_dir()):
            print(f"  seed checkpoint for {ref.members}", flush=True)
            seed = checks.launch(plan.seed_command(s, ref), s.out / ref.key / "seed", s)
            if not seed.ok:
                print(f"  seed checkpoint FAILED (every run of {ref.members} will too): {seed.detail}", flush=True)
        if s.reuse and (ref_dump / "metrics.jsonl").exists():
            reference = checks.Launch(True, checks.read_metrics_jsonl(str(ref_dump / "metrics.jsonl")), ref_dump, 0.0)
        else:
            print(f"  1-rank reference for {ref.members}", flush=True)
            reference = checks.launch(plan.reference_command(s, ref), ref_dump, s)
        for c in (c for c in configs if c.reference is ref):
            print(f"  {c.name} on {c.world} ranks ({c.layout})", flush=True)
            run = checks.launch(plan.run_command(s, c), s.out / c.name / "run", s)
            resume = checks.launch(plan.resume_command(s, c), s.out / c.name / "resume", s) if run.ok else None
            outcomes.append(checks.check_config(c, run, resume, reference if reference.ok else None, s))
            print(report.details(outcomes[-1:]), end="", flush=True)
    skipped = [c for c in configs if c.skip]
    summary = report.table(outcomes, skipped)
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "summary.md").write_text(summary)
    (s.out / "junit.xml").write_text(report.junit_xml(outcomes, skipped, time.perf_counter() - start))
    print("\n" + summary, flush=True)
    failed = [o.config.name for o in outcomes if not o.passed]
    if not outcomes:
        print("smoke: no config fits this runner", flush=True)
        return 1
    print(f"smoke: {len(outcomes) - len(failed)} passed, {len(failed)} failed {failed or ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
