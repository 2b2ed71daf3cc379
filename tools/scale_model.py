#!/usr/bin/env python
"""Print the analytic CP scale model (titan_cp/analysis/scale_model.py) for GDN shapes.

For P = 2 .. 1024 CP ranks (powers of two), at a fixed number of tokens per
rank and at a fixed global sequence length, it prints each exchange strategy's
per-layer fwd + bwd time (allgather, logscan, alltoall; ring attention as a
reference) next to the block's compute, and the first P where each strategy's
exchange exceeds ``--hide-fraction`` of compute. The formulas (bytes, rounds,
link model, GDN chunk FLOPs) are in the module docstring of
titan_cp.analysis.scale_model.

    python -m tools.scale_model                       # plain-text tables
    python -m tools.scale_model --markdown > docs/scale_model.md
    python -m tools.scale_model --json scale.json --gpus-per-node 1 --inter-bw 25
    python -m tools.scale_model --shape 340M --shape 1.3B:dim=2048,n_layers=24,num_heads=8,head_dim=128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from titan_cp.analysis.scale_model import (
    Compute,
    Network,
    Workload,
    powers_of_two,
    run_model,
)
from titan_cp.analysis.scale_report import jsonable, markdown
from titan_cp.analysis.shape import SHAPE_SOURCES, named_shape, parse_shape


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help=f"{sorted(SHAPE_SOURCES)} or a model flavor, optionally with model-field overrides name:field=value,...; repeatable (default: {sorted(SHAPE_SOURCES)})")
    p.add_argument("--tokens-per-rank", type=int, default=8192, help="tokens per rank in the fixed-per-rank sweep (default 8192)")
    p.add_argument("--global-len", type=int, default=1 << 20, help="global sequence length in the fixed-L sweep (default 1M)")
    p.add_argument("--min-p", type=int, default=2)
    p.add_argument("--max-p", type=int, default=1024)
    p.add_argument("--hide-fraction", type=float, default=0.10, help="exchange / compute above which a strategy 'stops hiding' (default 0.10)")
    n = p.add_argument_group("network")
    n.add_argument("--inter-bw", type=float, default=50.0, help="inter-node GB/s per GPU (default 50)")
    n.add_argument("--inter-latency", type=float, default=5.0, help="inter-node latency per step, us (default 5)")
    n.add_argument("--intra-bw", type=float, default=300.0, help="intra-node GB/s per GPU (default 300)")
    n.add_argument("--intra-latency", type=float, default=2.0, help="intra-node latency per step, us (default 2)")
    n.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node; 1 = every hop inter-node (default 8)")
    n.add_argument("--allgather-algo", choices=("ring", "tree"), default="ring")
    c = p.add_argument_group("compute")
    c.add_argument("--matmul-tflops", type=float, default=400.0, help="achieved dense matmul TFLOP/s (default 400)")
    c.add_argument("--kernel-tflops", type=float, default=85.0, help="achieved GDN chunk-kernel TFLOP/s (default 85, from FLA PR #691)")
    c.add_argument("--fold-tflops", type=float, default=100.0, help="TFLOP/s of the fold / scan combine matmuls (default 100)")
    c.add_argument("--bwd-factor", type=float, default=2.0)
    c.add_argument("--kernel-bwd-factor", type=float, default=2.5)
    c.add_argument("--chunk-size", type=int, default=64)
    w = p.add_argument_group("workload")
    w.add_argument("--batch", type=int, default=1, help="rows per rank (default 1)")
    w.add_argument("--tp", type=int, default=1)
    w.add_argument("--state-bytes", type=int, default=4)
    w.add_argument("--act-bytes", type=int, default=2)
    w.add_argument("--ref-kv-dim", type=int, default=None, help="ring-attention reference kv width (default: dim, i.e. MHA)")
    o = p.add_argument_group("output")
    o.add_argument("--markdown", action="store_true", help="print markdown tables (default: the same tables, plain)")
    o.add_argument("--json", type=Path, help="also write the full result as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    shapes = [parse_shape(s) for s in a.shape] if a.shape else [(n, named_shape(n)) for n in SHAPE_SOURCES]
    net = Network(a.inter_bw * 1e9, a.inter_latency * 1e-6, a.intra_bw * 1e9, a.intra_latency * 1e-6,
                  a.gpus_per_node, a.allgather_algo)
    comp = Compute(a.matmul_tflops, a.kernel_tflops, a.fold_tflops, a.bwd_factor, a.kernel_bwd_factor, a.chunk_size)
    wl = Workload(a.batch, a.tp, a.state_bytes, a.act_bytes, a.ref_kv_dim)
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
