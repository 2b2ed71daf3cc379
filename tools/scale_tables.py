#!/usr/bin/env python
"""Print the analytic CP scale model (titan_cp/analysis/scale_model.py) for GDN shapes.

For P = 2 .. 1024 CP ranks (powers of two), at a fixed number of tokens per
rank and at a fixed global sequence length, it prints each exchange strategy's
per-layer fwd + bwd time (allgather, logscan, alltoall; ring attention as a
reference) next to the block's compute, and the first P where each strategy's
exchange exceeds ``--hide-fraction`` of compute. The formulas (bytes, rounds,
link model, GDN chunk FLOPs) are in the module docstring of
titan_cp.analysis.scale_model.

    python -m tools.scale_tables                       # plain-text tables
    python -m tools.scale_tables --markdown > docs/scale_model.md
    python -m tools.scale_tables --json scale.json --gpus-per-node 1 --inter-bw 25
    python -m tools.scale_tables --shape 340M --shape 1.3B:dim=2048,n_layers=24,num_heads=8,head_dim=128
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from titan_cp.analysis.scale_model import (
    Compute,
    Network,
    Workload,
    powers_of_two,
    run_model,
)
from titan_cp.analysis.scale_report import jsonable, markdown
from titan_cp.analysis.shape import SHAPE_SOURCES, named_shape, parse_shape


@dataclass
class NetworkArgs:
    inter_bw: float = 50.0
    """inter-node GB/s per GPU"""
    inter_latency: float = 5.0
    """inter-node latency per step, us"""
    intra_bw: float = 300.0
    """intra-node GB/s per GPU"""
    intra_latency: float = 2.0
    """intra-node latency per step, us"""
    gpus_per_node: int = 8
    """ranks per node; 1 = every hop inter-node"""
    allgather_algo: Literal["ring", "tree"] = "ring"


@dataclass
class ComputeArgs:
    matmul_tflops: float = 400.0
    """achieved dense matmul TFLOP/s"""
    kernel_tflops: float = 85.0
    """achieved GDN chunk-kernel TFLOP/s (from FLA PR #691)"""
    fold_tflops: float = 100.0
    """TFLOP/s of the fold / scan combine matmuls"""
    bwd_factor: float = 2.0
    kernel_bwd_factor: float = 2.5
    chunk_size: int = 64


@dataclass
class WorkloadArgs:
    batch: int = 1
    """rows per rank"""
    tp: int = 1
    state_bytes: int = 4
    act_bytes: int = 2
    ref_kv_dim: int | None = None
    """ring-attention reference kv width (default: dim, i.e. MHA)"""


@dataclass
class Args:
    shape: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """a shape of titan_cp.analysis.shape.SHAPE_SOURCES or a model flavor, optionally with model-field
    overrides name:field=value,...; repeatable (default: every SHAPE_SOURCES shape)"""
    tokens_per_rank: int = 8192
    """tokens per rank in the fixed-per-rank sweep"""
    global_len: int = 1 << 20
    """global sequence length in the fixed-L sweep"""
    min_p: int = 2
    max_p: int = 1024
    hide_fraction: float = 0.10
    """exchange / compute above which a strategy 'stops hiding'"""
    network: Annotated[NetworkArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=NetworkArgs)
    compute: Annotated[ComputeArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=ComputeArgs)
    workload: Annotated[WorkloadArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=WorkloadArgs)
    markdown: bool = False
    """print markdown tables (default: the same tables, plain)"""
    json: Path | None = None
    """also write the full result as JSON here"""


def main(argv: list[str] | None = None) -> int:
    a = tyro.cli(Args, args=argv, prog="python -m tools.scale_tables", description=__doc__.split("\n\n")[0])
    shapes = [parse_shape(s) for s in a.shape] if a.shape else [(n, named_shape(n)) for n in SHAPE_SOURCES]
    n, c, w = a.network, a.compute, a.workload
    net = Network(n.inter_bw * 1e9, n.inter_latency * 1e-6, n.intra_bw * 1e9, n.intra_latency * 1e-6,
                  n.gpus_per_node, n.allgather_algo)
    comp = Compute(c.matmul_tflops, c.kernel_tflops, c.fold_tflops, c.bwd_factor, c.kernel_bwd_factor, c.chunk_size)
    wl = Workload(w.batch, w.tp, w.state_bytes, w.act_bytes, w.ref_kv_dim)
    result = run_model(shapes, powers_of_two(a.min_p, a.max_p), a.tokens_per_rank, a.global_len, a.hide_fraction, net, comp, wl)
    text = markdown(result)
    if not a.markdown:  # plain: drop the markdown decorations, keep the columns
        text = "\n".join(line for line in text.splitlines() if not line.startswith("|---")).replace("**", "").replace("### ", "")
    print(text)
    if a.json:
        a.json.write_text(json.dumps(jsonable(result), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
