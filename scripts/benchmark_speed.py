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
             the kernel's extra work (the transition columns: state width V + K) and the rest
             (output correction, halo conv, concatenations).
             Bytes per GDN layer (fwd + bwd, from titan_cp.cp.comm.comm_stats)
             at several L, next to what ring attention would send for an
             attention layer of the same width (MHA, kv width = dim).
--strategies allgather / logscan / alltoall side by side at P = 2, 4, 8 in one run:
             step time, bytes sent and received, rounds per layer (fwd, bwd).
--hybrid     the hybrid flavor (configs/debug_hybrid.toml, GGGA: ring attention
             in the A layers): per-rank busy time (forward + backward wall time
             minus time blocked in communication) for contiguous vs zigzag
             layouts, max / min over ranks.

On a 2-core CPU, P = 4 and P = 8 put 2 and 4 ranks on each core: their step
times measure oversubscription, not CP; bytes, rounds and ratios stay
meaningful. The machine's load average is printed with every table (other
jobs on the machine slow every row alike, but add noise).

    python scripts/benchmark_speed.py                      # scaling + overhead + bytes (a few minutes)
    python scripts/benchmark_speed.py --quick
    python scripts/benchmark_speed.py --strategies [--quick]
    python scripts/benchmark_speed.py --hybrid [--quick]
    python scripts/benchmark_speed.py --json speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from benchmark_memory import (
    ModelArgs,
    add_model_arguments,
    build_model,
    can_launch,
    launch,
    load_average,
    machine_description,
    make_batch,
    model_args_from,
    train_step,
)

# --------------------------------------------------------------------------- timers


class Timers:
    """Wall-clock accumulators patched into communication calls and CP autograd functions.

    - ``comm``: time blocked in torch.distributed calls (collectives, and the
      ``wait()`` of batched point-to-point work), fwd + bwd.
    - ``exchange``: time inside the state exchange / halo / all-to-all autograd
      functions (their communication included), fwd + bwd.
    - ``kernel``: time inside the torch chunk kernel (forward + backward).
    Each also as ``<key>_cpu``: CPU time of the calling thread inside the region.
    On GPUs each timed region synchronises the device first and last.
    """

    def __init__(self, device: torch.device):
        self.t = defaultdict(float)
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self._depth = defaultdict(int)

    def reset(self):
        self.t.clear()

    def region(self, key, fn):
        timers = self

        def wrapped(*args, **kwargs):
            if timers._depth[key]:
                return fn(*args, **kwargs)
            timers._depth[key] += 1
            timers.sync()
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.sync()
                timers.t[key] += time.perf_counter() - t0
                timers.t[key + "_cpu"] += time.thread_time() - c0
                timers._depth[key] -= 1

        return wrapped

    def install(self):
        for name in ("all_gather_into_tensor", "all_gather", "all_to_all_single", "all_reduce",
                     "reduce_scatter_tensor", "broadcast"):
            setattr(dist, name, self.region("comm", getattr(dist, name)))
        original = dist.batch_isend_irecv
        timers = self

        class _TimedWork:
            def __init__(self, work):
                self.work = work

            def wait(self, *a, **k):
                return timers.region("comm", self.work.wait)(*a, **k)

            def __getattr__(self, item):
                return getattr(self.work, item)

        def batch(ops):
            return [_TimedWork(w) for w in timers.region("comm", original)(ops)]

        dist.batch_isend_irecv = batch
        from titan_cp.cp import comm, halo, state_passing
        from titan_cp.kernels import chunk

        for cls in (state_passing._AllGatherExchange, state_passing._LogScanExchange, halo._HaloExchange,
                    comm.AllToAll):
            for m in ("forward", "backward"):
                setattr(cls, m, staticmethod(self.region("exchange", getattr(cls, m))))
        for m in ("forward", "backward"):
            setattr(chunk._ChunkGatedDeltaRule, m, staticmethod(self.region("kernel", getattr(chunk._ChunkGatedDeltaRule, m))))


def set_cp(model, args: ModelArgs, P: int, exchange: str | None = None, layout: str | None = None):
    from titan_cp.cp.context import CPContext
    from titan_cp.parallelize import apply_cp

    if P == 1 or exchange == "none":
        apply_cp(model, None)
    else:
        apply_cp(model, CPContext(group=dist.group.WORLD, layout=layout or args.layout,
                                  exchange=exchange or args.exchange))


