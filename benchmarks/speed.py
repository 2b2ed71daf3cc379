#!/usr/bin/env python
"""Speed of a GDN LM training step under context parallelism.

Modes (one per run; each starts its own ranks, one process and one torch
thread per rank; gloo on CPU, NCCL on GPUs):

default      strong scaling (fixed global L, CP = 1, 2, 4, 8) and weak scaling
             (fixed L / P): step time (forward + chunked loss + backward), tokens/s
             per rank and in total, speed-up / efficiency vs CP = 1.
             CP overhead: every CP rank also times its own shard with cp = None
             (same process, same neighbours, alternating with the CP step), so
             overhead = t(CP) - t(shard alone), broken down into time blocked in
             communication, the exchange's local math (fold / scan combine),
             the kernel's extra work (the transition columns: state width V + K; q M
             recomputed in the backward unless --q_transition keep) and the rest
             (output correction, halo conv, concatenations); --ab_q_transition: q_transition_ab.py.
             The shard alone is the rank's own tokens in the run's --layout (zigzag: its two
             segments, concatenated, as one sequence) with cp = None; the CP step, the shard
             alone and the whole sequence all take their tokens from one make_batch(layout).
             Beside it, the overhead against a work-matched reference that adds the attention
             work a rank's queries must do anyway (benchmarks/matched_reference.py).
             Bytes per GDN layer (fwd + bwd, from titan_cp.cp.comm.comm_stats)
             at several L, next to what ring attention would send for an
             attention layer of the same width (MHA, kv width = dim).
--strategies allgather / logscan / alltoall side by side at P = 2, 4, 8 in one run:
             step time, bytes sent and received, rounds per layer (fwd, bwd).
--hybrid     (benchmarks/hybrid_balance.py) the hybrid flavor (GGGA: ring attention
             in the A layers): per-rank busy time (forward + backward wall time
             minus time blocked in communication) for contiguous vs zigzag
             layouts, max / min over ranks.

On a 2-core CPU, P = 4 and P = 8 put 2 and 4 ranks on each core: their step
times measure oversubscription, not CP; bytes, rounds and ratios stay
meaningful. The machine's load average is printed with every table (other
jobs on the machine slow every row alike, but add noise).

    python -m benchmarks.speed                      # scaling + overhead + bytes (a few minutes)
    python -m benchmarks.speed --quick
    python -m benchmarks.speed --strategies [--quick]
    python -m benchmarks.speed --hybrid [--quick]
    python -m benchmarks.speed --json speed.json

The timers and byte counts are in benchmarks/timing.py, the tables and the
plot in benchmarks/report.py.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


import torch
import torch.distributed as dist
from benchmarks.model_steps import (
    ModelArgs,
    ModelFlags,
    OutputFlags,
    StepFlags,
    build_model,
    can_launch,
    keep_freed_memory,
    launch,
    load_average,
    machine_description,
    make_batch,
    parse_flags,
    train_step,
)
from benchmarks.matched_reference import matched_figures, matched_line
from benchmarks.q_transition_ab import other_figures, other_variant, summary_line
from benchmarks.report import plot_scaling, report
from benchmarks.timing import (
    Timers,
    attention_kernels,
    attention_shapes,
    comm_per_layer,
    core_probe,
    quietness,
    ring_attention_bytes,
    set_cp,
    timed_steps,
)

# --------------------------------------------------------------------------- rank functions


def _scaling_rank(rank, P, device, margs: ModelArgs, runs, warmup, repeats, loss_chunks, batch, bytes_lens,
                  same_load_max_p, ab_q_transition=False):
    """runs: list of (label, L). Returns per run the timings of cp and (P > 1) of the shard alone (+ cp_other)."""
    from titan_cp.cp.comm import comm_stats

    timers = Timers(device)
    timers.install()
    model = margs.build(device, dist.group.WORLD if P > 1 else None, max(L for _, L in runs))
    vocab = model.lm_head.weight.shape[0]
    results = []
    for label, L in runs:
        inputs, labels = make_batch(vocab, L, batch, rank, P, margs.layout, device)
        variants = {"cp": lambda: set_cp(model, margs, P)}
        if P > 1 and label == "strong":
            variants["alone"] = lambda: set_cp(model, margs, 1)
            variants |= {"cp_other": other_variant(model, margs, P)} if ab_q_transition else {}  # same rounds
            if P <= same_load_max_p:  # every rank also runs the whole sequence alone: P = 1 under the same load
                full = make_batch(vocab, L, batch, 0, 1, margs.layout, device)
                variants["full"] = lambda full=full: (set_cp(model, margs, 1), full)[1]
        kernels, layers = {}, {}
        if P > 1 and label == "strong":  # the work-matched reference's attention work, in the same rounds
            set_cp(model, margs, 1)
            shapes = attention_shapes(model, inputs, margs.hidden)
            kernels, layers = attention_kernels(shapes, rank, P, margs.layout, device)
        res = timed_steps(model, inputs, labels, batch * L, timers, warmup, repeats, loss_chunks, variants,
                          hidden=margs.hidden, kernels=kernels)
        results.append({"label": label, "L": L, "tokens_per_rank": batch * L // P, "attention_layers": layers,
                        **res})
    set_cp(model, margs, P)
    bytes_by_len = {}
    if P > 1 and isinstance(margs, ModelArgs):  # bytes per layer: the GDN LM only
        for L in bytes_lens:  # one step per L on a one-layer copy: bytes per layer only
            small = build_model(ModelArgs(margs.flavor, {**margs.overrides, "n_layers": 1}, margs.exchange,
                                          margs.layout, margs.dtype), device, dist.group.WORLD)
            inputs, labels = make_batch(vocab, L, batch, rank, P, margs.layout, device)
            comm_stats.reset()
            train_step(small, inputs, labels, loss_chunks, batch * L)
            bytes_by_len[L] = comm_per_layer()
            del small
    return {"runs": results, "bytes": bytes_by_len}


def _strategies_rank(rank, P, device, margs: ModelArgs, strategies, L, warmup, repeats, loss_chunks, batch):
    """All strategies on the same model and shard, interleaved step by step (load changes hit them alike)."""
    from titan_cp.cp.comm import comm_stats

    timers = Timers(device)
    timers.install()
    model = build_model(margs, device, dist.group.WORLD)
    inputs, labels = make_batch(model.config.vocab_size, L, batch, rank, P, margs.layout, device)
    out = {}
    hv = model.config.num_v_heads or model.config.num_heads
    variants = {}
    for s in strategies:
        if s == "alltoall" and (model.config.num_heads % P or hv % P):
            out[s] = {"status": f"skipped: {model.config.num_heads} heads not divisible by P = {P}"}
            continue
        variants[s] = (lambda s=s: set_cp(model, margs, P, exchange=s))
    res = timed_steps(model, inputs, labels, batch * L, timers, warmup, repeats, loss_chunks, variants)
    for s, setup in variants.items():
        setup()
        comm_stats.reset()
        model.zero_grad(set_to_none=True)
        train_step(model, inputs, labels, loss_chunks, batch * L)
        out[s] = {"status": "ok", **res[s], "comm_stats": comm_per_layer()}
    return out


# --------------------------------------------------------------------------- drivers


def _worst(per_rank, name, key):
    return max(r[name].get(key, 0.0) for r in per_rank)


def _mean(per_rank, name, key):
    return statistics.fmean(r[name].get(key, 0.0) for r in per_rank)


def run_scaling(a, margs: ModelArgs) -> dict:
    strong_L = a.strong_len
    rows, overhead, bytes_rows = [], [], []
    for P in a.cp_sizes:
        ok, why = can_launch(P)
        if not ok:
            rows.append({"P": P, "status": f"skipped: {why}"})
            continue
        runs = [("strong", strong_L)] + ([("weak", a.weak_per_rank * P)] if a.weak_per_rank else [])
        if P == 1 and a.weak_per_rank == strong_L:
            runs = [("strong", strong_L)]
        t0 = time.perf_counter()
        per_rank = launch(_scaling_rank, P, (margs, runs, a.warmup, a.repeats, a.loss_chunks, a.batch,
                                             a.bytes_lens, a.cores, a.ab_q_transition), threads=a.threads)
        load = load_average()
        print(f"# P={P}: {time.perf_counter() - t0:.0f} s wall, load average {load:.1f}", flush=True)
        for i, (label, L) in enumerate(runs):
            rr = [r["runs"][i] for r in per_rank]
            step = max(r["cp"]["wall"] for r in rr)  # the step ends when the slowest rank ends
            row = {"P": P, "kind": label, "L": L, "tokens_per_rank": rr[0]["tokens_per_rank"], "step_s": step,
                   "step_cpu_s": max(r["cp"]["cpu"] for r in rr),
                   "tokens_per_s_per_rank": rr[0]["tokens_per_rank"] / step, "tokens_per_s": a.batch * L / step,
                   "load_average": load, "oversubscribed": P > a.cores and device_is_cpu(),
                   "walls_rank0": rr[0]["cp"]["walls"]}
            if "full" in rr[0]:
                # P = 1 timed in the same job, interleaved with the CP step: speed-up under the same load
                full_wall = statistics.fmean(r["full"]["wall"] for r in rr)
                full_cpu = statistics.fmean(r["full"]["cpu"] for r in rr)
                row.update(same_load_full_step_s=full_wall, same_load_full_cpu_s=full_cpu,
                           same_load_speedup=full_wall / step, same_load_cpu_speedup=full_cpu / row["step_cpu_s"])
            rows.append(row)
            if P > 1 and label == "strong":
                alone = statistics.fmean(r["alone"]["wall"] for r in rr)
                cp_t = statistics.fmean(r["cp"]["wall"] for r in rr)
                alone_cpu = statistics.fmean(r["alone"]["cpu"] for r in rr)
                cp_cpu = statistics.fmean(r["cp"]["cpu"] for r in rr)
                comm = _mean(rr, "cp", "comm")
                exch = _mean(rr, "cp", "exchange")
                k_cp, k_alone = _mean(rr, "cp", "kernel"), _mean(rr, "alone", "kernel")
                kc_cp, kc_alone = _mean(rr, "cp", "kernel_cpu"), _mean(rr, "alone", "kernel_cpu")
                exch_cpu = _mean(rr, "cp", "exchange_cpu")
                over = cp_t - alone
                overhead.append({
                    "P": P, "L": L, "tokens_per_rank": rr[0]["tokens_per_rank"], "step_cp_s": cp_t,
                    "step_alone_s": alone, "overhead_s": over, "overhead_fraction": over / cp_t,
                    "cpu_cp_s": cp_cpu, "cpu_alone_s": alone_cpu, "cpu_overhead_fraction": (cp_cpu - alone_cpu) / cp_cpu,
                    "comm_blocked_s": comm, "exchange_local_math_s": max(0.0, exch - comm),
                    "kernel_cp_s": k_cp, "kernel_alone_s": k_alone, "kernel_extra_s": k_cp - k_alone,
                    "other_s": over - max(exch, comm) - (k_cp - k_alone),
                    "cpu_overhead_s": cp_cpu - alone_cpu, "kernel_cpu_cp_s": kc_cp, "kernel_cpu_alone_s": kc_alone,
                    "kernel_cpu_extra_s": kc_cp - kc_alone, "exchange_cpu_s": exch_cpu,
                    "cpu_sys_cp_s": _mean(rr, "cp", "cpu_sys"), "cpu_sys_alone_s": _mean(rr, "alone", "cpu_sys"),
                    "other_cpu_s": (cp_cpu - alone_cpu) - (kc_cp - kc_alone) - exch_cpu,
                    "oversubscribed": P > a.cores and device_is_cpu(), "load_average": load,
                    "spread_cp": max(r["cp"]["spread"] for r in rr), "spread_alone": max(r["alone"]["spread"] for r in rr),
                    "q_transition": margs.q_transition,
                })
                overhead[-1].update(matched_figures(rr, cp_t, cp_cpu))
                if "cp_other" in rr[0]:
                    overhead[-1].update(other_figures(rr, alone, alone_cpu, row.get("same_load_full_step_s"),
                                                      margs.q_transition, overhead[-1]["step_matched_s"]))
        if P > 1:
            for L, layers in per_rank[0]["bytes"].items():
                for layer in layers:
                    # worst rank per kind (rank 0 receives no halo, the last rank sends none)
                    kinds = {}
                    for r in per_rank:
                        for k, v in r["bytes"][L][layer].items():
                            if v["sent"] >= kinds.get(k, {"sent": -1})["sent"]:
                                kinds[k] = v
                    fwd = sum(v["sent"] for k, v in kinds.items() if k.endswith("_fwd"))
                    bwd = sum(v["sent"] for k, v in kinds.items() if k.endswith("_bwd"))
                    ring = ring_attention_bytes(P, a.batch * L // P, margs.config().dim, a.batch)
                    bytes_rows.append({"P": P, "L": L, "layer": layer, "sent_fwd": fwd, "sent_bwd": bwd,
                                       "sent_total": fwd + bwd,
                                       "by_kind": {k: v["sent"] for k, v in kinds.items()},
                                       "ring_attention_total": ring["total"]})
    base = {r["kind"]: r for r in rows if r.get("P") == 1}
    if "strong" in base and "weak" not in base:
        base["weak"] = base["strong"]
    for r in rows:
        b = base.get(r.get("kind"))
        if b and "step_s" in r:
            if r["kind"] == "strong":
                r["speedup"] = b["step_s"] / r["step_s"]
                r["cpu_speedup"] = b["step_cpu_s"] / r["step_cpu_s"]
            else:
                r["efficiency"] = b["step_s"] / r["step_s"]
                r["cpu_efficiency"] = b["step_cpu_s"] / r["step_cpu_s"]
    return {"scaling": rows, "overhead": overhead, "bytes": bytes_rows}


def device_is_cpu() -> bool:
    return not torch.cuda.is_available()


def _launch_per_cp_size(a, rows: list, rank_fn, args: tuple):
    """Launch ``rank_fn`` at every CP size > 1 of ``a.cp_sizes``; yield (P, per-rank results, load).

    Sizes this machine cannot launch get a "skipped" row in ``rows``.
    """
    for P in a.cp_sizes:
        if P == 1:
            continue
        ok, why = can_launch(P)
        if not ok:
            rows.append({"P": P, "status": f"skipped: {why}"})
            continue
        t0 = time.perf_counter()
        per_rank = launch(rank_fn, P, args, threads=a.threads)
        load = load_average()
        print(f"# P={P}: {time.perf_counter() - t0:.0f} s wall, load average {load:.1f}", flush=True)
        yield P, per_rank, load


def run_strategies(a, margs: ModelArgs) -> dict:
    rows = []
    args = (margs, a.strategy_list, a.strong_len, a.warmup, a.repeats, a.loss_chunks, a.batch)
    for P, per_rank, load in _launch_per_cp_size(a, rows, _strategies_rank, args):
        for s in a.strategy_list:
            r0 = per_rank[0][s]
            if r0["status"] != "ok":
                rows.append({"P": P, "strategy": s, "status": r0["status"]})
                continue
            layers = r0["comm_stats"]
            layer = min(layers)
            row = {"P": P, "strategy": s, "status": "ok", "L": a.strong_len, "layer": layer,
                   "step_s": max(r[s]["wall"] for r in per_rank),
                   "step_cpu_s": max(r[s]["cpu"] for r in per_rank),
                   "comm_blocked_s": statistics.fmean(r[s].get("comm", 0.0) for r in per_rank),
                   "load_average": load, "oversubscribed": P > a.cores and device_is_cpu()}
            # per layer: worst rank's bytes (ranks differ: the first rank of a scan receives nothing)
            for d in ("fwd", "bwd"):
                row[f"sent_{d}"] = max(sum(v["sent"] for k, v in r[s]["comm_stats"][layer].items() if k.endswith(d))
                                       for r in per_rank)
                row[f"received_{d}"] = max(sum(v["received"] for k, v in r[s]["comm_stats"][layer].items()
                                               if k.endswith(d)) for r in per_rank)
                row[f"rounds_{d}"] = max(sum(v["rounds"] for k, v in r[s]["comm_stats"][layer].items() if k.endswith(d))
                                         for r in per_rank)
            row["by_kind"] = {k: v for k, v in layers[layer].items()}
            rows.append(row)
    return {"strategies": rows}


@dataclass
class SpeedArgs(OutputFlags, StepFlags, ModelFlags):
    """The speed benchmark's command line: the shared flag groups (benchmarks/model_steps.py) and its own.
    ``--model qwen3_5`` runs the scaling mode only (no bytes table)."""

    strategies: bool = False
    """allgather / logscan / alltoall at P = 2, 4, 8"""
    ab_q_transition: bool = False
    """strong scaling at P > 1 also times CP with the other --q_transition, interleaved with the others"""
    hybrid: bool = False
    """contiguous vs zigzag balance on the hybrid flavor"""
    strategy_list: tuple[str, ...] = ("allgather", "logscan", "alltoall")
    strong_len: int = 4096
    """global L of strong scaling / strategies"""
    weak_per_rank: int = 1024
    """tokens per rank of weak scaling (0: none)"""
    hybrid_len: int = 4096
    bytes_lens: tuple[int, ...] = (1024, 4096, 16384)
    """global L values at which bytes per layer are counted (one 1-layer step each)"""
    warmup: int = 1
    repeats: int = 3
    """timed rounds, interleaved (benchmarks/timing.py); the minimum is kept, the spread reported"""
    cores: int | None = None
    """cores of this machine (default os.cpu_count())"""
    quick: bool = False
    """smaller L, fewer repeats, P up to 4"""
    no_probe: bool = False
    """skip the 1-vs-all-cores matmul probe (CPU)"""
    require_quiet: bool = False
    """refuse to run (exit 3) when the start probe says the machine is busy; without it a busy run is
    flagged in the report and the JSON"""
    system_malloc: bool = False
    """CPU: keep glibc's malloc defaults in the ranks (default: freed memory is reused;
    model_steps.KEEP_FREED_MEMORY)"""


def parse_args(argv=None) -> SpeedArgs:
    """The command line with its mode-dependent defaults applied."""
    a = parse_flags(SpeedArgs, argv, "python -m benchmarks.speed", __doc__)
    if a.strategies and a.hybrid:
        raise SystemExit("benchmarks.speed: --strategies and --hybrid are separate modes; pick one")
    if a.model == "qwen3_5" and (a.strategies or a.hybrid):
        raise SystemExit("--model qwen3_5 runs the scaling mode only (drop --strategies / --hybrid)")
    a.cores = a.cores or os.cpu_count()
    if a.hybrid and a.flavor == "debug":
        a.flavor = "debug_hybrid"
        for k in ("dim", "n_layers", "num_heads", "head_dim", "hidden_dim", "vocab_size"):
            setattr(a, k, None)  # the flavor's own shape
    if a.strategies and a.num_heads == 4 and a.head_dim == 64:
        a.num_heads, a.head_dim = 8, 32  # alltoall at P = 8 needs 8 heads; same key width
    if a.cp_sizes is None:
        a.cp_sizes = (2, 4, 8) if (a.strategies or a.hybrid) else (1, 2, 4, 8)
    if a.quick:
        a.cp_sizes = tuple(p for p in a.cp_sizes if p <= 4)
        a.strong_len, a.weak_per_rank, a.hybrid_len = 2048, 512, 2048
        a.bytes_lens, a.repeats = (1024, 4096), 2
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.from_json:
        result = json.loads(a.from_json.read_text())
        print(report(result, a.markdown))
        if a.plot and "scaling" in result:
            plot_scaling(result, a.plot)
            print(f"# wrote {a.plot}")
        return 0
    margs = a.model_args()
    mode = "strategies" if a.strategies else "hybrid" if a.hybrid else "scaling"
    print(f"# benchmark_speed ({mode}): {margs.describe()}, batch {a.batch}, {a.threads} thread(s) per rank")
    machine = machine_description()
    if device_is_cpu():
        machine += "; " + keep_freed_memory(not a.system_malloc)
    print(f"# machine: {machine}")
    if device_is_cpu() and max(a.cp_sizes) > a.cores:
        print(f"# note: P > {a.cores} ranks share {a.cores} cores (oversubscribed): their times measure contention; "
              "bytes, rounds and ratios stay meaningful")
    probe_start = core_probe(a.cores) if not a.no_probe else {}
    verdict = quietness(probe_start, None, a.cores)
    if a.require_quiet and not verdict["quiet"]:
        print("# REFUSED: machine not quiet enough for a timing figure: " + "; ".join(verdict["reasons"]))
        return 3
    t0 = time.perf_counter()
    if a.strategies:
        result = run_strategies(a, margs)
    elif a.hybrid:
        from benchmarks.hybrid_balance import run_hybrid  # its module imports this one's launcher

        result = run_hybrid(a, margs)
    else:
        result = run_scaling(a, margs)
    if not a.no_probe:
        result["core_probe"] = {"start": probe_start, "end": core_probe(a.cores)}
    result["quietness"] = quietness(probe_start, result.get("core_probe", {}).get("end"), a.cores)
    result.update(mode=mode, model=margs.describe(), machine=machine, date=time.strftime("%Y-%m-%d"),
                  threads_per_rank=a.threads, wall_s=time.perf_counter() - t0, load_average_end=load_average(),
                  args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()})
    print(report(result, a.markdown))
    for o in result.get("overhead", []):
        print(matched_line(o))
        if "step_cp_other_s" in o:
            print(summary_line(o))
        print(f"# P={o['P']}: spread of the repeats' wall times, (max - min) / min, worst rank: CP step "
              f"{100 * o['spread_cp']:.1f}%, shard alone {100 * o['spread_alone']:.1f}%")
    print(f"# total {result['wall_s']:.0f} s, load average {result['load_average_end']:.1f} at the end")
    if not result["quietness"]["quiet"]:
        print("# FLAGGED: timings taken on a busy machine, not a quiet figure: "
              + "; ".join(result["quietness"]["reasons"]))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
        print(f"# wrote {a.json}")
    if a.plot and "scaling" in result:
        plot_scaling(result, a.plot)
        print(f"# wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
