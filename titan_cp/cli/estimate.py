"""Per-rank memory estimate (titan_cp/analysis/memory.py) for a GDN LM under FSDP x TP x CP.

    titan_cp estimate --shape 1.3B --seq-len 65536 --dp 8 --cp 4
    titan_cp estimate --shape 340M --cp 8 --ac full --budget-gib 80   # + longest seq that fits
    titan_cp estimate --shape debug --n-layers 4 --num-heads 2 --vocab-size 2000 --seq-len 2048 --act-dtype fp32
    titan_cp estimate --shape 340M --seq-len 8192 --terms --json mem.json

``--shape`` is a named shape (340M, 1.3B, 7B-like) or any model flavor (titan_cp/models/gdn/flavors.py);
the model flags override its fields (names of ``GDNModel.Config``).
Every term and its formula is documented in titan_cp/analysis/memory.py.
``--calibrate name=factor`` scales one activation term (repeatable).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from titan_cp.analysis.memory import estimate_memory, format_bytes, max_seq_len
from titan_cp.analysis.train_setup import AC_MODES, DTYPE_BYTES, Parallelism, TrainSetup
from titan_cp.analysis.shape import SHAPE_SOURCES, Dims, named_shape, param_counts

MODEL_FIELDS = (("dim", int), ("n_layers", int), ("num_heads", int), ("head_dim", int), ("expand_v", float),
                ("num_v_heads", int), ("conv_size", int), ("hidden_dim", int), ("vocab_size", int))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (a preset, optionally overridden field by field)")
    m.add_argument("--shape", default="340M", help=f"{sorted(SHAPE_SOURCES)} or a model flavor (default 340M)")
    for name, typ in MODEL_FIELDS:
        m.add_argument(f"--{name.replace('_', '-')}", type=typ)
    m.add_argument("--tie-embeddings", action="store_true", help="tie embedding and lm_head")
    t = p.add_argument_group("training")
    t.add_argument("--seq-len", type=int, default=8192)
    t.add_argument("--batch", type=int, default=1, help="local batch (rows) per DP rank")
    t.add_argument("--dp", type=int, default=1, help="FSDP shard degree")
    t.add_argument("--tp", type=int, default=1)
    t.add_argument("--cp", type=int, default=1)
    t.add_argument("--no-sequence-parallel", action="store_true")
    t.add_argument("--param-dtype", default="fp32", choices=sorted(DTYPE_BYTES))
    t.add_argument("--act-dtype", default="bf16", choices=sorted(DTYPE_BYTES))
    t.add_argument("--master-weights", action="store_true")
    t.add_argument("--ac", default="none", choices=AC_MODES)
    t.add_argument("--loss-chunks", type=int, default=8, help="TorchTitan chunked loss chunks (1 = full logits)")
    t.add_argument("--kernel-saves-states", action="store_true", help="the kernel keeps its chunk states for backward")
    t.add_argument("--kernel-saved-per-head-token", type=float, default=64.0)
    t.add_argument("--kernel-workspace-states", type=float, default=2.0)
    t.add_argument("--no-cp-extra", action="store_true", help="no state-passing CP terms (transition state columns, q M) under CP")
    c = p.add_argument_group("calibration / output")
    c.add_argument("--calibrate", action="append", default=[], metavar="TERM=FACTOR")
    c.add_argument("--activation-scale", type=float, default=1.0)
    c.add_argument("--budget-gib", type=float, help="also print the longest seq_len that fits this budget")
    c.add_argument("--terms", action="store_true", help="print one layer's activation terms")
    c.add_argument("--json", type=Path)
    return p


def shape_from_args(a):
    """(name, ``GDNModel.Config``) of ``--shape`` with the model-field flags applied."""
    over = {k: getattr(a, k) for k, _ in MODEL_FIELDS if getattr(a, k) is not None}
    if a.tie_embeddings:
        over["tie_embeddings"] = True
    try:
        model = named_shape(a.shape, **over)
    except ValueError as e:
        raise SystemExit(f"--shape: {e}") from None
    return (f"custom (from {a.shape})" if over else a.shape), model


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    name, model = shape_from_args(a)
    shape = Dims.of(model, allow_attention=True)  # hybrids: attention blocks are estimated too
    par = Parallelism(a.dp, a.tp, a.cp, not a.no_sequence_parallel)
    setup = TrainSetup(
        seq_len=a.seq_len, batch=a.batch, param_dtype=a.param_dtype, act_dtype=a.act_dtype,
        master_weights=a.master_weights, ac=a.ac, loss_chunks=a.loss_chunks,
        kernel_saves_states=a.kernel_saves_states, kernel_saved_per_head_token=a.kernel_saved_per_head_token,
        kernel_workspace_states=a.kernel_workspace_states, cp_extra=not a.no_cp_extra,
    )
    cal = {}
    for item in a.calibrate:
        k, _, v = item.partition("=")
        cal[k] = float(v)
    est = estimate_memory(model, setup, par, cal, a.activation_scale)
    counts = param_counts(model)
    print(f"{name}: dim {shape.dim}, {shape.n_layers} layers, {shape.H} heads x K {shape.K}, "
          f"V {shape.V}, MLP {shape.hidden}, vocab {shape.vocab}; {counts['total'] / 1e6:.1f}M parameters")
    print(f"seq_len {setup.seq_len} x batch {setup.batch}, dp {par.dp} tp {par.tp} cp {par.cp}, "
          f"params {setup.param_dtype}, activations {setup.act_dtype}, AC {setup.ac}: "
          f"{est.tokens_per_rank} tokens per rank")
    rows = [("params", est.params), ("grads", est.grads), ("optimizer", est.optimizer),
            ("fsdp buffers", est.fsdp_buffers), ("activations (layers)", est.activations),
            ("activations (model)", est.model_activations), ("loss phase", est.loss_phase),
            ("backward phase", est.backward_phase), ("transient = max(loss, backward)", est.transient),
            ("TOTAL (peak)", est.total)]
    for name, v in rows:
        print(f"  {name:32s} {format_bytes(v):>12s}")
    print(f"  one layer, no AC: {format_bytes(est.layer_activation_bytes)} "
          f"({est.layer_activation_bytes / est.tokens_per_rank:,.0f} bytes per token)")
    if a.terms:
        for name, v in est.layer_terms.items():
            print(f"    {name:18s} {format_bytes(v):>12s}  {v / est.tokens_per_rank:10,.1f} B/token")
    out = {"name": name, "shape": asdict(shape), "parallelism": asdict(par), "setup": asdict(setup), "calibration": cal,
           "param_counts": counts, "estimate": est.as_dict()}
    if a.budget_gib:
        budget = a.budget_gib * 2**30
        best = max_seq_len(budget, model, setup, par, cal, a.activation_scale)
        out["max_seq_len"] = best
        out["budget_bytes"] = budget
        print(f"longest seq_len within {a.budget_gib:g} GiB: {best:,}" + (" (none fits)" if best == 0 else ""))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
