"""Markdown tables and JSON of the scale model's result (:func:`titan_cp.analysis.scale_model.run_model`)."""

from __future__ import annotations

import math

from titan_cp.analysis.scale_model import REFERENCE, STRATEGIES, stops_hiding_at


def _ms(x: float) -> str:
    if math.isinf(x):
        return "-"
    return f"{x * 1e3:.3g}" if x < 1 else f"{x * 1e3:,.0f}"


def _fmt_tokens(t: float) -> str:
    if t >= 1 << 20 and t % (1 << 20) == 0:
        return f"{int(t) >> 20}M"
    if t >= 1024 and t % 1024 == 0:
        return f"{int(t) >> 10}K"
    return f"{t:g}"


def markdown(result: dict) -> str:
    """Markdown tables of ``run_model``'s result."""
    net, comp, wl = result["network"], result["compute"], result["workload"]
    X = result["hide_fraction"]
    header = (
        "Per-layer CP exchange time (fwd + bwd, ms) vs the block's fwd + bwd compute (ms); "
        "in brackets exchange / compute. "
        f"Links: inter-node {net['inter_bw'] / 1e9:g} GB/s, {net['inter_latency'] * 1e6:g} us; "
        f"intra-node {net['intra_bw'] / 1e9:g} GB/s, {net['intra_latency'] * 1e6:g} us; "
        f"{net['gpus_per_node']} GPUs per node; all-gather: {net['allgather_algo']}. "
        f"Compute: matmul {comp['matmul_tflops']:g} TFLOP/s, GDN kernel {comp['kernel_tflops']:g} TFLOP/s, "
        f"fold {comp['fold_tflops']:g} TFLOP/s. Batch {wl['batch']} row(s) per rank, TP {wl['tp']}, "
        f"state fp{8 * wl['state_bytes']}, activations {8 * wl['act_bytes']}-bit. "
        "'cp extra' = kernel work summary-CP adds (width V+K, (qM)S), not included in the exchange. "
        "ring-attn: ms of a ring-attention softmax layer of the same width (reference; "
        "its own O(L^2) compute, which it overlaps with, is not modelled). "
        "'-' = infeasible (heads not divisible by CP*TP)."
    )
    lines = [header, ""]
    for m in result["models"]:
        s = m["shape"]
        lines += [
            "",
            (f"### {m['name']}: dim {s['dim']}, {s['n_layers']} layers, {s['H']} heads, K {s['K']}, V {s['V']}, "
            f"MLP {s['hidden']}; summary {m['summary_bytes'] / 2**20:.2f} MiB per rank per layer"),
        ]
        if m["source"]:
            lines.append(f"\n_{m['source']}_")
        for mode, title in (("fixed_tokens_per_rank", f"fixed {_fmt_tokens(result['tokens_per_rank'])} tokens per rank"),
                            ("fixed_global_len", f"fixed global length {_fmt_tokens(result['global_len'])}")):
            rows = m["modes"][mode]["_rows"]
            lines += ["", f"**{title}**", "",
                      "| P | tokens/rank | compute | cp extra | allgather | logscan | alltoall | ring-attn (ref) |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in rows:
                cells = []
                for k in (*STRATEGIES, REFERENCE):
                    e = r.exchanges[k]
                    if not e.feasible:
                        cells.append("-")
                    elif k == REFERENCE:
                        cells.append(_ms(e.time_s))
                    else:
                        cells.append(f"{_ms(e.time_s)} ({100 * e.time_s / r.compute_s:.1f}%)")
                lines.append(f"| {r.P} | {_fmt_tokens(r.tokens_per_rank)} | {_ms(r.compute_s)} | "
                             f"{_ms(r.cp_compute_overhead_s)} | " + " | ".join(cells) + " |")
    lines += ["", (f"**First P where the exchange exceeds {100 * X:g}% of compute** (or alltoall becomes infeasible; "
                   "'>max' = never within the sweep)"), "",
              "| model | mode | allgather | logscan | alltoall | cp extra compute (summary CP) |",
              "|---|---|---:|---:|---:|---:|"]
    for m in result["models"]:
        for mode in ("fixed_tokens_per_rank", "fixed_global_len"):
            rows = m["modes"][mode]["_rows"]
            cells = []
            for st in STRATEGIES:
                P, why = stops_hiding_at(rows, st, X)
                cells.append(">max" if P is None else f"{P} ({why})")
            extra = rows[0].cp_compute_overhead_s / rows[0].compute_s
            lines.append(f"| {m['name']} | {mode.replace('_', ' ')} | " + " | ".join(cells)
                         + f" | +{100 * extra:.0f}% |")
    return "\n".join(lines) + "\n"


def jsonable(result: dict) -> dict:
    """``result`` without the Row objects kept for formatting."""
    out = dict(result)
    out["models"] = [
        m | {"modes": {k: {kk: vv for kk, vv in v.items() if kk != "_rows"} for k, v in m["modes"].items()}}
        for m in result["models"]
    ]
    return out

