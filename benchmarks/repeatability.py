"""Five back-to-back runs of the speed benchmark's P = 2 figures: do they repeat?

Every run launches P = 2 ranks once per model and times, interleaved step by step
(forward and reversed order in turn, benchmarks/timing.py ``interleaved_order``),
three steps on every rank: its shard under CP, the same shard with cp = None, and the
whole sequence with cp = None. The minimum over the repeats is kept for each (noise on
a shared machine only ever adds time), and per run

    CP overhead  = (t(CP) - t(shard alone)) / t(CP)          mean over ranks
    matched      = (t(CP) - t(matched)) / t(CP)              mean over ranks
    scaling      = t(whole sequence alone) / t(CP step)      the same load, P = 2

(benchmarks/speed.py, strong scaling with ``--cp_sizes 2``). The shard alone is the rank's own
tokens (for zigzag its two segments, concatenated, as one sequence) with cp = None; t(matched) adds
the attention work the rank's queries do under CP beyond the shard's own causal block
(benchmarks/matched_reference.py has the definition). For the GDN model (no attention layers)
the two overheads are one figure. A core probe
(benchmarks/timing.py ``core_probe``) runs before the first run and after every run;
each run gets the quietness verdict of the probes around it. The summary gives, per
model, the five figures, their half-range (max - min) / 2 against the issue's spread
(+-1.5 points overhead, +-0.05x scaling) and the targets (overhead <= 5%, scaling
>= 1.9x). ``--require_quiet`` refuses to start on a busy machine (exit 3); otherwise
a busy run is flagged in the table and the JSON.

Models: ``gdn`` = the GDN debug model at the speed benchmark's defaults (dim 256,
2 layers, 4 heads x 64, contiguous layout), ``qwen3_5`` = TorchTitan's Qwen3.5 debug shape on
titan_cp's CP layers (3 GDN + 1 attention layers, benchmarks/qwen3_5_memory.py) in the layout of
``--qwen3_5_layout`` (default zigzag, what a hybrid trains with: docs/benchmarks.md section 4).

``--q_transition keep | recompute`` picks state-passing CP's q M mode (parallelism.cp_q_transition)
for the CP step; ``--ab_q_transition`` also times the other mode in the same interleaved rounds of
every launch and reports its overhead and scaling beside (an A/B under one load).

    python -m benchmarks.repeatability --runs 5 --json repeatability.json --markdown repeatability.md
    python -m benchmarks.repeatability --runs 1 --models gdn qwen3_5 --q_transition keep --ab_q_transition
    python -m benchmarks.repeatability --runs 1 --models qwen3_5 --qwen3_5_layout contiguous --q_transition keep
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from benchmarks.model_steps import keep_freed_memory, load_average, machine_description
from benchmarks.timing import core_probe, quietness

SPREAD = {"overhead_pct": 1.5, "matched_overhead_pct": 1.5, "scaling": 0.05}
"""Largest half-range (max - min) / 2 over the runs for a figure to count as repeating."""
TARGET = {"overhead_pct": ("<=", 5.0), "matched_overhead_pct": ("<=", 5.0), "scaling": (">=", 1.9)}


@dataclass
class Args:
    runs: int = 5
    """back-to-back runs"""
    models: tuple[Literal["gdn", "qwen3_5"], ...] = ("gdn", "qwen3_5")
    gdn_len: int = 4096
    """global L of the GDN debug model"""
    qwen3_5_len: int = 2048
    """global L of the Qwen3.5 debug shape"""
    qwen3_5_layout: Literal["zigzag", "contiguous"] = "zigzag"
    """CP layout of the Qwen3.5 debug shape (parallelism.cp_layout; the GDN model runs contiguous)"""
    repeats: int = 5
    """timed rounds per launch (after ``warmup``); the minimum is kept"""
    warmup: int = 1
    q_transition: Literal["recompute", "keep"] = "recompute"
    """state-passing CP's q M (parallelism.cp_q_transition) in the CP step"""
    ab_q_transition: bool = False
    """also time the other q M mode in the same rounds; its figures go beside"""
    require_quiet: bool = False
    """refuse to run (exit 3) when the first core probe says the machine is busy"""
    json: Path | None = None
    markdown: Path | None = None
    """write the table here as markdown"""


