#!/usr/bin/env python
"""Everything a GPU session must check about titan_cp's Triton path, in one run.

    pip install -e '.[gpu]'                      # FLA 0.6.0 + triton
    python scripts/gpu_check.py --out gpu_report.json
    python scripts/gpu_check.py --out quick.json --quick          # minutes: small shapes only

Sections (``--sections``, default all three):

``parity``   FLA's Triton kernel (``--kernel``) against titan_cp's torch kernel
             (``--reference``), fp32 and bf16 inputs, B=2, T in {1000, 4096}
             (not multiples of the chunk size 64), H=4, K=128, V=256, with an
             initial state and document starts: outputs, final state and the
             gradients of q, k, v, g, beta and initial_state. Both kernels are
             measured against the truth (the reference kernel in float64 on the
             same, already rounded inputs); pass/fail uses the candidate's error
             against the truth (tolerances: ``PARITY_TOL``, justified there).
``cp``       titan_cp's CP with P ranks = P processes sharing one GPU, on gloo:
             the debug model and a 340M-shaped model (340M's layer shapes, 2
             layers, vocab 4096) in fp32 and bf16, P in {2, 4, 8} (plus zigzag,
             logscan and alltoall cases), loss and every parameter gradient
             against the same model on one rank (P = 1) and against the truth
             (P = 1, float64, torch kernel). Why processes on gloo: NCCL refuses
             two ranks on one GPU; gloo handles CUDA tensors only for some
             collectives (and not point-to-point), so titan_cp's CP
             collectives go through host memory (titan_cp.cp.comm.HostStagedComm:
             exact copies, and the exchanged tensors are small). The code under test
             is titan_cp's real CP code (exchange, halo, fold, all-to-all).
``measure``  the 340M flavor in bf16, one shard simulated in one process
             (:class:`LoopbackGroup`: the CP code runs for rank r of P, every
             collective returns local data, so compute and memory are exactly a
             real rank's and communication time is excluded; bytes are counted):
             peak memory and fwd+bwd time per shard vs P at L = 16K, 64K, 256K
             (out-of-memory rows are recorded), the CP overhead over running the
             same shard alone, and per-shard GDN op time of titan_cp's CP (the
             [v | 0] kernel call + exchange/fold + output correction) vs FLA's
             op-level CP (fla.ops.cp, same loopback: pre-pass, all-gather, merge)
             and vs FLA without CP. Targets: titan_cp's per-shard GDN time within
             5% of FLA's op-level CP; peak memory per shard within 10% of
             (activations at the smallest P that fits) * P0 / P + parameters and gradients.

The report (``--out``) is JSON; a summary is printed. Exit status: 0 when every
parity and CP check passes (measurements only report their targets), 1 when a
check fails, 2 when a section raised. CPU runs (``--device cpu --kernel torch
--quick``) exercise everything except FLA; tests/test_gpu_check.py does that.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from titan_cp.testing import rel_err, run_on_ranks  # noqa: E402

SECTIONS = ("parity", "cp", "measure")
TENSOR_NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0")

# ------------------------------------------------------------------------------- tolerances
# Errors are measured against the truth (float64 on the same rounded inputs) as
#   rms  = ||a - truth||_2 / ||truth||_2   (FLA's own tests use this "error ratio")
#   max  = max|a - truth| / max|truth|
# fp32: FLA's tl.dot on fp32 inputs runs on TF32 tensor cores (Triton's default input
# precision; FLA forces 'ieee' only before Ampere; its UT solve asks for 'tf32' explicitly).
# TF32 keeps 10 mantissa bits: unit roundoff 2^-11 = 4.9e-4 per operand. Every output is a
# few chained dots (UT transform -> w, u -> state recurrence -> output), so ~1e-3 RMS of the
# largest entries is expected; the torch reference (cuBLAS fp32, TF32 off) is ~1e-6. With
# TRITON_F32_DEFAULT=ieee (--fp32-ieee) the kernels do full fp32 dots: accumulation order
# only, ~1e-5, and the tight tolerances apply.
# dg and dbeta are sums over K x V products with cancellation (dg_t sums dG over the chunk,
# differences of decays), so their relative errors are 2-4x the others' (FLA's tests: 0.02).
# bf16: inputs and outputs are bf16 (8 mantissa bits, unit roundoff 2^-9 = 2e-3); rounding o
# alone costs ~1.1e-3 RMS. FLA also stores w, u, v_new and the chunk states h / dh in bf16
# and feeds them to further bf16 dots, so a few roundings compound: ~5e-3 RMS, tails of 4-5x
# RMS in the max metric. FLA's own chunk GDN tests accept 0.005-0.02 RMS.
PARITY_TOL = {
    "float32": {"rms": 2e-3, "rms_loose": 5e-3, "max": 1e-2},
    "float32_ieee": {"rms": 1e-4, "rms_loose": 3e-4, "max": 1e-3},
    "bfloat16": {"rms": 1e-2, "rms_loose": 2e-2, "max": 5e-2},
}
LOOSE = ("dg", "dbeta")
# CP vs one rank: CP must be about as accurate as one rank. For every tensor (loss, each
# parameter gradient), err(CP vs truth) <= CP_FACTOR * err(P=1 vs truth) + floor, errors as
# max-relative. CP_FACTOR = 3: CP rounds where one rank does not (the [v | 0] call returns
# o_local and q M in the input dtype, then o = o_local + (q M) S_start is rounded again), so in
# bf16 its error is up to ~2-3x one rank's (measured on CPU with the torch kernel: <= 2.8x, on
# the A_log gradient, a sum over every token). The floors are a few units of the dtype's
# roundoff on the largest entries (fp32 2^-24 ~ 6e-8 times the depth of the sums; bf16 2^-9).
# A real CP bug (a wrong incoming state, a halo off by one token) gives errors of 1e-2..1 in
# fp32, far above these bounds.
CP_FACTOR = 3.0
CP_FLOOR = {"float32": 1e-5, "bfloat16": 5e-3}


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


# ------------------------------------------------------------------------------- arguments, report


def parse_args(argv=None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check_report.json"), help="JSON report path")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--kernel", default="triton", help="kernel under test (model.kernel): triton | torch | recurrent")
    p.add_argument("--reference", default="torch", help="reference kernel for the parity section")
    p.add_argument("--device", default=default_device, help=f"cuda | cpu (default here: {default_device})")
    p.add_argument("--quick", action="store_true", help="small shapes everywhere (minutes; CPU tests use it)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes for parity and cp")
    p.add_argument("--cp-sizes", default=None, help="P values for the cp section (default 2,4,8; quick: 2)")
    p.add_argument("--seq-lens", default=None, help="L values for measure (default 16384,65536,262144)")
    p.add_argument("--measure-sizes", default=None, help="P values for measure (default 1,2,4,8)")
    p.add_argument("--exchange", default="allgather", help="parallelism.cp_exchange for measure")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    p.add_argument("--fp32-ieee", action="store_true",
                   help="TRITON_F32_DEFAULT=ieee (full fp32 dots in FLA) and the tight fp32 tolerances")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per multi-process cp launch")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in ("float32", "bfloat16"):
            p.error(f"--dtypes: '{d}' is not float32 or bfloat16")
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    args.cp_sizes = ints(args.cp_sizes) if args.cp_sizes else ([2] if args.quick else [2, 4, 8])
    args.seq_lens = ints(args.seq_lens) if args.seq_lens else ([256] if args.quick else [16384, 65536, 262144])
    args.measure_sizes = ints(args.measure_sizes) if args.measure_sizes else ([1, 2] if args.quick else [1, 2, 4, 8])
    if args.quick:
        args.iters = min(args.iters, 2)
    return args


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "fla-core", "flash-linear-attention", "torchtitan"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
    return out


def write_report(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def overall_status(report: dict) -> str:
    statuses = [report["sections"][s]["status"] for s in report["sections"]]
    if "error" in statuses:
        return "error"
    if "fail" in statuses:
        return "fail"
    return "pass"


def summarize(report: dict) -> str:
    lines = [f"gpu_check {report['meta']['date']}  device={report['meta']['device']}  kernel={report['meta']['kernel']}"
             f"  -> {report['status'].upper()}"]
    for name, sec in report["sections"].items():
        lines.append(f"[{name}] {sec['status']}" + (f": {sec.get('reason', '')}" if sec.get("reason") else ""))
        if name == "parity":
            for c in sec.get("cases", []):
                worst = max(c["candidate_vs_truth"].items(), key=lambda kv: kv[1]["rms"] / c["tol_rms"][kv[0]])
                lines.append(f"  {c['dtype']:9s} T={c['T']:5d}  {'ok ' if c['pass'] else 'BAD'} worst {worst[0]}: "
                             f"rms {worst[1]['rms']:.1e} max {worst[1]['max']:.1e} (ref kernel rms "
                             f"{c['reference_vs_truth'][worst[0]]['rms']:.1e})")
        elif name == "cp":
            for c in sec.get("cases", []):
                lines.append(f"  {c['model']:9s} {c['dtype']:9s} P={c['P']} {c['layout']:10s} {c['exchange']:9s} "
                             f"{'ok ' if c['pass'] else 'BAD'} worst {c['worst']} ({c['worst_err']:.1e} vs "
                             f"allowed {c['worst_allowed']:.1e}); loss |CP-P1|/P1 {c['loss_vs_p1']:.1e}")
        elif name == "measure":
            for r in sec.get("model_rows", []):
                if r.get("status") != "ok":
                    lines.append(f"  L={r['L']:6d} P={r['P']}: {r.get('status')}")
                    continue
                mem = r.get("peak_mem_gib")
                lines.append(f"  L={r['L']:6d} P={r['P']}: fwd+bwd {r['fwd_bwd_ms']:.1f} ms "
                             f"(alone {r['alone_ms']:.1f} ms), peak {mem if mem is None else round(mem, 2)} GiB"
                             + (f", target {r['mem_target_gib']:.2f} GiB {'ok' if r['mem_target_met'] else 'MISSED'}"
                                if r.get("mem_target_gib") else ""))
            for r in sec.get("kernel_rows", []):
                if r.get("status") != "ok":
                    lines.append(f"  GDN op L={r['L']} P={r['P']}: {r.get('status')}")
                    continue
                def ms(key):
                    return "n/a" if r.get(key) is None else f"{r[key]:.2f} ms"

                lines.append(f"  GDN op L={r['L']:6d} P={r['P']}: titan_cp {ms('titan_cp_ms')}, FLA CP "
                             f"{ms('fla_cp_ms')}, FLA no-CP {ms('fla_local_ms')}"
                             + ("" if r.get("within_5pct") is None else f", within 5%: {r['within_5pct']}"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------- error metrics


def errors(a: torch.Tensor, truth: torch.Tensor) -> dict:
    a, truth = a.double(), truth.double()
    diff = a - truth
    return {
        "max_abs": diff.abs().max().item(),
        "max": (diff.abs().max() / truth.abs().max().clamp_min(1e-30)).item(),
        "rms": (diff.norm() / truth.norm().clamp_min(1e-30)).item(),
    }


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device, iters: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms (synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------- section: parity


def gdn_inputs(B, T, H, K, V, seed, device, dtype):
    """Inputs like the layer's: unit q, k (dtype), v (dtype), g, beta, h0 in float32; doc starts."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3)  # decays ~0.95: long memory
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) * 0.1
    starts = torch.rand(B, T, generator=gen) < 1.0 / 300
    starts[0, 0] = True  # row 0 drops its initial state
    if B > 1:
        starts[1, 0] = False
        starts[1, [T // 2, T // 2 + 1]] = True  # consecutive
        starts[1, T - 1] = True  # last token
    w_o = torch.randn(B, T, H, V, generator=gen)
    w_s = torch.randn(B, H, K, V, generator=gen)
    tensors = [q.to(dtype), k.to(dtype), v.to(dtype), g, beta, h0]
    return [t.to(device) for t in tensors], starts.to(device), (w_o.to(device), w_s.to(device))


def run_kernel(kernel, tensors, starts, weights, compute_dtype=None):
    """fwd + bwd of one kernel; returns o, final_state and the six gradients as float64 on CPU."""
    leaves = [(t if compute_dtype is None else t.to(compute_dtype)).detach().clone().requires_grad_() for t in tensors]
    o, s = kernel(*leaves[:5], initial_state=leaves[5], output_final_state=True, doc_starts=starts)
    w_o, w_s = weights
    ((o.double() * w_o.double()).sum() + (s.double() * w_s.double()).sum()).backward()
    return [x.detach().double().cpu() for x in [o, s] + [leaf.grad for leaf in leaves]]


def kernel_parity(args, device) -> dict:
    from titan_cp.kernels import get_kernel

    if args.kernel == args.reference:
        return {"status": "skipped", "reason": f"--kernel and --reference are both '{args.kernel}'"}
    candidate, reference = get_kernel(args.kernel), get_kernel(args.reference)
    shapes = [(2, 50, 2, 16, 32), (2, 130, 2, 16, 32)] if args.quick else [(2, 1000, 4, 128, 256), (2, 4096, 4, 128, 256)]
    cases, ok = [], True
    for dtype_name in args.dtypes:
        tol = PARITY_TOL["float32_ieee" if dtype_name == "float32" and args.fp32_ieee else dtype_name]
        if args.kernel == "torch" or args.kernel == "recurrent":  # exact fp32 kernels: tight tolerances
            tol = PARITY_TOL["float32_ieee"] if dtype_name == "float32" else tol
        for B, T, H, K, V in shapes:
            tensors, starts, weights = gdn_inputs(B, T, H, K, V, seed=T, device=device, dtype=dtype_of(dtype_name))
            cand = run_kernel(candidate, tensors, starts, weights)
            ref = run_kernel(reference, tensors, starts, weights)
            truth = run_kernel(reference, tensors, starts, weights, compute_dtype=torch.float64)
            case = {"dtype": dtype_name, "B": B, "T": T, "H": H, "K": K, "V": V,
                    "doc_starts": int(starts.sum()), "initial_state": True,
                    "candidate_vs_truth": {}, "reference_vs_truth": {}, "candidate_vs_reference": {},
                    "tol_rms": {}, "tol_max": tol["max"]}
            case_ok = True
            for name, c, r, t in zip(TENSOR_NAMES, cand, ref, truth):
                case["candidate_vs_truth"][name] = errors(c, t)
                case["reference_vs_truth"][name] = errors(r, t)
                case["candidate_vs_reference"][name] = errors(c, r)
                tol_rms = tol["rms_loose"] if name in LOOSE else tol["rms"]
                case["tol_rms"][name] = tol_rms
                e = case["candidate_vs_truth"][name]
                finite = math.isfinite(e["rms"]) and math.isfinite(e["max"])
                case_ok &= finite and e["rms"] <= tol_rms and e["max"] <= tol["max"]
            case["pass"] = bool(case_ok)
            ok &= case_ok
            cases.append(case)
    return {"status": "pass" if ok else "fail", "kernel": args.kernel, "reference": args.reference, "cases": cases}


# ------------------------------------------------------------------------------- collectives
# The cp section needs nothing here: titan_cp's CP collectives (titan_cp/cp/comm.py) stage
# CUDA tensors through host memory by themselves on a gloo group (HostStagedComm). The
# measure section simulates one rank of P in a single process: a loopback group that
# torch.distributed is taught for the duration (FLA's op-level CP calls torch.distributed
# itself, so this one stays a patch).


class _DoneWork:
    """A finished Work handle."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


@dataclass(frozen=True)
class LoopbackGroup:
    """Rank ``rank`` of a ``size``-rank group, simulated in one process (no communication).

    Under :func:`loopback_collectives`, torch.distributed treats it as a group:
    get_rank / get_world_size / get_global_rank answer for it; all-gathers fill
    every rank's slot with the local tensor, received point-to-point buffers
    are zeros, all-to-all returns the input, all-reduce is the identity. Shapes,
    kernels and memory are exactly a real rank's; only the data from other
    ranks is fake (fine for timing and memory, never for correctness).
    """

    size: int
    rank: int
    group_name: str = "loopback"


class _LoopbackP2POp:
    def __init__(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):
        self.op, self.tensor, self.peer, self.group, self.tag = op, tensor, peer, group, tag


@contextlib.contextmanager
def loopback_collectives():
    """Patch torch.distributed so that :class:`LoopbackGroup` works; other groups are untouched."""
    names = ("get_rank", "get_world_size", "get_global_rank", "all_gather_into_tensor", "all_gather_single",
             "all_gather", "all_reduce", "all_to_all_single", "batch_isend_irecv", "P2POp")
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def is_loop(group):
        return isinstance(group, LoopbackGroup)

    def get_rank(group=None):
        return group.rank if is_loop(group) else saved["get_rank"](group)

    def get_world_size(group=None):
        return group.size if is_loop(group) else saved["get_world_size"](group)

    def get_global_rank(group, group_rank):
        return group_rank if is_loop(group) else saved["get_global_rank"](group, group_rank)

    def gather_like(name):
        def gather(output_tensor, input_tensor, group=None, async_op=False):
            if not is_loop(group):
                return saved[name](output_tensor, input_tensor, group=group, async_op=async_op)
            flat = input_tensor.reshape(1, -1)
            output_tensor.view(group.size, -1).copy_(flat.expand(group.size, flat.shape[1]))
            return _DoneWork() if async_op else None
        return gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if not is_loop(group):
            return saved["all_gather"](tensor_list, tensor, group=group, async_op=async_op)
        for t in tensor_list:
            t.copy_(tensor)
        return _DoneWork() if async_op else None

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not is_loop(group):
            return saved["all_reduce"](tensor, op=op, group=group, async_op=async_op)
        return _DoneWork() if async_op else None

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if not is_loop(group):
            return saved["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group=group,
                                              async_op=async_op)
        output.copy_(input.reshape(output.shape))
        return _DoneWork() if async_op else None

    def P2POp(op, tensor, peer=None, group=None, tag=0, group_peer=None):
        if is_loop(group):
            return _LoopbackP2POp(op, tensor, peer, group, tag, group_peer)
        return saved["P2POp"](op, tensor, peer, group, tag, group_peer)

    def batch_isend_irecv(p2p_op_list):
        if not p2p_op_list or not isinstance(p2p_op_list[0], _LoopbackP2POp):
            return saved["batch_isend_irecv"](p2p_op_list)
        for op in p2p_op_list:
            if getattr(op.op, "__name__", "") == "irecv":
                op.tensor.zero_()
        return [_DoneWork() for _ in p2p_op_list]

    patched = dict(get_rank=get_rank, get_world_size=get_world_size, get_global_rank=get_global_rank,
                   all_gather=all_gather, all_reduce=all_reduce, all_to_all_single=all_to_all_single,
                   batch_isend_irecv=batch_isend_irecv, P2POp=P2POp)
    patched.update({n: gather_like(n) for n in ("all_gather_into_tensor", "all_gather_single") if n in saved})
    for n, f in patched.items():
        setattr(dist, n, f)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


# ------------------------------------------------------------------------------- models


MODEL_SPECS = {
    # name: (flavor, overrides)
    "debug": ("debug", {}),
    "340M-2L": ("340M", {"n_layers": 2, "vocab_size": 4096}),  # 340M's layer shapes, 2 layers, small vocab
    "340M": ("340M", {}),
}


def build_model(spec: str, kernel: str, dtype: torch.dtype, device, seed: int = 0, **extra):
    from titan_cp.model import model_config

    flavor, overrides = MODEL_SPECS[spec]
    torch.manual_seed(seed)
    model = model_config(flavor, kernel=kernel, **overrides, **extra).build()
    model.init_weights()  # on CPU, seeded: identical in every process
    return model.to(device=device, dtype=dtype)


def cp_batch(vocab: int, B: int, T: int, seed: int):
    """Tokens, labels and positions: row 1 holds three documents (positions restart at 0)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=gen)
    positions = torch.arange(T).repeat(B, 1)
    if B > 1:
        a, b = T // 3, 2 * T // 3 + 1
        positions[1, a:] -= a
        positions[1, b:] = torch.arange(T - b)
    return tokens[:, :-1], tokens[:, 1:], positions


def loss_and_grads(model, inputs, labels, positions, total_tokens: int):
    """Backward of (sum of this shard's token losses, fp32) / total_tokens.

    Returns (that loss part as a float64 scalar tensor, fp32 gradients by name):
    summed over CP ranks both give the full sequence's mean loss and its gradients.
    """
    model.zero_grad(set_to_none=True)
    logits = model(inputs, positions)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum") / total_tokens
    loss.backward()
    return loss.detach().double(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------- section: cp


def cp_cases(args) -> list[tuple[int, str, str]]:
    if args.quick:  # both layouts and both state-passing exchanges, one launch each
        return [(P, "zigzag", "allgather") for P in args.cp_sizes] + [(2, "contiguous", "logscan")]
    cases = [(P, "contiguous", "allgather") for P in args.cp_sizes]
    return cases + [(4, "zigzag", "allgather"), (4, "contiguous", "logscan"), (2, "zigzag", "alltoall")]


def cp_models(args) -> list[str]:
    return ["debug"] if args.quick else ["debug", "340M-2L"]


def cp_seq_len(args) -> int:
    # divisible by 2 * max P (zigzag), segments not multiples of the chunk size 64
    biggest = 2 * max(max(args.cp_sizes), 2)
    return biggest * (7 if args.quick else 75)


def _cp_rank(rank, P, device, kernel, layout, exchange, jobs, T):
    """One CP rank (gloo; ranks share one GPU): loss and gradients of every job, summed on rank 0."""
    from titan_cp.cp.context import CPContext
    from titan_cp.cp.layout import shard_sequence
    from titan_cp.parallelize import apply_cp

    if torch.device(device).type == "cuda":
        torch.cuda.set_device(0)
    results = []
    for spec, dtype_name in jobs:
        model = build_model(spec, kernel, dtype_of(dtype_name), device, cp_layout=layout, cp_exchange=exchange)
        apply_cp(model, CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange))
        B = 2
        inputs, labels, positions = cp_batch(model.config.vocab_size, B, T, seed=1)
        shard = lambda t: shard_sequence(t, 1, rank, P, layout).to(device)  # noqa: E731
        loss, grads = loss_and_grads(model, shard(inputs), shard(labels), shard(positions), B * T)
        names = list(grads)
        flat = torch.cat([loss.float().view(1).to(device)] + [grads[n].flatten() for n in names]).cpu()
        dist.all_reduce(flat)  # the sum over ranks: CP gradients are partial per rank
        if rank == 0:
            out, offset = {"loss": flat[0].double().item(), "grads": {}}, 1
            for n in names:
                numel = grads[n].numel()
                out["grads"][n] = flat[offset:offset + numel].view(grads[n].shape).clone()
                offset += numel
            results.append(out)
        del model, grads, flat
    return results


def spawn_cp(P, device, kernel, layout, exchange, jobs, T, timeout) -> list[dict]:
    """Run jobs on P gloo processes (one GPU shared); returns rank 0's results per job."""
    return run_on_ranks(_cp_rank, P, (device, kernel, layout, exchange, jobs, T), timeout=timeout,
                        pg_timeout=300)[0]


def cp_match(args, device) -> dict:
    from titan_cp.kernels import get_kernel

    get_kernel(args.kernel)  # the clear error early (e.g. triton on a CPU machine)
    T, B = cp_seq_len(args), 2
    models = cp_models(args)
    references = {}
    for spec in models:
        truth_model = build_model(spec, "torch", torch.float64, device)
        inputs, labels, positions = cp_batch(truth_model.config.vocab_size, B, T, seed=1)
        batch = [t.to(device) for t in (inputs, labels, positions)]
        truth = loss_and_grads(truth_model, *batch, B * T)
        del truth_model
        for dtype_name in args.dtypes:
            model = build_model(spec, args.kernel, dtype_of(dtype_name), device)
            references[(spec, dtype_name)] = (truth, loss_and_grads(model, *batch, B * T))
            del model
    cases, ok = [], True
    for P, layout, exchange in cp_cases(args):
        jobs = [(spec, d) for spec in models for d in args.dtypes]
        results = spawn_cp(P, device, args.kernel, layout, exchange, jobs, T, args.timeout)
        for (spec, dtype_name), res in zip(jobs, results):
            (truth_loss, truth_grads), (p1_loss, p1_grads) = references[(spec, dtype_name)]
            floor = CP_FLOOR[dtype_name]
            t_loss, p_loss = truth_loss.item(), p1_loss.item()
            rows = {"loss": (abs(res["loss"] - t_loss) / abs(t_loss), abs(p_loss - t_loss) / abs(t_loss),
                             abs(res["loss"] - p_loss) / abs(p_loss))}
            for n, g in res["grads"].items():
                rows[n] = (rel_err(g, truth_grads[n].cpu()), rel_err(p1_grads[n].cpu(), truth_grads[n].cpu()),
                           rel_err(g, p1_grads[n].cpu()))
            verdict = {n: (cp_err, CP_FACTOR * p1_err + floor) for n, (cp_err, p1_err, _) in rows.items()}
            bad = {n: v for n, v in verdict.items() if not (math.isfinite(v[0]) and v[0] <= v[1])}
            worst = max(verdict, key=lambda n: verdict[n][0] / verdict[n][1])
            case = {"model": spec, "dtype": dtype_name, "P": P, "layout": layout, "exchange": exchange,
                    "T": T, "B": B, "kernel": args.kernel, "pass": not bad, "failing": sorted(bad),
                    "worst": worst, "worst_err": verdict[worst][0], "worst_allowed": verdict[worst][1],
                    "loss_vs_p1": rows["loss"][2],
                    "errors": {n: {"cp_vs_truth": a, "p1_vs_truth": b, "cp_vs_p1": c} for n, (a, b, c) in rows.items()}}
            ok &= not bad
            cases.append(case)
    return {"status": "pass" if ok else "fail", "T": T, "B": B, "cases": cases,
            "method": "P gloo processes sharing one device; collectives staged through host memory"}


# ------------------------------------------------------------------------------- section: measure


def forward_hidden(model, tokens, positions=None):
    """GDNModel.forward without lm_head (the loss below applies it in chunks, like TorchTitan's chunked loss)."""
    seq = model.sequence_info(tokens, positions)
    h = model.tok_embeddings(tokens)
    for block in model.layers.values():
        h = block(h, seq)
    return model.norm(h)


def chunked_loss(h, weight, labels, chunk: int = 8192):
    """Mean cross-entropy with logits formed chunk by chunk and recomputed in backward (never all at once)."""
    from torch.utils.checkpoint import checkpoint

    def piece(h_part, labels_part):
        return F.cross_entropy((h_part @ weight.t()).float(), labels_part, reduction="sum")

    h, labels = h.flatten(0, 1), labels.flatten()
    total = sum(checkpoint(piece, h[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
                for i in range(0, h.shape[0], chunk))
    return total / labels.numel()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure_model(args, device, spec, dtype) -> list[dict]:
    from titan_cp.cp.context import CPContext
    from titan_cp.cp.comm import comm_stats
    from titan_cp.parallelize import apply_cp

    cuda = torch.device(device).type == "cuda"
    model = build_model(spec, args.kernel, dtype, device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    sync(device)
    static_bytes = torch.cuda.memory_allocated() if cuda else None  # parameters + gradients
    rows = []
    for L in args.seq_lens:
        for P in args.measure_sizes:
            row = {"L": L, "P": P, "shard": L // P, "model": spec, "dtype": str(dtype).replace("torch.", ""),
                   "params_and_grads_gib": None if static_bytes is None else static_bytes / 2**30}
            if L % P:
                row["status"] = "skipped: L not divisible by P"
                rows.append(row)
                continue
            gen = torch.Generator().manual_seed(L + P)
            tokens = torch.randint(0, model.config.vocab_size, (1, L // P + 1), generator=gen).to(device)
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            rank = P // 2

            def step(inputs=inputs, labels=labels):
                loss = chunked_loss(forward_hidden(model, inputs), model.lm_head.weight, labels)
                loss.backward()

            try:
                with loopback_collectives():
                    cp = None if P == 1 else CPContext(group=LoopbackGroup(P, rank), layout="contiguous",
                                                       exchange=args.exchange)
                    apply_cp(model, cp)
                    comm_stats.reset()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    step()  # warm-up (autotuning, allocator) and the memory peak
                    sync(device)
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                    sent, received = comm_stats.total().bytes_sent, comm_stats.total().bytes_received
                    row["comm_bytes_sent_per_step"], row["comm_bytes_received_per_step"] = sent, received
                    row["fwd_bwd_ms"] = timed_ms(step, device, args.iters, warmup=0)
                    apply_cp(model, None)  # the same shard as an independent sequence: no CP machinery
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    row["alone_ms"] = timed_ms(step, device, args.iters, warmup=1)
                    row["alone_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                    row["cp_overhead_ms"] = row["fwd_bwd_ms"] - row["alone_ms"]
                    row["status"] = "ok"
            except Exception as error:  # noqa: BLE001
                if not _is_oom(error):
                    raise
                row["status"] = "oom"
            finally:
                apply_cp(model, None)
                _free(device)
            rows.append(row)
    # memory target: activations scale as 1/P from the smallest P that fits at each L
    for L in args.seq_lens:
        fits = [r for r in rows if r["L"] == L and r.get("status") == "ok" and r.get("peak_mem_gib") is not None]
        if not fits or static_bytes is None:
            continue
        base = min(fits, key=lambda r: r["P"])
        act = base["peak_mem_gib"] - base["params_and_grads_gib"]
        for r in fits:
            target = act * base["P"] / r["P"] + r["params_and_grads_gib"]
            r["mem_baseline_P"] = base["P"]
            r["mem_target_gib"] = 1.10 * target
            r["mem_target_met"] = r["peak_mem_gib"] <= 1.10 * target
    return rows


def titan_cp_gdn_op(kernel_name, cp):
    """Steps c-d of titan_cp.cp.state_passing.mix_state_passing (kernel + exchange + correction), no conv.

    Mirrors mixing.py: values [v | 0], initial state [0 | I], final [S_local | M],
    exchange_states, o = o_local + (q M) S_start.
    """
    from titan_cp.cp.state_passing import exchange_states
    from titan_cp.kernels import get_kernel

    kernel = get_kernel(kernel_name)

    def op(q, k, v, g, beta):
        N, T, H, V = v.shape
        K = q.shape[-1]
        v_aug = torch.cat([v, v.new_zeros(N, T, H, K)], dim=-1)
        start = torch.zeros(N, H, K, V + K, dtype=torch.float32, device=v.device)
        start[..., V:] = torch.eye(K, device=v.device)
        o_aug, final = kernel(q, k, v_aug, g, beta, initial_state=start, output_final_state=True)
        S_local, M = final[..., :V], final[..., V:]
        S_start = exchange_states(M.reshape(N, 1, H, K, K), S_local.reshape(N, 1, H, K, V), cp, "op").reshape(N, H, K, V)
        return o_aug[..., :V] + torch.einsum("nthk,nhkv->nthv", o_aug[..., V:].float(), S_start).to(v.dtype)

    return op


def fla_cp_op(P, rank, shard, device):
    """FLA's op-level CP for rank ``rank`` of P (loopback group), or None if FLA's CP cannot run here."""
    try:
        from fla.ops.cp import build_cp_context
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001
        return None
    cu = torch.tensor([0, shard * P], dtype=torch.long, device=device)
    context = build_cp_context(cu, group=LoopbackGroup(P, rank), cu_seqlens_cpu=cu.cpu())

    def op(q, k, v, g, beta):
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cp_context=context)
        return o

    return op


def fla_local_op():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001
        return None

    def op(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta)[0]

    return op


def measure_kernels(args, device, H, K, V, dtype) -> list[dict]:
    from titan_cp.cp.context import CPContext

    cuda = torch.device(device).type == "cuda"
    rows = []
    for L in args.seq_lens:
        for P in [p for p in args.measure_sizes if p > 1]:
            shard = L // P
            row = {"L": L, "P": P, "shard": shard, "H": H, "K": K, "V": V, "dtype": str(dtype).replace("torch.", "")}
            try:
                tensors, _, _ = gdn_inputs(1, shard, H, K, V, seed=0, device=device, dtype=dtype)
                q, k, v, g, beta = [t.requires_grad_() for t in tensors[:5]]
                grad_o = torch.randn(1, shard, H, V, device=device, dtype=dtype)

                def fwd_bwd(op, inputs=(q, k, v, g, beta), grad_o=grad_o):
                    def run():
                        op(*inputs).backward(grad_o)
                    return run

                with loopback_collectives():
                    per_rank_titan, per_rank_fla = [], []
                    for rank in range(P):
                        cp = CPContext(group=LoopbackGroup(P, rank), layout="contiguous", exchange=args.exchange)
                        per_rank_titan.append(timed_ms(fwd_bwd(titan_cp_gdn_op(args.kernel, cp)), device, args.iters))
                        fla = fla_cp_op(P, rank, shard, device) if cuda else None
                        if fla is not None:
                            per_rank_fla.append(timed_ms(fwd_bwd(fla), device, args.iters))
                    local = fla_local_op() if cuda else None
                row["titan_cp_ms_per_rank"] = per_rank_titan
                row["titan_cp_ms"] = max(per_rank_titan)
                row["fla_cp_ms_per_rank"] = per_rank_fla or None
                row["fla_cp_ms"] = max(per_rank_fla) if per_rank_fla else None
                row["fla_local_ms"] = timed_ms(fwd_bwd(local), device, args.iters) if local is not None else None
                row["within_5pct"] = (row["titan_cp_ms"] <= 1.05 * row["fla_cp_ms"]) if row["fla_cp_ms"] else None
                if not cuda:
                    row["note"] = "FLA's CP needs CUDA: titan_cp timed alone"
                row["status"] = "ok"
            except Exception as error:  # noqa: BLE001
                if not _is_oom(error):
                    raise
                row["status"] = "oom"
            finally:
                _free(device)
            rows.append(row)
    return rows


def measure(args, device) -> dict:
    from titan_cp.kernels import get_kernel

    get_kernel(args.kernel)
    spec = "debug" if args.quick else "340M"
    from titan_cp.model import model_config

    cfg = model_config(MODEL_SPECS[spec][0], **MODEL_SPECS[spec][1])
    K, V, H = cfg.head_dim, int(cfg.head_dim * cfg.expand_v), cfg.num_v_heads or cfg.num_heads
    dtype = torch.bfloat16
    model_rows = measure_model(args, device, spec, dtype)
    _free(device)  # the model is gone
    kernel_rows = measure_kernels(args, device, H, K, V, dtype)
    mem = [r["mem_target_met"] for r in model_rows if "mem_target_met" in r]
    speed = [r["within_5pct"] for r in kernel_rows if r.get("within_5pct") is not None]
    return {"status": "done", "model": spec, "dtype": "bfloat16", "exchange": args.exchange,
            "method": "one shard per row, rank P//2 of P simulated in one process (LoopbackGroup): "
                      "compute and memory of a real rank, communication time excluded (bytes counted)",
            "targets": {"memory_within_10pct": (all(mem) if mem else None),
                        "gdn_op_within_5pct_of_fla_cp": (all(speed) if speed else None)},
            "model_rows": model_rows, "kernel_rows": kernel_rows}


# ------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fp32_ieee:
        os.environ["TRITON_F32_DEFAULT"] = "ieee"  # before FLA's kernels compile
    device = args.device
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the torch reference kernel in true fp32
        torch.backends.cudnn.allow_tf32 = False
    report = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "device": device, "kernel": args.kernel, "argv": sys.argv[1:] if argv is None else list(argv),
                 "quick": args.quick, "versions": versions()},
        "sections": {},
    }
    runners = {"parity": kernel_parity, "cp": cp_match, "measure": measure}
    for name in args.sections:
        t0 = time.time()
        try:
            report["sections"][name] = runners[name](args, device)
        except Exception as error:  # noqa: BLE001 - recorded, the other sections still run
            report["sections"][name] = {"status": "error", "reason": f"{type(error).__name__}: {error}",
                                        "traceback": traceback.format_exc()}
        report["sections"][name]["seconds"] = round(time.time() - t0, 1)
        report["status"] = overall_status(report)
        write_report(report, args.out)  # after every section: a crash later keeps what was measured
    report["status"] = overall_status(report)
    write_report(report, args.out)
    print(summarize(report))
    print(f"report: {args.out}")
    return {"pass": 0, "fail": 1, "error": 2}[report["status"]]


if __name__ == "__main__":
    sys.exit(main())
