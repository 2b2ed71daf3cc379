"""Per-rank memory estimate (titan_cp/analysis/memory.py) for a GDN LM or a Qwen3.5 model under FSDP x TP x EP x PP x CP.

    titan_cp estimate --shape 1.3B --seq-len 65536 --dp 8 --cp 4
    titan_cp estimate --shape 340M --cp 8 --ac full --budget-gib 80   # + longest seq that fits
    titan_cp estimate --shape 340M --seq-len 65536 --cp 4 --cp-q-transition keep   # q M kept: faster, more memory
    titan_cp estimate --shape debug --n-layers 4 --num-heads 2 --vocab-size 2000 --seq-len 2048 --act-dtype fp32
    titan_cp estimate --shape 340M --seq-len 8192 --terms --json mem.json
    titan_cp estimate --family qwen3_5 --shape 35B-A3B --seq-len 131072 --cp 8 --ep 8 --ac full --budget-gib 70

``--family gdn``: ``--shape`` is a named shape (340M, 1.3B, 7B-like) or a model flavor
(titan_cp/models/gdn/flavors.py), the model flags override its fields (names of
``GDNModel.Config``). ``--family qwen3_5``: ``--shape`` is a TorchTitan Qwen3.5 flavor
(0.8B ... 27B, 35B-A3B, 122B-A10B, 397B-A17B, debugmodel, debugmodel_moe), estimated by
titan_cp/analysis/qwen3_5_memory.py with FLA's kernel and zigzag CP (the GPU configs').
Every term and its formula is documented in those files.
``--calibrate name=factor`` scales one activation term.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import tyro

from titan_cp.analysis.memory import estimate_memory, format_bytes, max_seq_len
from titan_cp.analysis.train_setup import Parallelism, TrainSetup
from titan_cp.analysis.shape import Dims, named_shape, param_counts

MODEL_FIELDS = ("dim", "n_layers", "num_heads", "head_dim", "expand_v", "num_v_heads", "conv_size", "hidden_dim",
                "vocab_size")
Dtype = Literal["fp32", "bf16", "fp16"]


@dataclass
class Args:
    family: Literal["gdn", "qwen3_5"] = "gdn"
    shape: str = "340M"  # gdn: a named shape or flavor; qwen3_5: a TorchTitan flavor
    # gdn model fields (override --shape's)
    dim: int | None = None
    n_layers: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    expand_v: float | None = None
    num_v_heads: int | None = None
    conv_size: int | None = None
    hidden_dim: int | None = None
    vocab_size: int | None = None
    tie_embeddings: bool = False
    # training
    seq_len: int = 8192
    batch: int = 1  # local batch (rows) per DP rank (with --pp: that many microbatches of one row)
    dp: int = 1  # FSDP shard degree
    tp: int = 1
    cp: int = 1
    ep: int = 1  # expert parallel (Qwen3.5 MoE)
    pp: int = 1  # pipeline stages (Qwen3.5)
    sequence_parallel: bool = True
    param_dtype: Dtype = "fp32"
    act_dtype: Dtype = "bf16"
    master_weights: bool = False
    ac: Literal["none", "full"] = "none"
    loss_chunks: int = 8  # TorchTitan chunked loss chunks (1 = full logits)
    kernel_saves_states: bool = False  # gdn: the kernel keeps its chunk states for backward
    kernel_saved_per_head_token: float = 64.0
    kernel_workspace_states: float = 2.0
    cp_extra: bool = True  # state-passing CP terms (q M, the exchange's buffers) under CP
    cp_q_transition: Literal["recompute", "keep"] = "recompute"  # parallelism.cp_q_transition (needs --cp > 1)
    attention_score_tensors: float = 4.6  # fp32 [Hq, T_b, T_b] tensors of titan_cp's block attention backward
    # calibration / output
    calibrate: tuple[str, ...] = ()  # TERM=FACTOR
    activation_scale: float = 1.0
    budget_gib: float | None = None  # also print the longest seq_len that fits this budget
    terms: bool = False  # print one layer's activation terms
    json: Path | None = None


def model_from_args(a: Args):
    """(name, model config) of ``--shape`` (gdn: with the model-field flags applied)."""
    over = {k: getattr(a, k) for k in MODEL_FIELDS if getattr(a, k) is not None}
    if a.family == "qwen3_5":
        if over or a.tie_embeddings:
            raise SystemExit(f"--{next(iter(over), 'tie-embeddings').replace('_', '-')}: GDN model fields do not "
                             "apply to --family qwen3_5 (its shape is the flavor's)")
        from titan_cp.errors import ConfigError
        from titan_cp.models.qwen3_5.flavors import torchtitan_config
        from titan_cp.models.qwen3_5.model import titan_cp_config

        try:
            config = torchtitan_config(a.shape)
        except ConfigError as e:
            raise SystemExit(f"--shape: {e}") from None
        return f"Qwen3.5 {a.shape}", titan_cp_config(config, kernel="triton", cp_layout="zigzag")
    if a.tie_embeddings:
        over["tie_embeddings"] = True
    try:
        model = named_shape(a.shape, **over)
    except ValueError as e:
        raise SystemExit(f"--shape: {e}") from None
    return (f"custom (from {a.shape})" if over else a.shape), model


def describe(a: Args, model) -> tuple[str, dict, dict]:
    """One line on the model, its shape (JSON) and parameter counts."""
    if a.family == "qwen3_5":
        from titan_cp.analysis.qwen3_5_memory import QwenDims, param_counts as qwen_counts

        q = QwenDims.of(model)
        s, counts = q.text, qwen_counts(q)
        moe = f", MoE {q.moe.experts} experts top-{q.moe.top_k} x {q.moe.expert_hidden}" if q.moe else ""
        return (f"dim {s.dim}, {q.n_gdn} GDN + {q.n_attn} attention layers, vocab {s.vocab_size}{moe}; "
                f"{counts['total'] / 1e9:.2f}B parameters", asdict(s), counts)
    shape, counts = Dims.of(model, allow_attention=True), param_counts(model)
    return (f"dim {shape.dim}, {shape.n_layers} layers, {shape.H} heads x K {shape.K}, V {shape.V}, "
            f"MLP {shape.hidden}, vocab {shape.vocab}; {counts['total'] / 1e6:.1f}M parameters", asdict(shape), counts)


def main(argv: list[str] | None = None) -> int:
    a = tyro.cli(Args, args=argv, prog="titan_cp estimate", description=__doc__.split("\n\n")[0])
    if a.cp_q_transition != "recompute" and a.cp <= 1:
        raise SystemExit(f"--cp-q-transition {a.cp_q_transition}: q M exists only under CP; "
                         "set --cp > 1 or drop the flag")
    name, model = model_from_args(a)
    text, shape, counts = describe(a, model)
    par = Parallelism(dp=a.dp, tp=a.tp, cp=a.cp, sequence_parallel=a.sequence_parallel, ep=a.ep, pp=a.pp)
    setup_fields = {f.name for f in fields(TrainSetup)}
    setup = TrainSetup(**{k: v for k, v in asdict(a).items() if k in setup_fields},
                       microbatches=a.batch if a.pp > 1 else 1,
                       cp_layout="zigzag" if a.family == "qwen3_5" else "contiguous")
    cal = {}
    for item in a.calibrate:
        k, _, v = item.partition("=")
        cal[k] = float(v)
    est = estimate_memory(model, setup, par, cal, a.activation_scale)
    print(f"{name}: {text}")
    print(f"seq_len {setup.seq_len} x batch {setup.batch}, dp {par.dp} tp {par.tp} cp {par.cp} ep {par.ep} "
          f"pp {par.pp}, params {setup.param_dtype}, activations {setup.act_dtype}, AC {setup.ac}: "
          f"{est.tokens_per_rank} tokens per rank")
    rows = [("params", est.params), ("grads", est.grads), ("optimizer", est.optimizer),
            ("fsdp buffers", est.fsdp_buffers), ("activations (layers)", est.activations),
            ("activations (model)", est.model_activations), ("loss phase", est.loss_phase),
            ("backward phase", est.backward_phase), ("transient = max(loss, backward)", est.transient),
            ("TOTAL (peak)", est.total)]
    for label, v in rows:
        print(f"  {label:32s} {format_bytes(v):>12s}")
    print(f"  one layer, no AC: {format_bytes(est.layer_activation_bytes)} "
          f"({est.layer_activation_bytes / max(1, est.tokens_per_rank):,.0f} bytes per token)")
    if a.terms:
        for label, v in est.layer_terms.items():
            print(f"    {label:18s} {format_bytes(v):>12s}  {v / max(1, est.tokens_per_rank):10,.1f} B/token")
    out = {"name": name, "shape": shape, "parallelism": asdict(par), "setup": asdict(setup), "calibration": cal,
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
