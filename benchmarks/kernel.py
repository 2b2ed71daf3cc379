"""The torch chunk kernel against the machine: tokens/s, FLOP rate, and the fraction of
this machine's one-thread matmul rate at the kernel's own shapes.

One thread (torch.set_num_threads(1)), fp32, B=1, H heads, K=64, V=128, the loss
depending on both the output and the final state.

FLOP count (titan_cp/ops/gated_delta_rule/chunk.py), per chunk of C tokens and per head,
a matmul [m x n] x [n p] counted as 2 m n p; the triangular solve T = (I + A)^{-1}
(C right-hand sides, unit lower triangular) as C^3::

    forward   K K^T 2C^2K, solve C^3, T [bgK | bV] 2C^2(K+V), u = U - W H 2CKV,
              H_out += K^T u 2CKV, Q K^T 2C^2K, (QK^T*D) u 2C^2V, Q H 2CKV
              = 6 C^2K + 4 C^2V + C^3 + 6 CKV
    backward  recomputes the forward's WY part and u (6 C^2K + 2 C^2V + C^3 + 2 CKV), then
              du = (QK^T*D)^T dO 2C^2V, dH = Q^T dO 2CKV, chunk loop du += K dH, dH -= W^T du
              4CKV, dO H^T 2CKV, dO u^T 2C^2V, dqk K 2C^2K, dqk^T Q 2C^2K, u dH^T 2CKV,
              du H^T 2CKV, T^T dW 2C^2K, T^T dU 2C^2V, dA = dks W^T + dvs U^T 2C^2(K+V),
              d(KK^T) K 2C^2K
              = 16 C^2K + 10 C^2V + C^3 + 14 CKV   (of which the recompute 6 C^2K + 2 C^2V + C^3 + 2 CKV)

At C = K = 64, V = 128: forward 7.08 MFLOP, backward 17.0 MFLOP per chunk and head.
Element-wise work (decays, masks, row dots, O(C^2 + CK + CV)) is not counted.

The reference rate: torch.matmul in this process, one thread, batched over the same
N*H chunks at the shapes above, [C x K] x [K x V], [C x C] x [C x V], [C x K] x [K x C]
and [C x C] x [C x C] (for the solve); the kernel's *ideal* time is the sum over its
matmuls of FLOPs / the rate at that shape, and the fraction reported is ideal / measured
(1.0 = the kernel runs as fast as its matmuls alone would). Kernel and matmul rounds are
interleaved and the minimum of the repeats is kept (other processes only ever add time).
Times are this thread's CPU time (``--clock thread``, the default: time the thread spends
descheduled by other processes on a loaded machine is not counted; their cache and memory
traffic still is) or wall time (``--clock wall``).

Old against new (``--baseline FILE``): FILE is another version of
titan_cp/ops/gated_delta_rule/chunk.py (e.g. ``git show <commit>:titan_cp/ops/gated_delta_rule/chunk.py
> /tmp/old_chunk.py``), timed in the same rounds, interleaved with the current kernel, on the same
inputs; its row is printed beside and its outputs and gradients are compared with the current ones.

FLA's pure-PyTorch naive_chunk_gated_delta_rule is timed beside it when FLA is installed
(loaded from its file so that FLA's Triton __init__ is never imported; autograd backward).

What bounds the fraction (``--profile``): one fwd + bwd under torch.profiler, self CPU time by
op class, matmuls (bmm, baddbmm, addmm, the triangular solve), copies (layout changes, dtype
casts), the other aten ops (element-wise, masks, exp, reductions, cumsum) and the rest
(autograd, Python, the profiler's own cost). The matmul ops alone run the counted FLOPs at the
"in-kernel matmul rate": counted / matmul time. The fraction can be no higher than the matmul
share times in-kernel rate / isolated rate; both are printed. The profiler's times are wall time
(useless on a loaded machine), so ``--profile`` also replays the kernel's own matmul calls alone
(:func:`matmul_replay_seconds`, the ``--clock`` timer): their time against the kernel's is the
matmul share, and counted FLOPs / that time the rate the kernel's matmul calls reach by themselves.

    python -m benchmarks.kernel [--seq_lens 2048 8192] [--repeats 5] [--json kernel.json] [--profile]
        [--baseline /tmp/old_chunk.py] [--clock thread|wall]
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro

from titan_cp.ops.denormals import flush_denormals
from titan_cp.ops.gated_delta_rule import chunk as chunk_module
from titan_cp.ops.gated_delta_rule.chunk import chunk_gated_delta_rule


def load_fla_naive():
    """FLA's naive.py as a module, or None if FLA is not installed."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "ops" / "gated_delta_rule" / "naive.py"
    if not path.exists():
        return None
    file_spec = importlib.util.spec_from_file_location("fla_gdn_naive", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def chunk_flops(C: int, K: int, V: int) -> dict[str, dict[str, int]]:
    """FLOPs per chunk and head of the torch chunk kernel (module docstring), by matmul shape.

    Keys of each pass: ``ckv`` ([C x K] x [K x V] and its transposes), ``ccv`` ([C x C] x [C x V]),
    ``cck`` ([C x K] x [K x C], [C x C] x [C x K]), ``ccc`` (the triangular solve).
    ``recompute`` is the part of ``bwd`` that repeats the forward.
    """
    return {
        "fwd": {"cck": 6 * C * C * K, "ccv": 4 * C * C * V, "ccc": C**3, "ckv": 6 * C * K * V},
        "bwd": {"cck": 16 * C * C * K, "ccv": 10 * C * C * V, "ccc": C**3, "ckv": 14 * C * K * V},
        "recompute": {"cck": 6 * C * C * K, "ccv": 2 * C * C * V, "ccc": C**3, "ckv": 2 * C * K * V},
    }


def matmul_shapes(C: int, K: int, V: int) -> dict[str, tuple[int, int, int]]:
    """(m, n, p) of [m x n] x [n x p] per FLOP class of :func:`chunk_flops`."""
    return {"ckv": (C, K, V), "ccv": (C, C, V), "cck": (C, K, C), "ccc": (C, C, C)}


def ideal_seconds(flops: dict[str, int], rates: dict[str, float], chunks: int) -> float:
    """Time the counted matmuls alone would take: sum of FLOPs / rate (FLOP/s) per shape, for ``chunks`` chunks."""
    return sum(chunks * f / rates[key] for key, f in flops.items())


def make_inputs(B, T, H, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    h0 = torch.randn(B, H, K, V, generator=gen)
    w_o = torch.randn(B, T, H, V, generator=gen)
    w_s = torch.randn(B, H, K, V, generator=gen)
    return (q, k, v, g, beta, h0), (w_o, w_s)


def spread(samples: list[float]) -> float:
    """(max - min) / min of the repeats."""
    return (max(samples) - min(samples)) / min(samples)


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}
clock = CLOCKS["thread"]
"""The timer of every measurement here (``--clock``)."""


def load_kernel_file(path: pathlib.Path):
    """A chunk.py file (another version of titan_cp/ops/gated_delta_rule/chunk.py) as a module."""
    file_spec = importlib.util.spec_from_file_location(f"baseline_chunk_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def time_fwd_bwd_once(run, tensors, weights, results: list | None = None) -> tuple[float, float]:
    """Seconds of one forward and of the backward after it (``results``: gets o, state and the gradients)."""
    xs = [x.detach().clone().requires_grad_() for x in tensors]
    start = clock()
    o, state = run(*xs)
    mid = clock()
    loss = (o * weights[0]).sum() + (state * weights[1]).sum()
    loss.backward()
    end = clock()
    if results is not None:
        results[:] = [o.detach(), state.detach()] + [x.grad for x in xs]
    return mid - start, end - mid


def time_matmul_once(batch: int, m: int, n: int, p: int) -> float:
    """Seconds of one batched [batch, m, n] x [batch, n, p] torch.matmul (fresh output, as the kernel's)."""
    a, b = torch.randn(batch, m, n), torch.randn(batch, n, p)
    start = clock()
    torch.matmul(a, b)
    return clock() - start


def max_relative_difference(xs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """max over the tensors of max |x - ref| / max |ref|."""
    return max(((x - r).abs().max() / r.abs().max().clamp(min=1e-30)).item() for x, r in zip(xs, refs))


@dataclass
class Args:
    seq_lens: tuple[int, ...] = (2048, 8192)
    """sequence lengths to time"""
    repeats: int = 7
    """timed repeats, kernel and matmul rounds interleaved (the minimum is reported)"""
    heads: int = 4
    chunk_size: int = 64
    """the chunk kernel's chunk C"""
    fla: bool = True
    """also time FLA's naive chunk reference (autograd backward)"""
    json: pathlib.Path | None = None
    """write the rows here"""
    profile: bool = False
    """also print each T's profiler split of one fwd + bwd (module docstring)"""
    baseline: pathlib.Path | None = None
    """another version of chunk.py, timed interleaved with the current kernel (module docstring)"""
    clock: Literal["thread", "wall"] = "thread"
    """thread (this thread's CPU time) or wall"""


MATMUL_OPS = frozenset({"aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::addmm", "aten::addmm_", "aten::mm",
                        "aten::linalg_solve_triangular"})
COPY_OPS = frozenset({"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"})


def profile_split(T: int, H: int, C: int, rounds: int = 3, K: int = 64, V: int = 128) -> dict:
    """Self CPU seconds of one fwd + bwd by op class (module docstring), the mean of ``rounds``."""
    from torch.profiler import ProfilerActivity, profile

    tensors, weights = make_inputs(1, T, H, K, V)

    def ours(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=C)

    time_fwd_bwd_once(ours, tensors, weights)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            time_fwd_bwd_once(ours, tensors, weights)
    split = {"matmul": 0.0, "copy": 0.0, "other aten": 0.0, "autograd/python": 0.0}
    for event in prof.key_averages():
        name = event.key
        key = ("matmul" if name in MATMUL_OPS else "copy" if name in COPY_OPS
               else "other aten" if name.startswith("aten::") else "autograd/python")
        split[key] += event.self_cpu_time_total * 1e-6 / rounds
    return split


MATMUL_OVERLOADS = ("bmm", "baddbmm", "baddbmm_", "mm", "addmm", "addmm_", "linalg_solve_triangular")


def _random_like_layout(x: torch.Tensor, scale: float) -> torch.Tensor:
    """A tensor with x's size, strides (stride 0 and column blocks included) and dtype, random normal * scale."""
    storage = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    return torch.randn(storage, dtype=x.dtype).mul_(scale).as_strided(x.shape, x.stride())


def matmul_replay_seconds(T: int, H: int, C: int, rounds: int = 3, K: int = 64, V: int = 128) -> float:
    """This thread's CPU seconds of the kernel's own matmul calls alone, per fwd + bwd (the minimum of
    ``rounds``): every bmm / baddbmm / mm / addmm / triangular solve that one fwd + bwd dispatches is
    recorded (op, sizes, strides, scalars) and called again on random operands of the same layout,
    made just before the call (so in cache: this is the matmuls' floor, not their in-kernel time)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ in MATMUL_OVERLOADS:
                calls.append((func, args, kwargs))
            return func(*args, **kwargs)

    tensors, weights = make_inputs(1, T, H, K, V)

    def ours(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=C)

    with Record():
        time_fwd_bwd_once(ours, tensors, weights)
    # Layouts only: keep no kernel tensor alive while replaying.
    calls = [(func, [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args],
              {key: (a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for key, a in kwargs.items()})
             for func, args, kwargs in calls]
    is_layout = lambda a: isinstance(a, tuple) and len(a) == 3 and isinstance(a[2], torch.dtype)  # noqa: E731

    def make(a, scale):
        return _random_like_layout(torch.empty_strided(a[0], a[1], dtype=a[2]), scale) if is_layout(a) else a

    best = float("inf")
    with flush_denormals():
        for _ in range(rounds):
            total = 0.0
            for func, args, kwargs in calls:
                scale = 0.01 if func.overloadpacket.__name__ == "linalg_solve_triangular" else 1.0  # a solvable A
                call_args = [make(a, scale) for a in args]
                call_kwargs = {key: make(a, scale) for key, a in kwargs.items()}
                start = clock()
                func(*call_args, **call_kwargs)
                total += clock() - start
            best = min(best, total)
    return best


def kernel_row(fwd: list[float], bwd: list[float], rates: dict[str, float], T: int, H: int, C: int,
               K: int, V: int) -> dict:
    """One row from the repeats' fwd / bwd seconds and the matmul rates (FLOP/s) at the kernel's shapes."""
    chunks = H * -(-T // C)
    flops = chunk_flops(C, K, V)
    t_f, t_b = min(fwd), min(bwd)
    total_flops = chunks * (sum(flops["fwd"].values()) + sum(flops["bwd"].values()))
    useful_flops = total_flops - chunks * sum(flops["recompute"].values())
    ideal_f, ideal_b = ideal_seconds(flops["fwd"], rates, chunks), ideal_seconds(flops["bwd"], rates, chunks)
    return {"T": T, "heads": H, "C": C, "K": K, "V": V, "fwd_s": t_f, "bwd_s": t_b, "tokens_per_s": T / (t_f + t_b),
            "gflops_executed": total_flops / (t_f + t_b) / 1e9, "gflops_no_recompute": useful_flops / (t_f + t_b) / 1e9,
            "matmul_gflops": {key: r / 1e9 for key, r in rates.items()},
            "fraction_fwd": ideal_f / t_f, "fraction_bwd": ideal_b / t_b,
            "fraction": (ideal_f + ideal_b) / (t_f + t_b),
            "spread_fwd_bwd": spread([f + b for f, b in zip(fwd, bwd)])}


def measure(T: int, H: int, C: int, repeats: int, K: int = 64, V: int = 128, baseline=None) -> dict:
    """One row: min fwd / bwd seconds of the kernel, the matmul rates at its shapes, the fractions.

    ``baseline``: another chunk.py module, timed in the same rounds; its row goes under "baseline",
    with the change of fwd + bwd time and the largest relative difference of its outputs and gradients.
    """
    tensors, weights = make_inputs(1, T, H, K, V)
    chunks = H * -(-T // C)

    def runner(module):
        def run(q, k, v, g, beta, h0):
            return module.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                                 chunk_size=C)
        return run

    kernels = {"current": runner(chunk_module)}
    if baseline is not None:
        kernels["baseline"] = runner(baseline)
    shapes = matmul_shapes(C, K, V)
    times = {name: ([], []) for name in kernels}
    results = {name: [] for name in kernels}
    mm = {key: [] for key in shapes}
    for i in range(repeats + 1):  # round 0 is warm-up
        for name, run in kernels.items():
            f, b = time_fwd_bwd_once(run, tensors, weights, results[name])
            if i:
                times[name][0].append(f)
                times[name][1].append(b)
        t_mm = {key: time_matmul_once(chunks, *s) for key, s in shapes.items()}
        if i:
            for key, t in t_mm.items():
                mm[key].append(t)
    rates = {key: 2 * chunks * m * n * p / min(mm[key]) for key, (m, n, p) in shapes.items()}
    row = kernel_row(*times["current"], rates, T, H, C, K, V)
    if baseline is not None:
        row["baseline"] = kernel_row(*times["baseline"], rates, T, H, C, K, V)
        row["change_vs_baseline"] = (row["fwd_s"] + row["bwd_s"]) / (row["baseline"]["fwd_s"]
                                                                   + row["baseline"]["bwd_s"]) - 1
        row["max_rel_diff_vs_baseline"] = max_relative_difference(results["current"], results["baseline"])
    return row


def format_row(label: str, row: dict) -> str:
    mm = row["matmul_gflops"]
    return (f"| {row['T']:,} | {label} | {1e3 * row['fwd_s']:.1f} | {1e3 * row['bwd_s']:.1f} | "
            f"{row['tokens_per_s']:,.0f} | {row['gflops_executed']:.1f} / {row['gflops_no_recompute']:.1f} | "
            f"{mm['ckv']:.0f} {mm['ccv']:.0f} {mm['cck']:.0f} {mm['ccc']:.0f} | "
            f"{100 * row['fraction_fwd']:.0f}% / {100 * row['fraction_bwd']:.0f}% / {100 * row['fraction']:.0f}% | "
            f"{100 * row['spread_fwd_bwd']:.0f}% |")


def main():
    args = tyro.cli(Args, prog="python -m benchmarks.kernel", description=__doc__)
    torch.set_num_threads(1)
    global clock
    clock = CLOCKS[args.clock]
    baseline = None if args.baseline is None else load_kernel_file(args.baseline)
    H, C = args.heads, args.chunk_size
    naive = load_fla_naive() if args.fla else None
    print(f"torch {torch.__version__}, 1 thread, fp32, B=1 H={H} K=64 V=128, chunk {C}, min of {args.repeats} "
          f"interleaved repeats (after 1 warm-up), {args.clock} clock; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print("| T | kernel | fwd ms | bwd ms | tok/s | GFLOP/s (executed / without recompute) "
          "| matmul GFLOP/s ckv ccv cck ccc | of matmul rate fwd / bwd / fwd+bwd | spread | FLA naive fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for T in args.seq_lens:
        row = measure(T, H, C, args.repeats, baseline=baseline)
        fla_ms = ""
        if naive is not None:
            tensors, weights = make_inputs(1, T, H, 64, 128)

            def fla(q, k, v, g, beta, h0):
                return naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=C, initial_state=h0,
                                                          output_final_state=True)

            row["fla_naive_s"] = min(sum(time_fwd_bwd_once(fla, tensors, weights)) for _ in range(3))
            fla_ms = f"{1e3 * row['fla_naive_s']:.0f}"
        if args.profile:
            row["profile_s"] = profile_split(T, H, C)
            row["matmul_replay_s"] = matmul_replay_seconds(T, H, C)
        rows.append(row)
        if baseline is not None:
            print(format_row("baseline", row["baseline"]) + " |", flush=True)
        print(format_row("current", row) + f" {fla_ms} |", flush=True)
        if baseline is not None:
            print(f"# T {T:,}: fwd+bwd {100 * row['change_vs_baseline']:+.1f}% against the baseline; outputs and "
                  f"gradients differ by at most {row['max_rel_diff_vs_baseline']:.1e} relative", flush=True)
    for row in rows if args.profile else ():
        split = row["profile_s"]
        total = sum(split.values())
        chunks = H * -(-row["T"] // C)
        flops = chunk_flops(C, 64, 128)
        counted = chunks * (sum(flops["fwd"].values()) + sum(flops["bwd"].values()))
        in_kernel = counted / split["matmul"] / 1e9
        shares = ", ".join(f"{key} {1e3 * t:.1f} ms ({100 * t / total:.0f}%)" for key, t in split.items())
        print(f"# T {row['T']:,} profiled fwd+bwd {1e3 * total:.1f} ms: {shares}; counted FLOPs at "
              f"{in_kernel:.0f} GFLOP/s inside the kernel's matmul ops (isolated: "
              f"{min(row['matmul_gflops'].values()):.0f}-{max(row['matmul_gflops'].values()):.0f})")
        replay, kernel = row["matmul_replay_s"], row["fwd_s"] + row["bwd_s"]
        print(f"# T {row['T']:,} the kernel's matmul calls alone (replayed, operands in cache, {args.clock} clock): "
              f"{1e3 * replay:.1f} ms of the kernel's {1e3 * kernel:.1f} ms ({100 * replay / kernel:.0f}%), "
              f"{counted / replay / 1e9:.0f} GFLOP/s")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps({"load_average": os.getloadavg()[0], "clock": args.clock, "rows": rows},
                                        indent=1))
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
