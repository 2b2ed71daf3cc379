"""Tables and the scaling plot of benchmarks/speed.py, from its result dict (or a saved --json)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.figure import save_figure

def fmt_bytes(b: float) -> str:
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= div:
            return f"{b / div:,.1f} {unit}"
    return f"{b:,.0f} B"


def table(head, rows, markdown) -> str:
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(head)]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def report(result: dict, markdown: bool) -> str:
    out = []
    if "scaling" in result:
        rows = []
        for r in result["scaling"]:
            if "step_s" not in r:
                rows.append([r["P"], "-", "-", "-", "-", "-", "-", r.get("status", "")])
                continue
            rel = (f"{r['speedup']:.2f}x" if "speedup" in r else
                   f"{r['efficiency']:.2f} eff." if "efficiency" in r else "-")
            rel_cpu = (f"{r['cpu_speedup']:.2f}x" if "cpu_speedup" in r else
                       f"{r['cpu_efficiency']:.2f} eff." if "cpu_efficiency" in r else "-")
            rows.append([r["P"], r["kind"], f"{r['L']:,}", f"{r['tokens_per_rank']:,}", f"{r['step_s']:.2f}",
                         f"{r['tokens_per_s_per_rank']:,.0f}", f"{r['tokens_per_s']:,.0f}", rel,
                         f"{r['step_cpu_s']:.2f}", rel_cpu, ("oversubscribed" if r["oversubscribed"] else "")])
        out.append("Scaling (step = forward + chunked loss + backward; minimum of interleaved repeats; slowest rank). "
                   "'vs CP=1' = speed-up (strong) or efficiency (weak) in wall time; 'CPU' = the same from the "
                   "slowest rank's CPU time (what dedicated cores would give; wall time here is shared with other jobs):")
        out.append(table(["P", "scaling", "L", "tokens/rank", "step s", "tok/s/rank", "tok/s total", "vs CP=1",
                          "CPU s", "vs CP=1 (CPU)", "note"], rows, markdown))
        same = [r for r in result["scaling"] if "same_load_speedup" in r]
        if same:
            out.append("\nStrong scaling under the same load (P <= cores: every rank also ran the whole sequence with "
                       "cp=None, interleaved step by step with the CP step):")
            out.append(table(["P", "L", "full L alone s", "CP step s", "speed-up (wall)", "full L CPU s", "CP CPU s",
                              "speed-up (CPU)"],
                             [[r["P"], f"{r['L']:,}", f"{r['same_load_full_step_s']:.2f}", f"{r['step_s']:.2f}",
                               f"{r['same_load_speedup']:.2f}x", f"{r['same_load_full_cpu_s']:.2f}",
                               f"{r['step_cpu_s']:.2f}", f"{r['same_load_cpu_speedup']:.2f}x"] for r in same], markdown))
    if result.get("overhead"):
        rows = [[o["P"], f"{o['tokens_per_rank']:,}", f"{o['step_alone_s']:.2f}", f"{o['step_cp_s']:.2f}",
                 f"{o['overhead_s']:+.2f}", f"{100 * o['overhead_fraction']:+.1f}%",
                 f"{100 * o['cpu_overhead_fraction']:+.1f}%", f"{o['comm_blocked_s']:.2f}",
                 f"{o['exchange_local_math_s']:.3f}", f"{o['kernel_alone_s']:.2f} -> {o['kernel_cp_s']:.2f}",
                 f"{o['kernel_extra_s']:+.2f}", f"{o['other_s']:+.2f}",
                 "oversubscribed" if o["oversubscribed"] else ""] for o in result["overhead"]]
        out.append("\nCP overhead: the same shard with cp=None vs under CP (mean over ranks, seconds per step, wall):")
        out.append(table(["P", "tokens/rank", "alone", "CP", "overhead", "of CP step", "of CP step (CPU)", "comm blocked",
                          "exchange math", "kernel alone -> CP", "kernel extra", "other", "note"], rows, markdown))
        rows = [[o["P"], f"{o['tokens_per_rank']:,}", f"{o['cpu_alone_s']:.2f}", f"{o['cpu_cp_s']:.2f}",
                 f"{o['cpu_overhead_s']:+.3f}", f"{100 * o['cpu_overhead_fraction']:+.1f}%",
                 f"{o['kernel_cpu_alone_s']:.3f} -> {o['kernel_cpu_cp_s']:.3f}", f"{o['kernel_cpu_extra_s']:+.3f}",
                 f"{o['exchange_cpu_s']:.3f}", f"{o['other_cpu_s']:+.3f}", f"{o['comm_blocked_s']:.3f}"]
                for o in result["overhead"] if "cpu_overhead_s" in o]
        out.append("\nThe same in CPU time (process CPU seconds per step; kernel and exchange: CPU time of the main "
                   "thread inside them; other = overhead - kernel extra - exchange: output correction (q M) S, "
                   "halo concatenation, and process CPU of waiting communication threads):")
        out.append(table(["P", "tokens/rank", "alone", "CP", "overhead", "of CP step", "kernel alone -> CP",
                          "kernel extra", "exchange (incl. comm)", "other", "comm blocked (wall)"], rows, markdown))
    if result.get("bytes"):
        rows = [[b["P"], f"{b['L']:,}", b["layer"], fmt_bytes(b["sent_fwd"]), fmt_bytes(b["sent_bwd"]),
                 fmt_bytes(b["sent_total"]), ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(b["by_kind"].items())),
                 fmt_bytes(b["ring_attention_total"])] for b in result["bytes"]]
        out.append("\nBytes sent per GDN layer per rank (worst rank per kind; fwd + bwd) vs ring attention of the same "
                   "width:")
        out.append(table(["P", "L", "layer", "fwd", "bwd", "total", "by kind", "ring attention (MHA, kv = dim)"],
                         rows, markdown))
    if "strategies" in result:
        rows = []
        for r in result["strategies"]:
            if r.get("status") != "ok":
                rows.append([r["P"], r.get("strategy", "-"), r.get("status", ""), "", "", "", "", "", ""])
                continue
            rows.append([r["P"], r["strategy"], f"{r['step_s']:.2f}", f"{r.get('step_cpu_s', float('nan')):.2f}",
                         f"{r['comm_blocked_s']:.2f}",
                         f"{fmt_bytes(r['sent_fwd'])} / {fmt_bytes(r['sent_bwd'])}",
                         f"{fmt_bytes(r['received_fwd'])} / {fmt_bytes(r['received_bwd'])}",
                         f"{r['rounds_fwd']} / {r['rounds_bwd']}", "oversubscribed" if r["oversubscribed"] else ""])
        out.append("\nStrategies, interleaved step by step in one job per P (step: slowest rank, wall and CPU; "
                   "bytes and rounds per GDN layer, worst rank, fwd / bwd; rounds include the conv halo's one):")
        out.append(table(["P", "strategy", "step s", "CPU s", "comm blocked s", "sent", "received", "rounds", "note"],
                         rows, markdown))
    if "hybrid" in result:
        rows = []
        for r in result["hybrid"]:
            if "busy_per_rank_s" not in r:
                rows.append([r["P"], "-", r.get("status", ""), "", "", "", "", ""])
                continue
            rows.append([r["P"], r["layout"], f"{r['step_s']:.2f}",
                         " / ".join(f"{b:.2f}" for b in r["cpu_per_rank_s"]), f"{r['cpu_max_over_min']:.2f}",
                         " / ".join(f"{b:.2f}" for b in r["busy_per_rank_s"]), f"{r['busy_max_over_min']:.2f}",
                         "oversubscribed" if r["oversubscribed"] else ""])
        out.append("\nHybrid balance per rank, forward + backward: CPU time (process_time), and busy = wall time "
                   "minus time blocked in communication:")
        out.append(table(["P", "layout", "step s", "CPU s per rank", "max/min (CPU)", "busy s per rank",
                          "max/min (busy)", "note"], rows, markdown))
    return "\n".join(out)


def plot_scaling(result: dict, path: Path) -> None:
    """Total tokens/s vs CP degree, strong and weak scaling; wall time and the CPU-time equivalent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, color in (("strong", "tab:blue"), ("weak", "tab:orange")):
        rows = sorted((r for r in result["scaling"] if r.get("kind") == kind or (kind == "weak" and r.get("P") == 1
                       and not any(x.get("P") == 1 and x.get("kind") == "weak" for x in result["scaling"]))),
                      key=lambda r: r["P"])
        rows = [r for r in rows if "step_s" in r]
        if not rows:
            continue
        P = [r["P"] for r in rows]
        label = (f"strong, L = {rows[-1]['L']:,}" if kind == "strong" else
                 f"weak, {rows[-1]['tokens_per_rank']:,} tokens/rank")
        ax.plot(P, [r["tokens_per_s"] for r in rows], "o-", color=color, label=f"{label} (wall)")
        ax.plot(P, [r["tokens_per_rank"] * 1.0 / r["step_cpu_s"] * r["P"] for r in rows], "s--", color=color,
                alpha=0.7, label=f"{label} (CPU time: dedicated cores)")
    base = [r for r in result["scaling"] if r.get("P") == 1 and r.get("kind") == "strong" and "step_s" in r]
    Ps = sorted({r["P"] for r in result["scaling"] if "P" in r})
    if base:
        ax.plot(Ps, [P * base[0]["tokens_per_s"] for P in Ps], ":", color="gray", label="ideal: P x CP=1 (strong)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(Ps)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("CP degree P (ranks; > cores = oversubscribed)")
    ax.set_ylabel("tokens / s (all ranks)")
    ax.set_title("Training throughput vs CP degree", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, f"{result['model']}\n{result['machine']}")