def timed_steps(model, inputs, labels, global_tokens, timers: Timers, warmup: int, repeats: int,
                loss_chunks: int, variants=None):
    """Per variant (name -> setup callable): median step wall time and timer totals over ``repeats``.

    Variants are interleaved step by step so load changes hit them alike.
    Ranks meet at a barrier before every step (not timed).
    """
    variants = variants or {"cp": lambda: None}
    samples = {name: [] for name in variants}
    for i in range(warmup + repeats):
        for name, setup in variants.items():
            batch_override = setup()  # may return (inputs, labels) of its own
            x, y = batch_override if batch_override is not None else (inputs, labels)
            model.zero_grad(set_to_none=True)
            if dist.is_initialized():
                dist.barrier()
            timers.reset()
            timers.sync()
            c0, o0, t0 = time.process_time(), os.times(), time.perf_counter()
            train_step(model, x, y, loss_chunks, global_tokens)
            timers.sync()
            wall, cpu, o1 = time.perf_counter() - t0, time.process_time() - c0, os.times()
            if i >= warmup:
                samples[name].append({"wall": wall, "cpu": cpu, "cpu_user": o1.user - o0.user,
                                      "cpu_sys": o1.system - o0.system, **timers.t})
    out = {}
    for name, rows in samples.items():
        keys = set().union(*rows)
        out[name] = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
        out[name]["walls"] = [r["wall"] for r in rows]
    return out


def comm_per_layer():
    """comm_stats records grouped by layer: {layer: {kind: (sent, received, rounds)}}."""
    from titan_cp.cp.comm import comm_stats

    out = defaultdict(dict)
    for (layer, kind), r in comm_stats.records.items():
        out[layer][kind] = {"sent": r.bytes_sent, "received": r.bytes_received, "rounds": r.rounds, "calls": r.calls}
    return dict(out)


def ring_attention_bytes(P: int, tokens_per_rank: int, kv_width: int, batch: int = 1, elem: int = 4) -> dict:
    """Bytes one rank sends for a causal ring-attention layer (titan_cp/cp/ring_attention.py docstring).

    N = B * Hkv * Tloc * D: forward (P-1) * 2 N E; backward (P-1) * 2 N E + P * 2 N * 4.
    """
    N = batch * tokens_per_rank * kv_width
    fwd = (P - 1) * 2 * N * elem
    bwd = (P - 1) * 2 * N * elem + P * 2 * N * 4
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd, "rounds_fwd": P - 1, "rounds_bwd": P}


# --------------------------------------------------------------------------- core probe