def speed_argv(model: str, L: int, repeats: int, warmup: int, q_transition: str = "recompute",
               ab_q_transition: bool = False, layout: str = "contiguous") -> list[str]:
    """The speed benchmark's command line for one P = 2 strong-scaling launch."""
    argv = ["--cp_sizes", "2", "--strong_len", str(L), "--weak_per_rank", "0", "--repeats", str(repeats),
            "--warmup", str(warmup), "--model", model, "--no_probe", "--q_transition", q_transition,
            "--layout", layout]
    return argv + (["--ab_q_transition"] if ab_q_transition else [])


def speed_args(model: str, L: int, repeats: int, warmup: int, q_transition: str = "recompute",
               ab_q_transition: bool = False, layout: str = "contiguous"):
    """The speed benchmark's arguments (its own parser and defaults) for one P = 2 strong-scaling launch."""
    from benchmarks.speed import parse_args

    a = parse_args(speed_argv(model, L, repeats, warmup, q_transition, ab_q_transition, layout))
    a.bytes_lens = ()
    return a


def one_launch(model: str, L: int, repeats: int, warmup: int, q_transition: str = "recompute",
               ab_q_transition: bool = False, layout: str = "contiguous") -> dict:
    """The P = 2 overheads (% of the CP step: vs the shard alone and vs the work-matched reference) and
    same-load scaling of one launch (``ab_q_transition``: also of CP with the other q M mode, timed in
    the same rounds: the ``other_*`` keys)."""
    from benchmarks.speed import run_scaling

    a = speed_args(model, L, repeats, warmup, q_transition, ab_q_transition, layout)
    margs = a.model_args()
    result = run_scaling(a, margs)
    over = result["overhead"][0]
    strong = next(r for r in result["scaling"] if r.get("kind") == "strong")
    other = {}
    if "step_cp_other_s" in over:
        other = {"other_q_transition": over["other_q_transition"], "other_step_cp_s": over["step_cp_other_s"],
                 "other_overhead_pct": 100 * over["overhead_fraction_other"],
                 "other_cpu_overhead_pct": 100 * over["cpu_overhead_fraction_other"],
                 "other_matched_overhead_pct": 100 * over["overhead_fraction_matched_other"],
                 "other_scaling": over["same_load_speedup_other"]}
    return {"model": model, "L": L, "layout": layout, "q_transition": q_transition, **other,
            "overhead_pct": 100 * over["overhead_fraction"],
            "matched_overhead_pct": 100 * over["overhead_fraction_matched"],
            "cpu_matched_overhead_pct": 100 * over["cpu_overhead_fraction_matched"],
            "step_matched_s": over["step_matched_s"], "attention_layers": over["attention_layers"],
            "matched_definition": over["matched_definition"],
            **{k: over[k] for k in ("attention_extra_per_rank_s", "attention_blocks_in_step_s") if k in over},
            "scaling": strong["same_load_speedup"], "step_cp_s": over["step_cp_s"],
            "step_alone_s": over["step_alone_s"], "full_alone_s": strong["same_load_full_step_s"],
            "cpu_overhead_pct": 100 * over["cpu_overhead_fraction"], "cpu_scaling": strong["same_load_cpu_speedup"],
            "load_average": over["load_average"], "description": margs.describe()}


