#!/usr/bin/env python
"""The candidate designs for one CP segment's summary and output correction, side by side.

Under state-passing CP a segment (a shard's tokens) needs its outputs for the
true incoming state S (known only after the exchange) and its summary (S_local,
M) for the exchange: S_end = M S + S_local. Designs, all on the ``torch``
kernel, one segment, loss on the corrected outputs and on S_end (a middle
segment: its final state gets a gradient from later ones):

plain      no CP: the kernel at width V from a zero state (what the same shard
           costs alone; the overhead of every design is measured against it).
one_call   the kernel interface at width V + K: values [v | 0] from state
           [0 | I] give outputs [o | q M] and final state [S_local | M] in one
           call, then o + (q M) S. Works for any kernel; pays the [v | 0] and
           [0 | I] concatenations, zero value columns in the WY products, and
           keeps q M as a view of the whole [o | q M] output. (The design before
           this benchmark.)
native     the library's segment kernel (``ChunkSegmentKernel``): forward, the
           transition as K extra state columns through the chunk loop and the
           outputs only (WY factors at width V), o + (q M) S; then the saved
           chunk states become the true ones H + P S and the backward is the
           plain one from the true start (width V), with dS = (q M)^T dO + M^T dS_end.
           (Chosen; see docs/benchmarks.md. Before, the K columns also rode
           through the backward: 1.30x plain in the 2026-11-27 run.)
two_pass   FLA's way: a state-only pass for [S_local | M] (here the kernel at
           V + K with its outputs unused: an upper bound for a state-only
           kernel, whose saving the FLOP column counts), then the plain kernel
           at width V from S. No correction; the backward runs both passes.
wy_product M from the WY factors per chunk, M_n = gamma_last I - K^T diag(lam) W
           (K x K), chained P_{n+1} = M_n P_n; the correction carried through
           the chunk states: q M_<=t = (diag(gamma) Q - (Q K^T * D) W) P_n; beside
           the plain kernel. Prototype in autograd over the kernel's own helpers.

Columns: CPU time of forward + backward (one thread, median over repeats,
designs interleaved so load hits them alike, denormals flushed for every design
as the chunk kernel does inside: a transition over a long segment decays below
the smallest normal float, and denormal arithmetic made every CP design 2-3x
slower), saved-for-backward bytes per
token (saved_tensors_hooks, unique storages), forward FLOPs per token per head
from the one FLOP formula (titan_cp.models.gdn.flops.gdn_chunk_flops_per_token)
plus each design's extra matmuls, and forward + backward FLOPs with the backward
counted as 2x the forward at the width it runs (the convention of
titan_cp.models.gdn.flops).

    python -m benchmarks.cp_designs [--T 2048] [--heads 4] [--K 64] [--V 128] [--repeats 5] [--markdown]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro

from benchmarks.model_steps import KEEP_FREED_MEMORY
from titan_cp.models.gdn.flops import gdn_chunk_flops_per_token
from titan_cp.ops.gated_delta_rule import chunk as chunk_kernel
from titan_cp.ops.gated_delta_rule.chunk import ChunkSegmentKernel, chunk_gated_delta_rule
from titan_cp.ops.gated_delta_rule.transition import transition_via_interface

C = 64  # the kernel chunk (chunk_gated_delta_rule default)


def make_segment(T, H, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1)
    v = torch.randn(1, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen) + 3)
    beta = torch.sigmoid(torch.randn(1, T, H, generator=gen))
    S_start = torch.randn(1, H, K, V, generator=gen) * 0.1  # what the exchange hands in
    weights = {"o": torch.randn(1, T, H, V, generator=gen), "S": torch.randn(1, H, K, V, generator=gen)}
    return (q, k, v, g, beta), S_start, weights


# --------------------------------------------------------------------------- designs
# Each takes the five kernel inputs and S_start (all leaves) and returns (o, S_end) with
# S_end = M S_start + S_local; plain returns its own (o, S_local).


def plain(q, k, v, g, beta, S_start):
    return chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)


def _end_state(S_local, M, S_start):
    return M @ S_start + S_local


def one_call(q, k, v, g, beta, S_start):
    B, T, H, V = v.shape
    K = q.shape[-1]
    v_padded = torch.cat([v, v.new_zeros(B, T, H, K)], dim=-1)
    identity_start = torch.zeros(B, H, K, V + K, dtype=v.dtype)
    identity_start[..., V:] = torch.eye(K, dtype=v.dtype)
    o_padded, final = chunk_gated_delta_rule(q, k, v_padded, g, beta, initial_state=identity_start,
                                             output_final_state=True)
    o = o_padded[..., :V] + torch.einsum("bthk,bhkv->bthv", o_padded[..., V:], S_start)
    return o, _end_state(final[..., :V], final[..., V:], S_start)


class _NativeSegment(torch.autograd.Function):
    """The library's segment kernel with S_start given (in CP the exchange sits between the
    transition forward and the correction; titan_cp/cp/state_passing.py)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, S_start):
        kernel = ChunkSegmentKernel()
        seg = kernel.forward(q, k, v, g, beta, with_transition=True)
        o = seg.o + torch.einsum("bthk,bhkv->bthv", seg.q_transition, S_start)
        tensors, meta = kernel.bind_incoming_state(seg.saved_tensors, seg.saved_meta, S_start)
        ctx.save_for_backward(seg.q_transition, seg.M, *tensors)
        ctx.kernel, ctx.meta = kernel, meta
        return o, _end_state(seg.S_local, seg.M, S_start)

    @staticmethod
    def backward(ctx, d_o, d_S_end):
        q_transition, M, *tensors = ctx.saved_tensors
        d_S_start = torch.einsum("bthk,bthv->bhkv", q_transition, d_o) + M.transpose(-1, -2) @ d_S_end
        return (*ctx.kernel.backward(tensors, ctx.meta, d_o, d_S_end)[:5], d_S_start)


