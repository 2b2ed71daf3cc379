"""Measuring tools of benchmarks/speed.py: what a step's time goes to, and bytes per layer.

- ``Timers``: wall and thread-CPU accumulators patched into the torch.distributed
  calls (time blocked in communication), the CP exchange autograd functions and
  the torch chunk kernel.
- ``timed_steps``: several variants of a training step (e.g. CP vs the shard
  alone) interleaved step by step (forward and reversed order in turn), minimum and
  spread over repeats.
- ``comm_per_layer`` (bytes, rounds per GDN layer from titan_cp.cp.comm.comm_stats)
  and ``ring_attention_bytes`` (what ring attention would send, for comparison).
- ``core_probe``: how much of a shared CPU machine is ours right now.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from benchmarks.model_steps import ModelArgs, load_average, train_step

class Timers:
    """Wall-clock accumulators patched into communication calls and CP autograd functions.

    - ``comm``: time blocked in torch.distributed calls (collectives, and the
      ``wait()`` of batched point-to-point work), fwd + bwd.
    - ``exchange``: time inside the state exchange's folds and the halo / all-to-all
      autograd functions (their communication included), fwd + bwd.
    - ``kernel``: time inside the torch chunk kernel (forward, binding the true
      incoming state under CP, backward).
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
        from titan_cp.ops.gated_delta_rule import chunk

        for cls in (halo._HaloExchange, comm.AllToAll):
            for m in ("forward", "backward"):
                setattr(cls, m, staticmethod(self.region("exchange", getattr(cls, m))))
        for name, (fold, reverse_fold) in state_passing.EXCHANGE_FOLDS.items():
            state_passing.EXCHANGE_FOLDS[name] = (self.region("exchange", fold), self.region("exchange", reverse_fold))
        for fn in ("chunk_forward", "bind_incoming_state", "chunk_backward"):
            setattr(chunk, fn, self.region("kernel", getattr(chunk, fn)))


_CONTEXTS: dict = {}


def set_cp(model, args: ModelArgs, P: int, exchange: str | None = None, layout: str | None = None,
           q_transition: str | None = None):
    """Apply CP (or none) to ``model``. Contexts are built once per (P, layout, exchange, q_transition)
    and reused, as a training run keeps its one context: its first-call shape check (a collective)
    is not a per-step cost."""
    from titan_cp.cp.context import CPContext
    from titan_cp.models.common.parallelize import apply_cp

    if P == 1 or exchange == "none":
        apply_cp(model, None)
        return
    key = (P, layout or args.layout, exchange or args.exchange, q_transition or args.q_transition)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = CPContext(group=dist.group.WORLD, layout=key[1], exchange=key[2], q_transition=key[3])
    apply_cp(model, _CONTEXTS[key])


def interleaved_order(names: list[str], rounds: int) -> list[list[str]]:
    """The variants' order in every round: forwards, then backwards (A B C, C B A, A B C, ...).

    Interleaving spreads a load change over all variants alike; reversing every other round
    cancels what a fixed order would add to one of them (the previous variant's cache and
    allocator state, a rank's start-up skew).
    """
    return [list(names) if i % 2 == 0 else list(reversed(names)) for i in range(rounds)]


def summarize(rows: list[dict]) -> dict:
    """Per key the minimum over the repeats (noise on a shared machine only ever adds time),
    plus ``walls`` (every repeat's wall time) and ``spread`` = (max - min) / min of the walls."""
    keys = set().union(*rows)
    out = {k: min(r.get(k, 0.0) for r in rows) for k in keys}
    walls = [r["wall"] for r in rows]
    out["walls"] = walls
    out["spread"] = (max(walls) - min(walls)) / min(walls)
    return out


