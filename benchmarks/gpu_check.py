#!/usr/bin/env python
"""Everything a GPU session must check about titan_cp's Triton path, in one run.

    pip install -e '.[gpu]'                      # FLA 0.6.0 + triton
    python -m benchmarks.gpu_check --out gpu_report.json
    python -m benchmarks.gpu_check --out quick.json --quick          # minutes: small shapes only

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
``measure``  (benchmarks/gpu_measure.py) the 340M flavor in bf16, one shard simulated in one process
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
--quick``) exercise everything except FLA; tests/unit/test_gpu_check.py does that.
The parity and cp sections are also pytest tests (``pytest -m gpu tests/unit/test_gpu.py``).
Shared helpers: benchmarks/gpu_common.py.
"""

from __future__ import annotations

import dataclasses
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
from typing import Literal

import torch
import torch.distributed as dist
import tyro

from benchmarks.gpu_common import build_model, cp_batch, dtype_of, errors, gdn_inputs, loss_and_grads, run_kernel
from benchmarks.gpu_measure import measure
from titan_cp.testing import rel_err, run_on_ranks

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

# ------------------------------------------------------------------------------- arguments, report


@dataclass
class Args:
    out: Path = Path("gpu_check_report.json")
    """JSON report path"""
    sections: tuple[Literal[SECTIONS], ...] = SECTIONS
    """which sections run, in this order"""
    kernel: str = "triton"
    """kernel under test (model.kernel): triton | torch | recurrent"""
    reference: str = "torch"
    """reference kernel for the parity section"""
    device: Literal["cuda", "cpu"] = "cuda" if torch.cuda.is_available() else "cpu"
    """default: cuda where torch sees a GPU"""
    quick: bool = False
    """small shapes everywhere (minutes; CPU tests use it)"""
    dtypes: tuple[Literal["float32", "bfloat16"], ...] = ("float32", "bfloat16")
    """dtypes for parity and cp"""
    cp_sizes: tuple[int, ...] | None = None
    """P values for the cp section (default 2 4 8; quick: 2)"""
    seq_lens: tuple[int, ...] | None = None
    """L values for measure (default 16384 65536 262144; quick: 256)"""
    measure_sizes: tuple[int, ...] | None = None
    """P values for measure (default 1 2 4 8; quick: 1 2)"""
    exchange: str = "allgather"
    """parallelism.cp_exchange for measure"""
    iters: int = 5
    """timed iterations (median reported; quick: at most 2)"""
    fp32_ieee: bool = False
    """TRITON_F32_DEFAULT=ieee (full fp32 dots in FLA) and the tight fp32 tolerances"""
    timeout: float = 1800.0
    """seconds per multi-process cp launch"""


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line with the shape lists filled in (the quick ones under ``--quick``)."""
    a = tyro.cli(Args, args=argv, prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    quick = a.quick
    return dataclasses.replace(
        a, cp_sizes=a.cp_sizes or ((2,) if quick else (2, 4, 8)),
        seq_lens=a.seq_lens or ((256,) if quick else (16384, 65536, 262144)),
        measure_sizes=a.measure_sizes or ((1, 2) if quick else (1, 2, 4, 8)),
        iters=min(a.iters, 2) if quick else a.iters)


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

# ------------------------------------------------------------------------------- section: parity

def kernel_parity(args, device) -> dict:
    from titan_cp.ops.gated_delta_rule import get_kernel

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
    from titan_cp.cp.layout import rank_segments
    from titan_cp.models.common.parallelize import apply_cp

    if torch.device(device).type == "cuda":
        torch.cuda.set_device(0)
    results = []
    for spec, dtype_name in jobs:
        model = build_model(spec, kernel, dtype_of(dtype_name), device, cp_layout=layout, cp_exchange=exchange)
        apply_cp(model, CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange))
        B = 2
        inputs, labels, positions = cp_batch(model.config.vocab_size, B, T, seed=1)
        shard = lambda t: rank_segments(t, 1, rank, P, layout).to(device)  # noqa: E731
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
    from titan_cp.ops.gated_delta_rule import get_kernel

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