def native(q, k, v, g, beta, S_start):
    return _NativeSegment.apply(q, k, v, g, beta, S_start)


def two_pass(q, k, v, g, beta, S_start):
    # FLA's way: a state-only pre-pass for [S_local | M] (here the kernel at V + K with its outputs
    # unused: an upper bound for a state-only kernel), then the plain kernel from S_start. The
    # backward runs both passes' backward (the pre-pass's for the exchange's state gradients).
    _, _, S_local, M = transition_via_interface(chunk_gated_delta_rule)(q, k, v, g, beta)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S_start)
    return o, _end_state(S_local, M, S_start)


def wy_product(q, k, v, g, beta, S_start):
    B, T, H, K = q.shape
    o_local, S_local = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)
    scale, acc = K**-0.5, q.dtype
    q_c = chunk_kernel._to_chunks(q, C, acc) * scale  # [N, H, C, K]
    k_c = chunk_kernel._to_chunks(k, C, acc)
    g_c = chunk_kernel._to_chunks(g, C, acc)
    beta_c = chunk_kernel._to_chunks(beta, C, acc)
    D, gamma, lam = chunk_kernel._chunk_decays(g_c, None)
    kkT_D = (k_c @ k_c.transpose(-1, -2)) * D
    eye_C = torch.eye(C, dtype=acc).expand_as(kkT_D)
    T_inv = torch.linalg.solve_triangular(kkT_D * beta_c[..., None], eye_C, upper=False, unitriangular=True)
    W = T_inv @ (k_c * (beta_c * gamma)[..., None])  # [N, H, C, K]
    eye_K = torch.eye(K, dtype=acc)
    M_chunks = gamma[..., -1, None, None] * eye_K - (k_c * lam[..., None]).transpose(-1, -2) @ W  # [N, H, K, K]
    E = q_c * gamma[..., None] - ((q_c @ k_c.transpose(-1, -2)) * D) @ W  # [N, H, C, K]
    P = [eye_K.expand(H, K, K)]
    for n in range(M_chunks.shape[0] - 1):
        P.append(M_chunks[n] @ P[-1])
    M = M_chunks[-1] @ P[-1]
    q_transition = E @ torch.stack(P)  # [N, H, C, K]
    q_transition = chunk_kernel._from_chunks(q_transition, B, H, T, acc)
    o = o_local + torch.einsum("bthk,bhkv->bthv", q_transition, S_start)
    return o, _end_state(S_local, M[None], S_start)


DESIGNS = {"plain": plain, "one_call": one_call, "native": native, "two_pass": two_pass, "wy_product": wy_product}


def forward_flops_per_token_head(design: str, K: int, V: int) -> float:
    """The one formula (F_gdn at the width each design runs) + each design's extra matmuls."""
    F_gdn = gdn_chunk_flops_per_token
    correction = 2 * K * V  # (q M)_t S: [1, K] x [K, V]
    outputs_part = lambda width: 2 * C * K + 2 * C * width + 2 * K * width  # Q K^T, (QK^T*D) u, Q H
    if design == "plain":
        return F_gdn(K, V)
    if design == "one_call":
        return F_gdn(K, V + K) + correction
    if design == "native":  # [W | U] stays at K + V: 2 C K less than at width V + K
        return F_gdn(K, V + K) - 2 * C * K + correction
    if design == "two_pass":  # a state-only pass at V + K (no outputs) + the plain kernel
        return F_gdn(K, V + K) - 2 * C * K - outputs_part(V + K) + F_gdn(K, V)
    if design == "wy_product":  # M_n (2 K^2), P chain (2 K^3 / C), (QK^T*D) W (2 C K), E P (2 K^2)
        return F_gdn(K, V) + 4 * K * K + 2 * K**3 / C + 2 * C * K + correction
    raise ValueError(design)


def training_flops_per_token_head(design: str, K: int, V: int) -> float:
    """Forward + backward, the backward 2x the forward at the width it runs. ``native``'s backward
    is the plain one (2 F_gdn(K, V)) plus the true chunk states H + P S (2 K^2 V / C) and
    G = (q M)^T dO (2 K V); every other design differentiates its whole forward."""
    forward = forward_flops_per_token_head(design, K, V)
    if design == "native":
        return forward + 2 * gdn_chunk_flops_per_token(K, V) + 2 * K * K * V / C + 2 * K * V
    return 3 * forward


