"""Measuring tools of benchmarks/speed.py: what a step's time goes to, and bytes per layer.

- ``Timers``: wall and thread-CPU accumulators patched into the torch.distributed
  calls (time blocked in communication), the CP exchange autograd functions and
  the torch chunk kernel.
- ``timed_steps``: several variants of a training step (e.g. CP vs the shard
  alone) interleaved step by step (forward and reversed order in turn), minimum and
  spread over repeats.
- ``attention_work``: the work-matched reference of a model with attention layers: the
  block attention calls (fwd + bwd) a CP rank's queries make against the keys they need,
  and those of its shard alone, on local tensors of the layers' shapes (no communication).
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
    - ``attention``: time inside ring attention's block ops (``block_attention_forward`` /
      ``backward``; not its merges or ring waits), fwd + bwd.
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
        from titan_cp.cp import ring_attention

        for fn in ("block_attention_forward", "block_attention_backward"):
            setattr(ring_attention, fn, self.region("attention", getattr(ring_attention, fn)))


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
                loss_chunks: int, variants=None, hidden=None, kernels=None):
    """Per variant (name -> setup callable): :func:`summarize` of its steps over ``repeats`` rounds.

    Variants are interleaved step by step (:func:`interleaved_order`) so load changes hit them
    alike; ``warmup`` rounds first are not kept. Ranks meet at a barrier before every step (not timed).
    ``hidden(model, inputs)``: the model's forward to the decoder output (default: the GDN LM's).
    ``kernels`` (name -> callable): pieces of work timed in the same rounds as the steps, each in
    place of a step (e.g. :func:`attention_work`); their summaries are keyed by their names too.
    """
    variants = variants or {"cp": lambda: None}
    kernels = kernels or {}
    step_kwargs = {} if hidden is None else {"hidden": hidden}
    samples = {name: [] for name in [*variants, *kernels]}
    for i, order in enumerate(interleaved_order(list(samples), warmup + repeats)):
        for name in order:
            if name in kernels:
                work = kernels[name]
            else:
                batch_override = variants[name]()  # may return (inputs, labels) of its own
                x, y = batch_override if batch_override is not None else (inputs, labels)
                model.zero_grad(set_to_none=True)
                work = lambda x=x, y=y: train_step(model, x, y, loss_chunks, global_tokens, **step_kwargs)  # noqa: E731
            if dist.is_initialized():
                dist.barrier()
            timers.reset()
            timers.sync()
            c0, o0, t0 = time.process_time(), os.times(), time.perf_counter()
            work()
            timers.sync()
            wall, cpu, o1 = time.perf_counter() - t0, time.process_time() - c0, os.times()
            if i >= warmup:
                samples[name].append({"wall": wall, "cpu": cpu, "cpu_user": o1.user - o0.user,
                                      "cpu_sys": o1.system - o0.system, **timers.t})
    return {name: summarize(rows) for name, rows in samples.items()}


# --------------------------------------------------------------------------- work-matched reference


def attention_shapes(model, inputs, hidden) -> list[dict]:
    """The q / k shapes, dtype and scale of every ring-attention call of one forward of ``model`` on
    ``inputs`` (run without CP and without grad: one causal block per attention layer). Empty for a
    model without attention layers."""
    from titan_cp.cp import ring_attention

    calls, original = [], ring_attention.block_attention_forward

    def record(q, k, v, *, scale, causal, **kw):
        calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "dtype": q.dtype, "scale": scale})
        return original(q, k, v, scale=scale, causal=causal, **kw)

    ring_attention.block_attention_forward = record
    try:
        with torch.no_grad():
            hidden(model, inputs)
    finally:
        ring_attention.block_attention_forward = original
    return calls


def ring_plan(rank: int, P: int, layout: str) -> list[list]:
    """The block tasks ring attention runs on ``rank``, per ring step (titan_cp.cp.ring_attention
    ``step_plans``). ``P = 1``: one causal block over the whole local sequence, as ``ring_attention``
    with ``cp = None``."""
    from titan_cp.cp.ring_attention import plan_step, step_plans

    if P == 1:
        return [plan_step([0], [0])[0]]
    return [tasks for tasks, _ in step_plans(rank, P, layout)]


def attention_work(shape: dict, plan: list[list], device, seed: int = 0):
    """A callable that runs, on local tensors of one attention layer's ``shape`` (:func:`attention_shapes`),
    the block calls of ``plan`` (:func:`ring_plan`): every step's forward blocks, then every step's
    backward blocks, through titan_cp.cp.ring_attention's ``block_attention_forward`` / ``backward``.

    The keys a CP rank receives at step i are stood in for by one local [B, Hkv, Tloc, D] tensor of
    the held block's shape: the block ops' time depends on the shapes and masks, not on the values.
    What this leaves out of the work is what CP adds around it: the ring's sends and waits, and the
    online-softmax merges of the blocks' partial results.
    """
    from titan_cp.cp import ring_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape["q"], generator=g).to(device=device, dtype=shape["dtype"])
    k, v = (torch.randn(shape["k"], generator=g).to(device=device, dtype=shape["dtype"]) for _ in range(2))
    dout = torch.randn(shape["q"], generator=g).to(device=device, dtype=shape["dtype"])
    seg = q.shape[2] // max(t.q_hi for step in plan for t in step)  # every local query segment has its diagonal

    def run():
        saved = []
        for step in plan:
            for t in step:
                qs, ks = slice(t.q_lo * seg, t.q_hi * seg), slice(t.k_lo * seg, t.k_hi * seg)
                out, lse = ring_attention.block_attention_forward(q[:, :, qs], k[:, :, ks], v[:, :, ks],
                                                                  scale=shape["scale"], causal=t.causal)
                saved.append((t, qs, ks, lse, (dout[:, :, qs] * out).sum(dim=-1)))
        for t, qs, ks, lse, delta in saved:
            ring_attention.block_attention_backward(q[:, :, qs], k[:, :, ks], v[:, :, ks], dout[:, :, qs], lse, delta,
                                                    scale=shape["scale"], causal=t.causal)

    return run


def attention_kernels(shapes: list[dict], rank: int, P: int, layout: str, device) -> tuple[dict, dict]:
    """The ``kernels`` of :func:`timed_steps` for the work-matched reference: per distinct attention-layer
    shape, ``attn_cp:<i>`` (this rank's CP blocks) and ``attn_alone:<i>`` (its shard's causal block), and
    ``{i: how many layers have shape i}``. Two empty dicts for a model without attention layers."""
    distinct: dict = {}
    for s in shapes:
        key = (s["q"], s["k"], s["dtype"], s["scale"])
        distinct.setdefault(key, [s, 0])[1] += 1
    kernels, counts = {}, {}
    for i, (s, n) in enumerate(distinct.values()):
        kernels[f"attn_cp:{i}"] = attention_work(s, ring_plan(rank, P, layout), device)
        kernels[f"attn_alone:{i}"] = attention_work(s, ring_plan(0, 1, layout), device)
        counts[i] = n
    return kernels, counts


def matched_reference(alone: float, attention_cp: dict, attention_alone: dict, layers: dict) -> float:
    """The work-matched reference of one rank: its shard-alone step plus, per attention layer, the
    attention work its queries do under CP beyond what its shard alone does,

        t(matched) = t(shard alone) + sum_i n_i (t(CP blocks of shape i) - t(shard's causal block of shape i))

    (``layers`` = {i: n_i}, the layers of shape i; the times by shape i). No attention layers: t(shard alone).
    """
    return alone + sum(n * (attention_cp[i] - attention_alone[i]) for i, n in layers.items())


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