def _probe_worker(seconds, out):
    torch.set_num_threads(1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    out.put(2 * 512**3 * n / (time.perf_counter() - t0) / 1e9)


def probe_cores(n_procs: int, seconds: float = 3.0) -> list[float]:
    """GFLOP/s of n concurrent single-thread 512^3 matmul loops: how much of the machine is ours right now."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_probe_worker, args=(seconds, out)) for _ in range(n_procs)]
    for p in procs:
        p.start()
    rates = [out.get(timeout=120 + 10 * seconds) for _ in procs]
    for p in procs:
        p.join(10)
    return rates


def core_probe(cores: int) -> dict:
    if torch.cuda.is_available():
        return {}
    one = probe_cores(1)
    many = probe_cores(cores)
    result = {"one_process_gflops": one[0], f"{cores}_processes_gflops": many,
              "effective_parallelism": sum(many) / one[0], "load_average": load_average()}
    print(f"# core probe: 1 process {one[0]:.0f} GFLOP/s; {cores} concurrent processes "
          f"{' + '.join(f'{r:.0f}' for r in many)} GFLOP/s -> effective parallelism "
          f"{result['effective_parallelism']:.2f} of {cores} (load average {result['load_average']:.1f})", flush=True)
    return result


# --------------------------------------------------------------------------- rank functions


def _scaling_rank(rank, P, device, margs: ModelArgs, runs, warmup, repeats, loss_chunks, batch, bytes_lens,
                  same_load_max_p):
    """runs: list of (label, L). Returns per run the timings of cp and (P > 1) of the shard alone."""
    from titan_cp.cp.comm import comm_stats

    timers = Timers(device)
    timers.install()
    model = build_model(margs, device, dist.group.WORLD if P > 1 else None)
    cfg = model.config
    results = []
    for label, L in runs:
        inputs, labels = make_batch(cfg.vocab_size, L, batch, rank, P, margs.layout, device)
        variants = {"cp": lambda: set_cp(model, margs, P)}
        if P > 1 and label == "strong":
            variants["alone"] = lambda: set_cp(model, margs, 1)
            if P <= same_load_max_p:  # every rank also runs the whole sequence alone: P = 1 under the same load
                full = make_batch(cfg.vocab_size, L, batch, 0, 1, margs.layout, device)
                variants["full"] = lambda full=full: (set_cp(model, margs, 1), full)[1]
        res = timed_steps(model, inputs, labels, batch * L, timers, warmup, repeats, loss_chunks, variants)
        results.append({"label": label, "L": L, "tokens_per_rank": batch * L // P, **res})
    set_cp(model, margs, P)
    bytes_by_len = {}
    if P > 1:
        for L in bytes_lens:  # one step per L on a one-layer copy: bytes per layer only
            small = build_model(ModelArgs(margs.flavor, {**margs.overrides, "n_layers": 1}, margs.exchange,
                                          margs.layout, margs.dtype), device, dist.group.WORLD)
            inputs, labels = make_batch(cfg.vocab_size, L, batch, rank, P, margs.layout, device)
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


def _hybrid_rank(rank, P, device, margs: ModelArgs, layouts, L, warmup, repeats, loss_chunks, batch):
    from titan_cp.cp.comm import comm_stats

    timers = Timers(device)
    timers.install()
    out = {}
    for layout in layouts:
        m = ModelArgs(margs.flavor, margs.overrides, margs.exchange, layout, margs.dtype)
        model = build_model(m, device, dist.group.WORLD)
        inputs, labels = make_batch(model.config.vocab_size, L, batch, rank, P, layout, device)
        res = timed_steps(model, inputs, labels, batch * L, timers, warmup, repeats, loss_chunks)["cp"]
        comm_stats.reset()
        model.zero_grad(set_to_none=True)
        train_step(model, inputs, labels, loss_chunks, batch * L)
        out[layout] = {**res, "busy": res["wall"] - res.get("comm", 0.0), "comm_stats": comm_per_layer()}
        del model
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
        runs = [("strong", strong_L)] + [("weak", a.weak_per_rank * P)]
        if P == 1 and a.weak_per_rank == strong_L:
            runs = [("strong", strong_L)]
        t0 = time.perf_counter()
        per_rank = launch(_scaling_rank, P, (margs, runs, a.warmup, a.repeats, a.loss_chunks, a.batch,
                                             a.bytes_lens, a.cores), threads=a.threads)
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
                })
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


def run_hybrid(a, margs: ModelArgs) -> dict:
    rows = []
    args = (margs, ("contiguous", "zigzag"), a.hybrid_len, a.warmup, a.repeats, a.loss_chunks, a.batch)
    for P, per_rank, load in _launch_per_cp_size(a, rows, _hybrid_rank, args):
        for layout in ("contiguous", "zigzag"):
            busy = [r[layout]["busy"] for r in per_rank]
            cpu = [r[layout]["cpu"] for r in per_rank]
            ring = {}
            for layer, kinds in per_rank[0][layout]["comm_stats"].items():
                for k, v in kinds.items():
                    if k.startswith("ring"):
                        ring[f"{layer}:{k}"] = v["sent"]
            rows.append({"P": P, "layout": layout, "L": a.hybrid_len, "step_s": max(r[layout]["wall"] for r in per_rank),
                         "busy_per_rank_s": busy, "busy_max_over_min": max(busy) / min(busy),
                         "cpu_per_rank_s": cpu, "cpu_max_over_min": max(cpu) / min(cpu),
                         "balance_max_over_min": max(cpu) / min(cpu) if device_is_cpu() else max(busy) / min(busy),
                         "balance_measure": "CPU time" if device_is_cpu() else "wall minus comm",
                         "comm_blocked_per_rank_s": [r[layout].get("comm", 0.0) for r in per_rank],
                         "ring_bytes_rank0": ring, "load_average": load,
                         "oversubscribed": P > a.cores and device_is_cpu()})
    return {"hybrid": rows}


# --------------------------------------------------------------------------- printing


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
        out.append("Scaling (step = forward + chunked loss + backward; median of repeats; slowest rank). "
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
    fig.text(0.01, 0.005, f"{result['model']}\n{result['machine']}", fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_model_arguments(p, dim=256, n_layers=2, num_heads=4, head_dim=64, hidden_dim=768, vocab_size=2048)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strategies", action="store_true", help="allgather / logscan / alltoall at P = 2, 4, 8")
    mode.add_argument("--hybrid", action="store_true", help="contiguous vs zigzag balance on the hybrid flavor")
    p.add_argument("--strategy_list", nargs="+", default=["allgather", "logscan", "alltoall"])
    p.add_argument("--cp_sizes", type=int, nargs="+", default=None, help="default 1 2 4 8 (2 4 8 for --strategies)")
    p.add_argument("--strong_len", type=int, default=4096, help="global L of strong scaling / strategies")
    p.add_argument("--weak_per_rank", type=int, default=1024, help="tokens per rank of weak scaling")
    p.add_argument("--hybrid_len", type=int, default=4096)
    p.add_argument("--bytes_lens", type=int, nargs="+", default=[1024, 4096, 16384],
                   help="global L values at which bytes per layer are counted (one 1-layer step each)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--loss_chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--cores", type=int, default=None, help="cores of this machine (default os.cpu_count())")
    p.add_argument("--quick", action="store_true", help="smaller L, fewer repeats, P up to 4")
    p.add_argument("--no_probe", action="store_true", help="skip the 1-vs-all-cores matmul probe (CPU)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--plot", type=Path, help="scaling mode: save a PNG of tokens/s vs CP degree here")
    p.add_argument("--from_json", type=Path, help="print / plot a saved --json result instead of running")
    return p


def main(argv=None) -> int:
    import os

    a = build_parser().parse_args(argv)
    a.cores = a.cores or os.cpu_count()
    if a.hybrid and a.flavor == "debug":
        a.flavor = "debug_hybrid"
        for k in ("dim", "n_layers", "num_heads", "head_dim", "hidden_dim", "vocab_size"):
            setattr(a, k, None)  # the flavor's own shape
    if a.strategies and a.num_heads == 4 and a.head_dim == 64:
        a.num_heads, a.head_dim = 8, 32  # alltoall at P = 8 needs 8 heads; same key width
    if a.cp_sizes is None:
        a.cp_sizes = [2, 4, 8] if (a.strategies or a.hybrid) else [1, 2, 4, 8]
    if a.quick:
        a.cp_sizes = [p for p in a.cp_sizes if p <= 4]
        a.strong_len, a.weak_per_rank, a.hybrid_len = 2048, 512, 2048
        a.bytes_lens, a.repeats = [1024, 4096], 2
    if a.from_json:
        result = json.loads(a.from_json.read_text())
        print(report(result, a.markdown))
        if a.plot and "scaling" in result:
            plot_scaling(result, a.plot)
            print(f"# wrote {a.plot}")
        return 0
    margs = model_args_from(a)
    mode = "strategies" if a.strategies else "hybrid" if a.hybrid else "scaling"
    print(f"# benchmark_speed ({mode}): {margs.describe()}, batch {a.batch}, {a.threads} thread(s) per rank")
    machine = machine_description()
    print(f"# machine: {machine}")
    if device_is_cpu() and max(a.cp_sizes) > a.cores:
        print(f"# note: P > {a.cores} ranks share {a.cores} cores (oversubscribed): their times measure contention; "
              "bytes, rounds and ratios stay meaningful")
    probe_start = core_probe(a.cores) if not a.no_probe else {}
    t0 = time.perf_counter()
    if a.strategies:
        result = run_strategies(a, margs)
    elif a.hybrid:
        result = run_hybrid(a, margs)
    else:
        result = run_scaling(a, margs)
    if not a.no_probe:
        result["core_probe"] = {"start": probe_start, "end": core_probe(a.cores)}
    result.update(mode=mode, model=margs.describe(), machine=machine, date=time.strftime("%Y-%m-%d"),
                  threads_per_rank=a.threads, wall_s=time.perf_counter() - t0, load_average_end=load_average(),
                  args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()})
    print(report(result, a.markdown))
    print(f"# total {result['wall_s']:.0f} s, load average {result['load_average_end']:.1f} at the end")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
        print(f"# wrote {a.json}")
    if a.plot and "scaling" in result:
        plot_scaling(result, a.plot)
        print(f"# wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