def saved_bytes(fn, inputs, S_start) -> int:
    """Bytes of unique storages saved for backward by one forward."""
    storages = {}

    def pack(t):
        if t.requires_grad and t.grad_fn is None:  # leaves: the inputs themselves, not the design's cost
            return t
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs, S_start)
    return sum(storages.values())


def run(a) -> dict:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the chunk kernel does inside: the autograd prototypes get it too
    inputs, S_start, w = make_segment(a.T, a.heads, a.K, a.V)
    times = {name: [] for name in DESIGNS}
    for i in range(a.warmup + a.repeats):
        for name, fn in DESIGNS.items():
            xs = [x.clone().requires_grad_() for x in inputs]
            s = S_start.clone().requires_grad_()
            t0 = time.process_time()
            o, S_end = fn(*xs, s)
            ((o * w["o"]).sum() + (S_end * w["S"]).sum()).backward()
            if i >= a.warmup:
                times[name].append(time.process_time() - t0)
    leaves = [x.clone().requires_grad_() for x in inputs]
    rows = {}
    base = statistics.median(times["plain"])
    for name, fn in DESIGNS.items():
        t = statistics.median(times[name])
        rows[name] = {"cpu_s": t, "vs_plain": t / base,
                      "saved_bytes_per_token": saved_bytes(fn, leaves, S_start.clone().requires_grad_()) / a.T,
                      "fwd_flops_per_token_head": forward_flops_per_token_head(name, a.K, a.V),
                      "train_flops_per_token_head": training_flops_per_token_head(name, a.K, a.V)}
    return {"shape": {"T": a.T, "H": a.heads, "K": a.K, "V": a.V, "C": C}, "load_average": os.getloadavg()[0],
            "designs": rows}


def check_designs_agree(a) -> float:
    """All designs compute the same function: max relative difference of o, S_end and grads."""
    inputs, S_start, w = make_segment(64 * 3, 2, 8, 16, seed=1)
    results = {}
    for name, fn in DESIGNS.items():
        if name == "plain":
            continue
        xs = [x.clone().double().requires_grad_() for x in inputs]
        s = S_start.clone().double().requires_grad_()
        o, S_end = fn(*xs, s)
        ((o * w["o"].double()).sum() + (S_end * w["S"].double()).sum()).backward()
        results[name] = [o, S_end] + [x.grad for x in xs] + [s.grad]
    ref = results["one_call"]
    worst = 0.0
    for name, got in results.items():
        for x, y in zip(got, ref):
            worst = max(worst, ((x.double() - y.double()).abs().max() / y.double().abs().max()).item())
    return worst


@dataclass
class Args:
    T: int = 2048
    """tokens of the segment (a CP shard)"""
    heads: int = 4
    K: int = 64
    V: int = 128
    repeats: int = 5
    warmup: int = 1
    json: Path | None = None
    """write the results here as JSON"""
    markdown: bool = False
    """print a markdown table"""
    system_malloc: bool = False
    """keep glibc's malloc defaults (default: freed memory reused, benchmarks/model_steps.py)"""


def main(argv: list[str] | None = None) -> int:
    a = tyro.cli(Args, args=argv, prog="python -m benchmarks.cp_designs", description=__doc__.split("\n\n")[0], use_underscores=True)
    if not a.system_malloc and sys.platform == "linux" and os.environ.get("GLIBC_TUNABLES") != KEEP_FREED_MEMORY:
        os.environ["GLIBC_TUNABLES"] = KEEP_FREED_MEMORY  # glibc reads it at start: run this script again
        os.execv(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]])
    agree = check_designs_agree(a)
    out = run(a)
    out["designs_agree_max_rel_diff"] = agree
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    s = out["shape"]
    print(f"CP segment designs: T {s['T']}, H {s['H']}, K {s['K']}, V {s['V']}, C {s['C']}; one thread, fp32, "
          f"fwd + bwd CPU time (median of {a.repeats}); load average {out['load_average']:.1f}; "
          f"designs agree to {agree:.1e} (float64); malloc: "
          f"{'glibc defaults' if a.system_malloc else 'freed memory reused (GLIBC_TUNABLES)'}")
    if a.markdown:
        print("| design | fwd+bwd CPU s | vs plain | saved bytes / token | fwd FLOPs / token / head "
              "| fwd+bwd FLOPs / token / head |")
        print("|---|---:|---:|---:|---:|---:|")
    for name, r in out["designs"].items():
        if a.markdown:
            print(f"| {name} | {r['cpu_s']:.4f} | {r['vs_plain']:.2f} | {r['saved_bytes_per_token']:,.0f} | "
                  f"{r['fwd_flops_per_token_head']:,.0f} | {r['train_flops_per_token_head']:,.0f} |")
        else:
            print(f"  {name:10s} {r['cpu_s']:.4f} s  x{r['vs_plain']:.2f}  saved {r['saved_bytes_per_token']:,.0f} B/token"
                  f"  fwd {r['fwd_flops_per_token_head']:,.0f} fwd+bwd {r['train_flops_per_token_head']:,.0f} "
                  f"FLOP/token/head")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
