#!/usr/bin/env python
"""Check that a model under context parallelism reproduces one rank.

Step 1, one process: run the full sequence and save the reference (inputs,
weights, logits, loss and every gradient):

    python -m benchmarks.cp_parity --mode single --save_ref ref.pt [--flavor debug --seq_len 1024 --packed]

Step 2, P ranks: run the same model and batch under CP (each rank its shard),
gather logits, all-reduce loss and gradients, and compare with the reference:

    torchrun --standalone --nproc_per_node=P -m benchmarks.cp_parity --mode cp --cp_size P --ref ref.pt \\
        [--exchange allgather|logscan|alltoall] [--layout contiguous|zigzag] [--kernel torch|recurrent|triton]

For every tensor it prints the max absolute error and the relative error
max|cp - ref| / max|ref|, and fails (exit code 1, a FAIL line naming the
tensors) if any exceeds ``--atol + --rtol * max|ref|`` or is not finite.
Default rtol: 1e-5 for float32, 1e-10 for float64, 2e-2 for bfloat16.
The reference fixes the model shape, weights, inputs and dtype; the CP run may
change the kernel, exchange and layout (that is what it checks). Runs on CPU
(gloo) and unchanged on GPUs (NCCL, one GPU per rank); ``--device`` overrides.

``--packed`` packs documents into the rows (positions restart at 0 at each
document start), with starts at, one before and one after the segment
boundaries of CP 2, 4 and 8 (both layouts) plus a few random ones, and
documents shorter than the conv kernel.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
DEFAULT_RTOL = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 2e-2}
REF_FORMAT = 1


def packed_positions(B: int, L: int, seed: int) -> torch.Tensor:
    """Positions [B, L] restarting at 0 at document starts near every CP segment boundary (P, 2P for P = 2, 4, 8)."""
    g = torch.Generator().manual_seed(seed + 1000)
    positions = torch.arange(L).repeat(B, 1)
    for b in range(B):
        starts = {0}
        if b % 2 == 0:  # even rows: boundary cases; odd rows: random documents (row 1 of B = 2)
            for n in (2, 4, 8, 16):
                if L % n == 0:
                    starts |= {L // n * i + d for i in range(1, n) for d in (-1, 0, 1)}
            starts |= {2, 3}  # documents shorter than the conv kernel
        starts |= set(torch.randint(1, L, (3,), generator=g).tolist())
        starts = sorted(s for s in starts if 0 <= s < L)
        for s, e in zip(starts, starts[1:] + [L]):
            positions[b, s:e] = torch.arange(e - s)
    return positions


def build(meta: dict, kernel: str, exchange: str = "allgather", layout: str = "contiguous"):
    from titan_cp.models.gdn import model_config

    cfg = model_config(meta["flavor"], kernel=kernel, cp_exchange=exchange, cp_layout=layout, **meta["overrides"])
    torch.manual_seed(meta["seed"])
    model = cfg.build()
    model.init_weights()
    return model.to(DTYPES[meta["dtype"]])


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# --------------------------------------------------------------------------- single


def run_single(a) -> int:
    overrides = a.model.given()
    meta = {"format": REF_FORMAT, "flavor": a.flavor, "overrides": overrides, "seq_len": a.seq_len, "batch": a.batch,
            "seed": a.seed, "packed": a.packed, "dtype": a.dtype, "kernel": a.kernel}
    device = torch.device(a.device) if a.device else default_device()
    model = build(meta, a.kernel).to(device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(a.seed + 1)
    tokens = torch.randint(0, vocab, (a.batch, a.seq_len + 1), generator=g)
    positions = packed_positions(a.batch, a.seq_len, a.seed) if a.packed else None
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    logits = model(inputs.to(device), None if positions is None else positions.to(device))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten())
    loss.backward()
    ref = {
        "meta": meta,
        "inputs": inputs, "labels": labels, "positions": positions, "weights": weights,
        "logits": logits.detach().cpu(), "loss": loss.detach().cpu(),
        "grads": {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()},
    }
    torch.save(ref, a.save_ref)
    nparams = sum(w.numel() for w in weights.values())
    print(f"saved reference {a.save_ref}: flavor {a.flavor} {overrides}, {nparams:,} parameters, "
          f"batch {a.batch} x seq_len {a.seq_len}, {'packed documents, ' if a.packed else ''}{a.dtype}, "
          f"kernel {a.kernel}, loss {loss.item():.6f}")
    return 0


# --------------------------------------------------------------------------- cp


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> dict:
    got, ref = got.double(), ref.double()
    if got.shape != ref.shape:
        return {"name": name, "ok": False, "abs": float("inf"), "rel": float("inf"),
                "note": f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"}
    finite = bool(torch.isfinite(got).all())
    diff = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    ok = finite and diff <= atol + rtol * scale
    return {"name": name, "ok": ok, "abs": diff, "rel": rel, "note": "" if finite else "non-finite values"}


def run_cp(a) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if a.cp_size != world:
        print(f"benchmarks.cp_parity: --cp_size {a.cp_size} but WORLD_SIZE is {world}; launch with "
              f"torchrun --nproc_per_node={a.cp_size}", file=sys.stderr)
        return 2
    device = torch.device(a.device) if a.device else default_device()
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    try:
        return _run_cp(a, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run_cp(a, rank: int, P: int, device: torch.device) -> int:
    from titan_cp.cp.context import CPContext
    from titan_cp.cp.layout import check_divisible, rank_segments, unshard_sequence
    from titan_cp.models.common.parallelize import apply_cp

    ref = torch.load(a.ref, map_location="cpu", weights_only=False)
    meta = ref["meta"]
    if meta.get("format") != REF_FORMAT:
        raise SystemExit(f"benchmarks.cp_parity: {a.ref} is not a reference of format {REF_FORMAT} (made by --mode single)")
    kernel = a.kernel or meta["kernel"]
    rtol = a.rtol if a.rtol is not None else DEFAULT_RTOL[meta["dtype"]]
    L, B = meta["seq_len"], meta["batch"]
    if P > 1:
        check_divisible(L, P, a.layout)
    model = build(meta, kernel, a.exchange, a.layout)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(ref["weights"][n])
    model.to(device)
    apply_cp(model, CPContext(group=dist.group.WORLD, layout=a.layout, exchange=a.exchange) if P > 1 else None)

    def shard(t):
        if t is None:
            return None
        return (rank_segments(t, 1, rank, P, a.layout) if P > 1 else t).contiguous().to(device)

    inputs, labels, positions = shard(ref["inputs"]), shard(ref["labels"]), shard(ref["positions"])
    logits = model(inputs, positions)
    loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
    (loss_sum / (B * L)).backward()
    loss = loss_sum.detach() / (B * L)
    grads = {n: p.grad.detach() for n, p in model.named_parameters()}
    full_logits = logits.detach()
    if P > 1:
        dist.all_reduce(loss)
        for g in grads.values():
            dist.all_reduce(g)
        full_logits = unshard_sequence(full_logits.contiguous(), 1, dist.group.WORLD, a.layout)

    rows = [compare("logits", full_logits.cpu(), ref["logits"], rtol, a.atol),
            compare("loss", loss.cpu(), ref["loss"], rtol, a.atol)]
    rows += [compare(f"grad {n}", grads[n].cpu(), ref["grads"][n], rtol, a.atol) for n in ref["grads"]]
    missing = set(grads) - set(ref["grads"])
    failed = [r for r in rows if not r["ok"]]
    if rank == 0:
        print(f"benchmarks.cp_parity: CP {P} ({a.exchange}, {a.layout}), kernel {kernel} vs reference {a.ref} "
              f"(flavor {meta['flavor']}, seq_len {L}, batch {B}, {'packed, ' if meta['packed'] else ''}"
              f"{meta['dtype']}, reference kernel {meta['kernel']}); tolerance atol {a.atol:g} + rtol {rtol:g} x max|ref|")
        width = max(len(r["name"]) for r in rows)
        print(f"  {'tensor':{width}s}  {'max abs err':>12s}  {'rel err':>10s}")
        for r in rows:
            flag = "" if r["ok"] else "   <-- FAIL" + (f" ({r['note']})" if r["note"] else "")
            print(f"  {r['name']:{width}s}  {r['abs']:12.3e}  {r['rel']:10.3e}{flag}")
        worst = max(rows, key=lambda r: r["rel"])
        if missing:
            print(f"FAIL: parameters missing from the reference: {sorted(missing)}")
        if failed:
            print(f"FAIL: {len(failed)} of {len(rows)} tensors beyond atol {a.atol:g} + rtol {rtol:g} x max|ref|: "
                  + ", ".join(f"{r['name']} (rel {r['rel']:.2e})" for r in failed[:10])
                  + (" ..." if len(failed) > 10 else ""))
        elif not missing:
            print(f"PASS: {len(rows)} tensors within rtol {rtol:g}; worst {worst['name']} rel {worst['rel']:.2e}, "
                  f"max abs {max(r['abs'] for r in rows):.2e}")
    return 1 if failed or missing else 0


# --------------------------------------------------------------------------- main


@dataclass
class ModelOverrides:
    """Model fields over the flavor's (single mode; cp mode takes them from the reference)."""

    dim: int | None = None
    n_layers: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    num_v_heads: int | None = None
    hidden_dim: int | None = None
    vocab_size: int | None = None
    conv_size: int | None = None
    expand_v: float | None = None
    layer_pattern: str | None = None
    """hybrid layers, e.g. GGGA (A = softmax attention, ring attention under CP)"""

    def given(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Args:
    mode: Literal["single", "cp"]
    save_ref: Path | None = None
    """single: where to write the reference"""
    ref: Path | None = None
    """cp: the reference written by --mode single"""
    cp_size: int = 1
    """cp: number of ranks (= torchrun --nproc_per_node)"""
    flavor: str = "debug"
    """the model flavor (single mode)"""
    model: Annotated[ModelOverrides, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=ModelOverrides)
    seq_len: int = 1024
    batch: int = 2
    seed: int = 0
    packed: bool = False
    """packed documents (positions restart at document starts)"""
    dtype: Literal["bfloat16", "float32", "float64"] = "float32"
    kernel: str | None = None
    """torch | recurrent | triton (single: default torch; cp: the reference's)"""
    exchange: str = "allgather"
    """allgather | logscan | alltoall"""
    layout: str = "contiguous"
    """contiguous | zigzag"""
    rtol: float | None = None
    """default by dtype: float32 1e-5, float64 1e-10, bfloat16 2e-2"""
    atol: float = 0.0
    device: str | None = None
    """default: cuda:LOCAL_RANK if CUDA is available, else cpu"""


def main(argv: list[str] | None = None) -> int:
    a = tyro.cli(Args, args=argv, prog="python -m benchmarks.cp_parity", description=__doc__, use_underscores=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))))
    if a.mode == "single":
        if a.save_ref is None:
            raise SystemExit("benchmarks.cp_parity: --mode single needs --save_ref PATH")
        a.kernel = a.kernel or "torch"
        return run_single(a)
    if a.ref is None:
        raise SystemExit("benchmarks.cp_parity: --mode cp needs --ref PATH (written by --mode single)")
    return run_cp(a)


if __name__ == "__main__":
    raise SystemExit(main())