def timed_steps(model, inputs, labels, global_tokens, timers: Timers, warmup: int, repeats: int,
                loss_chunks: int, variants=None, hidden=None):
    """Per variant (name -> setup callable): :func:`summarize` of its steps over ``repeats`` rounds.

    Variants are interleaved step by step (:func:`interleaved_order`) so load changes hit them
    alike; ``warmup`` rounds first are not kept. Ranks meet at a barrier before every step (not timed).
    ``hidden(model, inputs)``: the model's forward to the decoder output (default: the GDN LM's).
    """
    variants = variants or {"cp": lambda: None}
    step_kwargs = {} if hidden is None else {"hidden": hidden}
    samples = {name: [] for name in variants}
    for i, order in enumerate(interleaved_order(list(variants), warmup + repeats)):
        for name in order:
            batch_override = variants[name]()  # may return (inputs, labels) of its own
            x, y = batch_override if batch_override is not None else (inputs, labels)
            model.zero_grad(set_to_none=True)
            if dist.is_initialized():
                dist.barrier()
            timers.reset()
            timers.sync()
            c0, o0, t0 = time.process_time(), os.times(), time.perf_counter()
            train_step(model, x, y, loss_chunks, global_tokens, **step_kwargs)
            timers.sync()
            wall, cpu, o1 = time.perf_counter() - t0, time.process_time() - c0, os.times()
            if i >= warmup:
                samples[name].append({"wall": wall, "cpu": cpu, "cpu_user": o1.user - o0.user,
                                      "cpu_sys": o1.system - o0.system, **timers.t})
    return {name: summarize(rows) for name, rows in samples.items()}


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
    load = load_average()  # before the probe: its own processes raise the 1-minute average by ~0.3
    one = probe_cores(1)
    many = probe_cores(cores)
    result = {"one_process_gflops": one[0], f"{cores}_processes_gflops": many,
              "effective_parallelism": sum(many) / one[0], "load_average": load}
    print(f"# core probe: 1 process {one[0]:.0f} GFLOP/s; {cores} concurrent processes "
          f"{' + '.join(f'{r:.0f}' for r in many)} GFLOP/s -> effective parallelism "
          f"{result['effective_parallelism']:.2f} of {cores} (load average {result['load_average']:.1f})", flush=True)
    return result


def quietness(start: dict, end: dict | None, cores: int, min_parallelism: float = 0.9,
              max_extra_load: float = 0.5, max_drift: float = 0.05, check_load: bool = True) -> dict:
    """Is the machine quiet enough for a timing figure? A verdict from the core probes around a run.

    Quiet means all three hold (else the figure is flagged, or refused under ``--require_quiet``):
    - ``effective_parallelism`` (sum of ``cores`` concurrent one-thread matmul rates / one alone)
      >= ``min_parallelism * cores`` at the start and the end: every rank gets its own core;
    - the 1-minute load average, read before the start probe, <= ``max_extra_load`` (nothing else
      running). ``check_load=False`` for a run that follows another back to back: that average
      still holds the previous run's own ranks, and the parallelism probes see anyone else;
    - the one-process rate drifts <= ``max_drift`` between start and end: the machine the
      run saw did not change under it (a 5% drift alone can move a CP overhead by 5 points).
    Returns ``{"quiet": bool, "reasons": [...]}``; an empty probe (GPU, ``--no_probe``) is
    reported as unchecked, never as quiet.
    """
    if not start:
        return {"quiet": False, "checked": False, "reasons": ["no core probe (GPU or --no_probe)"]}
    reasons = []
    for name, probe in (("start", start), ("end", end)):
        if probe and probe["effective_parallelism"] < min_parallelism * cores:
            reasons.append(f"{name}: effective parallelism {probe['effective_parallelism']:.2f} "
                           f"< {min_parallelism * cores:.2f} of {cores} cores")
    if check_load and start["load_average"] > max_extra_load:
        reasons.append(f"load average {start['load_average']:.1f} > {max_extra_load} before the run")
    if end:
        drift = abs(end["one_process_gflops"] / start["one_process_gflops"] - 1)
        if drift > max_drift:
            reasons.append(f"one-process matmul rate drifted {100 * drift:.0f}% (> {100 * max_drift:.0f}%)")
    return {"quiet": not reasons, "checked": True, "reasons": reasons}
