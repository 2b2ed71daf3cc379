"""Tokens/s of fwd+bwd: titan_cp's chunk kernel vs FLA's naive_chunk_gated_delta_rule.

One thread (torch.set_num_threads(1)), fp32, B=1, H=4, K=64, V=128, the loss
depending on both the output and the final state. FLA's pure-PyTorch reference
is loaded from its file (fla/ops/gated_delta_rule/naive.py) so that FLA's
package __init__ (Triton) is never imported; its backward is autograd through
its Python loops.

    python -m benchmarks.kernel [--seq-lens 2048 8192] [--repeats 5]
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import tyro

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


def time_fwd_bwd(run, tensors, weights, repeats):
    """Best (minimum) seconds of forward alone and of forward + backward over `repeats` runs.

    The minimum, not the median: other processes on a shared machine only ever add time.
    """
    fwd_times, total_times = [], []
    for i in range(repeats + 1):  # first round is warm-up
        xs = [x.detach().clone().requires_grad_() for x in tensors]
        start = time.perf_counter()
        o, state = run(*xs)
        mid = time.perf_counter()
        loss = (o * weights[0]).sum() + (state * weights[1]).sum()
        loss.backward()
        end = time.perf_counter()
        if i:
            fwd_times.append(mid - start)
            total_times.append(end - start)
    return min(fwd_times), min(total_times)


@dataclass
class Args:
    seq_lens: tuple[int, ...] = (2048, 8192)
    """sequence lengths to time"""
    repeats: int = 5
    """timed repeats (the best is reported)"""
    heads: int = 4
    chunk_size: int = 64
    """the chunk kernel's chunk C"""


def main():
    args = tyro.cli(Args, prog="python -m benchmarks.kernel", description=__doc__)

    torch.set_num_threads(1)
    B, H, K, V = 1, args.heads, 64, 128
    naive = load_fla_naive()
    if naive is None:
        print("FLA not installed: only titan_cp's kernel is timed")

    def ours(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=args.chunk_size
        )

    def fla(q, k, v, g, beta, h0):
        return naive.naive_chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=args.chunk_size, initial_state=h0, output_final_state=True
        )

    print(f"torch {torch.__version__}, 1 thread, fp32, B={B} H={H} K={K} V={V}, chunk {args.chunk_size}, "
          f"best of {args.repeats} (after 1 warm-up); load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (others' processes slow both columns alike)")
    header = f"{'T':>6} | {'ours fwd ms':>11} {'ours fwd+bwd ms':>15} {'ours tok/s':>10} | " \
             f"{'FLA fwd ms':>10} {'FLA fwd+bwd ms':>14} {'FLA tok/s':>9} | {'ours/FLA':>8}"
    print(header)
    print("-" * len(header))
    for T in args.seq_lens:
        tensors, weights = make_inputs(B, T, H, K, V)
        ours_fwd, ours_total = time_fwd_bwd(ours, tensors, weights, args.repeats)
        line = f"{T:>6} | {ours_fwd * 1e3:>11.1f} {ours_total * 1e3:>15.1f} {B * T / ours_total:>10.0f} | "
        if naive is not None:
            fla_fwd, fla_total = time_fwd_bwd(fla, tensors, weights, args.repeats)
            line += f"{fla_fwd * 1e3:>10.1f} {fla_total * 1e3:>14.1f} {B * T / fla_total:>9.0f} | " \
                    f"{fla_total / ours_total:>7.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
