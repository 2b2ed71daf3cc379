#!/usr/bin/env python
"""Per-rank memory of a GDN LM training step under context parallelism.

For CP sizes P (default 1, 2, 4, 8) and global sequence lengths L it runs one
forward + backward step (chunked loss, as TorchTitan's ``ChunkedLossWrapper``)
on P ranks (one process each, started here) and reports per rank:

    seq len, tokens per rank, model (parameter) memory, peak memory,
    activation memory, status (ok / OOM / skipped), reduction vs CP = 1,
    and the analytic estimate (titan_cp.analysis.memory) with its error.

How memory is measured
----------------------
- GPU (CUDA available): ``torch.cuda.max_memory_allocated`` over the step
  (peak, absolute: parameters included) and ``memory_allocated`` after the
  forward minus before it (live after forward).
- CPU: a tracked-allocator peak. ``torch.profiler`` with ``profile_memory``
  records every CPU allocation and free during the step; their running sum,
  in time order, is the bytes the step allocated on top of what existed before
  it; peak = parameter bytes + the maximum of that running sum.
- Both: *activation memory* = the distinct storages autograd saves for the
  backward during the decoder forward (``torch.autograd.graph.saved_tensors_hooks``,
  parameters excluded, each storage counted once at its full size) plus the
  decoder output held for the chunked loss. That is what the estimator's
  activation terms predict.

Parameters are replicated on every CP rank here (no FSDP; the estimator's
static terms are taken with ``fsdp_over_cp=False`` to match), no optimizer
step runs (no optimizer states), gradients are fp32.

The estimate uses the calibration profile of the kernel that runs
(:func:`titan_cp.analysis.profiles.kernel_profile`). ``--max_gib`` bounds the whole
run (all ranks of one P share this machine on CPU): rows whose estimate
exceeds it are skipped rather than risking the machine.

    python -m benchmarks.memory                    # P 1,2,4,8 x L 2K..16K, a few minutes on 2 cores
    python -m benchmarks.memory --quick            # P 1,2,4 x L 1K,2K, about a minute
    python -m benchmarks.memory --seq_lens 4096 16384 65536 --json mem.json
    python -m benchmarks.memory --cp_sizes 1 2 --flavor 340M --seq_lens 8192   # on GPUs
    python -m benchmarks.memory --model qwen3_5 --cp_sizes 1 2 4 --seq_lens 2048 4096 8192
                                          # Qwen3.5 debug model, + saved bytes per GDN / attention layer

The model, batches, training step and launcher it shares with benchmarks/speed.py live in
benchmarks/model_steps.py; what each rank runs, in benchmarks/memory_rank.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from benchmarks.memory_rank import measure_rank
from benchmarks.qwen3_5_memory import Layout, layer_kind_rows
from benchmarks.model_steps import (  # noqa: E402
    ModelArgs,
    ModelFlags,
    OutputFlags,
    StepFlags,
    parse_flags,
    machine_description,
    load_average,
    can_launch,
    launch,
)

MiB = float(1 << 20)
GiB = float(1 << 30)


# --------------------------------------------------------------------------- estimator


def estimate_row(margs, L: int, layout: Layout, batch: int, loss_chunks: int):
    """The estimator's per-rank figures for ``layout`` as the benchmark runs it: no optimizer step, no FSDP
    (``fsdp_over_cp=False``; EP's extra data-parallel ranks hold replicas: ``replicate``)."""
    from titan_cp.analysis.memory import estimate_memory
    from titan_cp.analysis.train_setup import Parallelism, TrainSetup, block_attention_terms
    from titan_cp.analysis.profiles import kernel_profile

    from titan_cp.analysis.qwen3_5_memory import is_qwen3_5

    c = margs.config()
    dt = {"float32": "fp32", "bfloat16": "bf16", "float64": "fp32"}[margs.dtype]
    prof = None if is_qwen3_5(c) else kernel_profile(c.kernel, c, dt)  # Qwen3.5: its own kernel terms
    setup = TrainSetup(seq_len=L, batch=batch, param_dtype=dt, act_dtype=dt, grad_dtype=dt, optimizer_states=0,
                       loss_chunks=loss_chunks, cp_exchange=margs.exchange, cp_layout=margs.layout,
                       cp_q_transition=margs.q_transition, **(prof.setup if prof else {}),
                       **block_attention_terms("cuda" if torch.cuda.is_available() else "cpu"))
    par = Parallelism(cp=layout.cp, tp=layout.tp, sequence_parallel=layout.sp, ep=layout.ep, replicate=layout.dp,
                      fsdp_over_cp=False)
    return estimate_memory(c, setup, par, calibration=prof.calibration if prof else None)


# --------------------------------------------------------------------------- main


def _fmt_mib(b) -> str:
    return "-" if b is None else f"{b / MiB:,.1f}"


def _err(pred, meas) -> str:
    return "-" if not meas else f"{100 * (pred - meas) / meas:+.1f}%"


def run(a: MemoryArgs) -> dict:
    margs = a.model_args()
    margs.config()  # unknown flavors / fields fail here, before any rank starts
    from titan_cp.cp.layout import num_segments

    rows = []
    print(f"# benchmark_memory: {margs.describe()}, batch {a.batch}, loss chunks {a.loss_chunks}")
    machine = machine_description()
    print(f"# machine: {machine}")
    method = ("torch.cuda.max_memory_allocated (peak, absolute)" if torch.cuda.is_available() else
              "CPU tracked-allocator peak: parameter bytes + max running sum of torch.profiler allocation events")
    if not a.peak:
        method = "not measured (--no_peak)"
    print(f"# peak memory: {method}")
    print("# activation memory: distinct storages saved for backward in the decoder forward "
          "(saved_tensors_hooks) + the decoder output held for the chunked loss")
    layouts = a.all_layouts()
    for world in sorted({layout.world for layout in layouts}):  # one launch per world size, its layouts in turn
        group = [layout for layout in layouts if layout.world == world]
        ok, why = can_launch(world)
        skip = {}
        for layout in group:
            for L in a.seq_lens:
                if L % num_segments(layout.cp, margs.layout) or (L // layout.cp) % (layout.tp if layout.sp else 1):
                    skip.setdefault(str(layout), {})[L] = f"seq_len {L} does not divide into the shards of {layout}"
                    continue
                if not margs.has_estimate:
                    continue
                est = estimate_row(margs, L, layout, a.batch, a.loss_chunks)
                if not torch.cuda.is_available() and est.total * world > a.max_gib * GiB:
                    skip.setdefault(str(layout), {})[L] = \
                        f"estimate {est.total * world / GiB:.1f} GiB for {world} ranks > --max_gib {a.max_gib}"
        if not ok:
            rows += [{"layout": str(layout), "P": layout.cp, "seq_len": L, "tokens_per_rank": a.batch * L // layout.cp,
                      "status": "skipped", "note": why} for layout in group for L in a.seq_lens]
            continue
        t0 = time.perf_counter()
        per_rank = launch(measure_rank, world, (margs, group, a.seq_lens, a.batch, a.loss_chunks, skip, a.peak),
                          threads=a.threads)
        print(f"# {world} rank(s) ({', '.join(map(str, group))}): {time.perf_counter() - t0:.0f} s wall, "
              f"load average {load_average():.1f}", flush=True)
        for i, rank_rows in enumerate(zip(*per_rank)):
            layout, L = group[i // len(a.seq_lens)], a.seq_lens[i % len(a.seq_lens)]
            row = dict(rank_rows[0])
            if row["status"] == "ok":
                # the table reports the worst rank
                for key in ("saved_bytes", "activation_bytes", "live_after_forward_bytes", "peak_bytes",
                            "peak_delta_bytes", "step_s", "param_bytes"):
                    if key in row:  # the peak keys: unless --no_peak
                        row[key] = max(r[key] for r in rank_rows)
                row["per_rank_activation_bytes"] = [r["activation_bytes"] for r in rank_rows]
                row["saved_by_kind"] = max(rank_rows, key=lambda r: r["activation_bytes"])["saved_by_kind"]
                row["per_rank_peak_bytes"] = [r.get("peak_bytes") for r in rank_rows]
            if margs.has_estimate and (row["status"] != "skipped" or "estimate" in row.get("note", "")):
                est = estimate_row(margs, L, layout, a.batch, a.loss_chunks)
                row["estimate"] = {"peak_bytes": est.total, "activation_bytes": est.activations + est.model_activations,
                                   "static_bytes": est.static, "transient_bytes": est.transient}
            rows.append(row)
    # reductions vs one rank at the same L
    base = {r["seq_len"]: r for r in rows if r["layout"] == str(Layout()) and r["status"] == "ok"}
    for r in rows:
        b = base.get(r["seq_len"])
        if r["status"] == "ok" and b:
            r["activation_reduction"] = b["activation_bytes"] / r["activation_bytes"]
            if "peak_bytes" in r:
                r["peak_reduction"] = b["peak_bytes"] / r["peak_bytes"]
    return {"model": asdict(margs), "model_description": margs.describe(), "machine": machine,
            "peak_method": method, "batch": a.batch, "loss_chunks": a.loss_chunks, "threads_per_rank": a.threads,
            "date": time.strftime("%Y-%m-%d"), "rows": rows,
            "targets": targets(rows, a, 0.9 if a.model == "qwen3_5" else 0.95)}


def reestimate(result: dict, a: MemoryArgs) -> dict:
    """A saved result with every estimate recomputed by the estimator as it is now (the measurement does not
    depend on it); the model flags must describe the saved run's model."""
    margs = a.model_args()
    if margs.describe() != result["model_description"]:
        raise SystemExit(f"--from_json {a.from_json} measured '{result['model_description']}', the flags describe "
                         f"'{margs.describe()}': pass the run's --model / --flavor / --kernel / --dtype")
    for r in result["rows"]:
        if "estimate" in r:
            layout = Layout(cp=r["P"], tp=r.get("tp", 1), sp=r.get("sp", False), ep=r.get("ep", 1))
            est = estimate_row(margs, r["seq_len"], layout, result["batch"], result["loss_chunks"])
            r["estimate"] = {"peak_bytes": est.total, "activation_bytes": est.activations + est.model_activations,
                             "static_bytes": est.static, "transient_bytes": est.transient}
    result["targets"] = targets(result["rows"], a, 0.9 if a.model == "qwen3_5" else 0.95)
    return result


def targets(rows, a, factor: float = 0.95) -> dict:
    """Activation memory cut by >= ``factor`` P at the longest L measured for every P; estimator within 5%."""
    out = {}
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        cp_only = [r for r in ok if r["layout"] == str(Layout(cp=r["P"]))]
        longest = max(r["seq_len"] for r in cp_only if r["P"] == 1) if any(r["P"] == 1 for r in cp_only) else None
        for r in cp_only:
            if r["seq_len"] == longest and r["P"] > 1 and "activation_reduction" in r:
                out[f"activation_cut_P{r['P']}_L{longest}"] = {
                    "reduction": r["activation_reduction"], "target": factor * r["P"],
                    "met": r["activation_reduction"] >= factor * r["P"]}
        errs = []
        for r in ok:
            if "estimate" in r:
                if "peak_bytes" in r:
                    errs.append(abs(r["estimate"]["peak_bytes"] - r["peak_bytes"]) / r["peak_bytes"])
                errs.append(abs(r["estimate"]["activation_bytes"] - r["activation_bytes"]) / r["activation_bytes"])
        if errs:
            out["estimator_within_5pct"] = {"max_abs_error": max(errs), "met": max(errs) <= 0.05}
    return out


def print_table(result: dict, markdown: bool = False) -> str:
    head = ["layout", "seq len", "tokens/rank", "model MiB", "peak MiB", "act MiB", "status", "act cut", "peak cut",
            "est peak MiB (err)", "est act MiB (err)"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append("  ".join(f"{h:>23s}" if i == 0 else f"{h:>14s}" if i > 5 else f"{h:>11s}"
                               for i, h in enumerate(head)))
    for r in result["rows"]:
        est = r.get("estimate")
        cells = [r["layout"], f"{r['seq_len']:,}", f"{r['tokens_per_rank']:,}", _fmt_mib(r.get("param_bytes")),
                 _fmt_mib(r.get("peak_bytes")), _fmt_mib(r.get("activation_bytes")),
                 r["status"] + (f" ({r['note']})" if r.get("note") and markdown else ""),
                 f"{r['activation_reduction']:.2f}x" if "activation_reduction" in r else "-",
                 f"{r['peak_reduction']:.2f}x" if "peak_reduction" in r else "-",
                 f"{est['peak_bytes'] / MiB:,.1f} ({_err(est['peak_bytes'], r.get('peak_bytes'))})" if est else "-",
                 f"{est['activation_bytes'] / MiB:,.1f} ({_err(est['activation_bytes'], r.get('activation_bytes'))})"
                 if est else "-"]
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append("  ".join(f"{c:>23s}" if i == 0 else f"{c:>14s}" if i > 5 else f"{c:>11s}"
                                   for i, c in enumerate(cells)))
    return "\n".join(lines)


def plot_memory(result: dict, path: Path) -> None:
    """Per-rank activation and peak memory vs global L, one line per CP size (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmarks.figure import save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    layouts = list(dict.fromkeys(r["layout"] for r in result["rows"] if r["status"] == "ok"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, layout in enumerate(layouts):
        rows = sorted((r for r in result["rows"] if r["layout"] == layout and r["status"] == "ok"),
                      key=lambda r: r["seq_len"])
        L = [r["seq_len"] for r in rows]
        c = colors[i % len(colors)]
        ax.plot(L, [r["peak_bytes"] / MiB for r in rows], "o-", color=c, label=f"{layout} peak")
        ax.plot(L, [r["activation_bytes"] / MiB for r in rows], "s--", color=c, alpha=0.7,
                label=f"{layout} activations")
        est = [r["estimate"]["peak_bytes"] / MiB for r in rows if "estimate" in r]
        if len(est) == len(rows):
            ax.plot(L, est, ":", color=c, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("global sequence length L (tokens)")
    ax.set_ylabel("per-rank memory (MiB)")
    ax.set_title("Per-rank memory vs L, worst rank (dotted: estimator's peak)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path, f"{result['model_description']}\n{result['machine']}")


@dataclass
class MemoryArgs(OutputFlags, StepFlags, ModelFlags):
    """The memory benchmark's command line: the shared flag groups (benchmarks/model_steps.py) and its own."""

    seq_lens: tuple[int, ...] = (2048, 4096, 8192, 16384)
    """global sequence lengths L"""
    max_gib: float = 8.0
    """CPU: skip rows whose estimate for all P ranks together exceeds this"""
    quick: bool = False
    """P 1,2,4 and L 1K,2K (about a minute)"""
    peak: bool = True
    """measure the allocator's peak (--no_peak: activation bytes only, a shorter run)"""
    estimate_only: bool = False
    """print the estimator's activation cut vs CP = 1 for --cp_sizes x --seq_lens; run nothing"""
    layouts: tuple[str, ...] = ()
    """--model qwen3_5: layouts beside --cp_sizes, e.g. tp2 tp2sp cp2xtp2 ep2 cp2xep2 cp2xtp2xep2 (cp<N>, tp<N>,
    tp<N>sp = with sequence parallel, ep<N> = MoE flavors; joined by x). With --layouts and no --cp_sizes:
    only these"""

    def all_layouts(self) -> list[Layout]:
        """--cp_sizes as CP-only layouts, then --layouts (each once)."""
        out = [Layout(cp=P) for P in self.cp_sizes]
        for text in self.layouts:
            layout = Layout.parse(text)
            if layout not in out:
                out.append(layout)
        return out


def parse_args(argv=None) -> MemoryArgs:
    a = parse_flags(MemoryArgs, argv, "python -m benchmarks.memory", __doc__)
    if a.cp_sizes is None:
        a.cp_sizes = () if a.layouts else (1, 2, 4, 8)
    try:
        layouts = a.all_layouts()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if any(not layout.cp_only for layout in layouts) and a.model != "qwen3_5":
        raise SystemExit("--layouts with tp / ep: --model qwen3_5 only (the GDN LM's benchmark runs CP layouts); "
                         "use --cp_sizes, or --model qwen3_5")
    if any(layout.ep > 1 for layout in layouts) and not a.model_args().has_experts:
        raise SystemExit(f"--layouts ep<N>: --flavor {a.flavor} has no routed experts; use --flavor debug_moe "
                         "(or drop the ep part)")
    if a.quick:
        a.cp_sizes, a.seq_lens = (1, 2, 4), (1024, 2048)
    a.seq_lens = tuple(sorted(a.seq_lens))
    return a


def print_estimated_cut(a) -> None:
    """Activation memory (saved tensors + decoder output) per rank from the estimator, and its cut vs CP = 1."""
    margs = a.model_args()
    print(f"# estimator only: {margs.describe()}, batch {a.batch}")
    print("| L | P | est act MiB | cut | cut / P |\n|---|---|---|---|---|")
    for L in a.seq_lens:
        one = estimate_row(margs, L, Layout(), a.batch, a.loss_chunks)
        base = one.activations + one.model_activations
        for P in a.cp_sizes:
            est = estimate_row(margs, L, Layout(cp=P), a.batch, a.loss_chunks)
            act = est.activations + est.model_activations
            print(f"| {L:,} | {P} | {act / MiB:,.1f} | {base / act:.3f}x | {base / act / P:.3f} |")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.estimate_only:
        print_estimated_cut(a)
        return 0
    result = reestimate(json.loads(a.from_json.read_text()), a) if a.from_json else run(a)
    print(print_table(result, a.markdown))
    if any("saved_by_kind" in r for r in result["rows"]):
        print("\n".join(layer_kind_rows(result["rows"])))
    for name, t in result["targets"].items():
        print(f"# target {name}: {json.dumps(t)}")
    if a.json and not a.from_json:
        a.json.write_text(json.dumps(result, indent=1))
        print(f"# wrote {a.json}")
    if a.plot:
        plot_memory(result, a.plot)
        print(f"# wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