def summarize_runs(rows: list[dict]) -> dict:
    """Per model and figure: the runs' values, min, max, half-range, within the spread, target met."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        figures = {}
        for key, limit in SPREAD.items():
            values = [r[key] for r in mine]
            half = (max(values) - min(values)) / 2
            op, target = TARGET[key]
            met = [v <= target if op == "<=" else v >= target for v in values]
            figures[key] = {"values": values, "min": min(values), "max": max(values), "half_range": half,
                            "within_spread": half <= limit, "spread_limit": limit, "target": f"{op} {target}",
                            "target_met_every_run": all(met)}
        out[model] = {"figures": figures, "all_runs_quiet": all(r["quiet"] for r in mine)}
    return out


def table(rows: list[dict], summary: dict) -> str:
    ab = any("other_overhead_pct" in r for r in rows)
    lines = ["| run | model | L | layout | q M | CP overhead vs shard alone (% of step) | vs work-matched reference | "
             "scaling P = 2 | CP step s | shard alone s | matched reference s | whole L alone s | "
             + ("other q M, same rounds: overhead / matched / scaling / CP step s | " if ab else "")
             + "quiet |", "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ab else "") + "---|"]
    for r in rows:
        other = (f"{r['other_q_transition']}: {r['other_overhead_pct']:+.1f} / {r['other_matched_overhead_pct']:+.1f} / "
                 f"{r['other_scaling']:.2f}x / {r['other_step_cp_s']:.3f} | " if ab else "")
        matched = f"{r['matched_overhead_pct']:+.1f}" if r["attention_layers"] else "(same: no attention)"
        lines.append(f"| {r['run']} | {r['model']} | {r['L']:,} | {r['layout']} | {r['q_transition']} | "
                     f"{r['overhead_pct']:+.1f} | {matched} | {r['scaling']:.2f}x | {r['step_cp_s']:.3f} | "
                     f"{r['step_alone_s']:.3f} | {r['step_matched_s']:.3f} | {r['full_alone_s']:.3f} | "
                     f"{other}{'yes' if r['quiet'] else 'NO: ' + '; '.join(r['quiet_reasons'])} |")
    lines += ["", "| model | figure | min | max | half-range (limit) | within spread | target | met every run |",
              "|---|---|---|---|---|---|---|---|"]
    for model, s in summary.items():
        for key, f in s["figures"].items():
            lines.append(f"| {model} | {key} | {f['min']:.2f} | {f['max']:.2f} | {f['half_range']:.2f} "
                         f"({f['spread_limit']}) | {'yes' if f['within_spread'] else 'no'} | {f['target']} | "
                         f"{'yes' if f['target_met_every_run'] else 'no'} |")
    definitions = dict.fromkeys(r["matched_definition"] for r in rows)
    return "\n".join(lines + [""] + [f"Definitions: {d}" for d in definitions])


def main(argv=None) -> int:
    args = tyro.cli(Args, args=argv, prog="python -m benchmarks.repeatability", description=__doc__)
    cores = os.cpu_count()
    machine = machine_description() + "; " + keep_freed_memory(True)
    print(f"# machine: {machine}", flush=True)
    probes = [core_probe(cores)]
    first = quietness(probes[0], None, cores)
    if args.require_quiet and not first["quiet"]:
        print("# REFUSED: machine not quiet enough for a timing figure: " + "; ".join(first["reasons"]))
        return 3
    t0 = time.perf_counter()
    rows = []
    lens = {"gdn": args.gdn_len, "qwen3_5": args.qwen3_5_len}
    layouts = {"gdn": "contiguous", "qwen3_5": args.qwen3_5_layout}
    for run in range(1, args.runs + 1):
        launched = [one_launch(m, lens[m], args.repeats, args.warmup, args.q_transition, args.ab_q_transition,
                               layouts[m]) for m in args.models]
        probes.append(core_probe(cores))
        verdict = quietness(probes[-2], probes[-1], cores, check_load=run == 1)  # later: our own runs' load
        for row in launched:
            rows.append({"run": run, **row, "quiet": verdict["quiet"], "quiet_reasons": verdict["reasons"]})
            other = (f"; {row['other_q_transition']} (same rounds): {row['other_overhead_pct']:+.1f}%, "
                     f"{row['other_scaling']:.2f}x; CPU-time overhead {row['cpu_overhead_pct']:+.1f}% / "
                     f"{row['other_cpu_overhead_pct']:+.1f}%" if "other_overhead_pct" in row else "")
            matched = (f", vs work-matched reference {row['matched_overhead_pct']:+.1f}%" if row["attention_layers"]
                       else "")
            print(f"# run {run} {row['model']} ({row['layout']}, q M {row['q_transition']}): overhead "
                  f"{row['overhead_pct']:+.1f}%{matched}, scaling {row['scaling']:.2f}x{other}"
                  f"{'' if verdict['quiet'] else ' (FLAGGED: not quiet)'}", flush=True)
    summary = summarize_runs(rows)
    text = table(rows, summary)
    print(text)
    wall = time.perf_counter() - t0
    print(f"# {args.runs} runs in {wall:.0f} s, load average {load_average():.1f} at the end")
    if not all(s["all_runs_quiet"] for s in summary.values()):
        print("# FLAGGED: some runs were taken on a busy machine: not quiet figures")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "probes": probes, "machine": machine,
                                         "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": wall,
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
        print(f"# wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(text + "\n")
        print(f"# wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
