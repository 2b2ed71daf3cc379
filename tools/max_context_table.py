"""The longest training sequence per Qwen3.5 flavor and GPU count, and the layout that reaches it.

For every flavor of TorchTitan's ``qwen3_5_configs`` (0.8B ... 27B dense; 35B-A3B,
122B-A10B, 397B-A17B MoE) and every GPU count, every layout pp x tp x cp x dp (and ep
for MoE) whose factors divide the model (tp | kv heads and key heads, pp | layers,
ep | experts and ep | dp cp tp) is asked for its longest seq_len within the budget
(:func:`titan_cp.analysis.memory.max_seq_len`, the Qwen3.5 estimator), one row per GPU
(batch 1 per data-parallel rank; under PP the batch is ``pp`` microbatches of one row,
the fewest 1F1B runs with). Reported: the best layout overall, the best without CP
(TP / EP / PP only) and the best without TP, so a row shows where CP beats TP or EP.

    python -m tools.max_context_table                       # docs/max_context.md's table (markdown)
    python -m tools.max_context_table --flavors 35B-A3B --gpus 16 --attention-score-tensors 0

Setup (the GPU train_configs'): fp32 parameters, bf16 compute, fp32 reduce, AdamW
(2 fp32 states), full activation checkpointing, FLA's Triton GDN kernel, zigzag CP,
TorchTitan's chunked loss (8 chunks).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import tyro

from titan_cp.analysis.memory import estimate_memory, max_seq_len
from titan_cp.analysis.qwen3_5_memory import QwenDims
from titan_cp.analysis.train_setup import Parallelism, TrainSetup

DEFAULT_FLAVORS = ("0.8B", "2B", "4B", "9B", "27B", "35B-A3B", "122B-A10B", "397B-A17B")


@dataclass
class Args:
    flavors: tuple[str, ...] = DEFAULT_FLAVORS
    gpus: tuple[int, ...] = (8, 16, 64, 256)
    budget_gib: float = 70.0  # of an 80 GB card (74.5 GiB): minus CUDA context, NCCL buffers, fragmentation
    ac: str = "full"
    attention_score_tensors: float = 4.6  # titan_cp's block attention (fp32 score tensors per block pair); 0: flash
    max_cp: int = 64
    markdown: bool = True


@dataclass(frozen=True)
class Row:
    flavor: str
    gpus: int
    par: Parallelism
    seq_len: int
    peak_bytes: float = field(default=0.0, compare=False)

    def layout(self) -> str:
        p = self.par
        parts = [f"{n} {v}" for n, v in (("PP", p.pp), ("DP", p.dp), ("TP", p.tp), ("CP", p.cp), ("EP", p.ep))
                 if v > 1]
        return " x ".join(parts) or "1 GPU"


def _powers(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


@functools.lru_cache(maxsize=None)
def model_config(flavor: str):
    from titan_cp.models.qwen3_5.flavors import torchtitan_config
    from titan_cp.models.qwen3_5.model import titan_cp_config

    return titan_cp_config(torchtitan_config(flavor), kernel="triton", cp_layout="zigzag", cp_exchange="allgather")


def layouts(flavor: str, gpus: int, max_cp: int = 64):
    """Every Parallelism of ``gpus`` ranks that the model's shape admits."""
    q = QwenDims.of(model_config(flavor))
    s = q.text
    n_layers = q.n_gdn + q.n_attn
    for pp in _powers(gpus):
        if n_layers % pp:
            continue
        for tp in _powers(gpus // pp):
            if s.n_kv_heads % tp or s.n_key_heads % tp:
                continue
            for cp in _powers(min(max_cp, gpus // (pp * tp))):
                dp = gpus // (pp * tp * cp)
                eps = [e for e in _powers(dp * cp * tp) if q.moe and q.moe.experts % e == 0] or [1]
                for ep in eps:
                    yield Parallelism(dp=dp, tp=tp, cp=cp, ep=ep, pp=pp)


def setup_for(par: Parallelism, a: Args) -> TrainSetup:
    return TrainSetup(seq_len=0, batch=par.pp, microbatches=par.pp, param_dtype="fp32", act_dtype="bf16",
                      ac=a.ac, cp_layout="zigzag", attention_score_tensors=a.attention_score_tensors)


def best_rows(flavor: str, gpus: int, a: Args) -> list[Row]:
    """One Row per admissible layout with its longest seq_len (0: the model does not fit), longest first."""
    budget = a.budget_gib * 2**30
    model = model_config(flavor)
    rows = []
    for par in layouts(flavor, gpus, a.max_cp):
        setup = setup_for(par, a)
        L = max_seq_len(budget, model, setup, par, multiple_of=256 * par.cp, limit=1 << 24)
        peak = estimate_memory(model, replace(setup, seq_len=L), par).total if L else 0.0
        rows.append(Row(flavor, gpus, par, L, peak))
    return sorted(rows, key=lambda r: (-r.seq_len, r.par.ep, r.par.pp, r.par.tp))


def _k(n: int) -> str:
    return "-" if n == 0 else (f"{n // 1024:,}K" if n % 1024 == 0 else f"{n:,}")


def table(a: Args) -> str:
    lines = ["| flavor | GPUs | longest seq | layout | without CP: longest (layout) | without TP: longest (layout) | "
             "CP gain |", "|---|---|---|---|---|---|---|"]
    for flavor in a.flavors:
        for gpus in a.gpus:
            rows = best_rows(flavor, gpus, a)
            best = rows[0]
            no_cp = next(r for r in rows if r.par.cp == 1)
            no_tp = next(r for r in rows if r.par.tp == 1)
            gain = f"{best.seq_len / no_cp.seq_len:.1f}x" if no_cp.seq_len else ("fits only with CP" if best.seq_len else "-")
            lines.append(f"| {flavor} | {gpus} | {_k(best.seq_len)} | {best.layout()} | "
                         f"{_k(no_cp.seq_len)} ({no_cp.layout()}) | {_k(no_tp.seq_len)} ({no_tp.layout()}) | {gain} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = tyro.cli(Args, args=argv, prog="python -m tools.max_context_table", description=__doc__.split("\n\n")[0])
    print(f"# budget {a.budget_gib:g} GiB per GPU, AC {a.ac}, attention score tensors {a.attention_score_tensors:g}")
    print(table(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
