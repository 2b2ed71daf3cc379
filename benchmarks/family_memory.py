#!/usr/bin/env python
"""The CP memory cut per linear-attention family: per-rank activation and peak bytes at long L.

For each family (``kda``, ``mamba2``, ``gdn``: a flavor of the GDN LM with that family's
layers, titan_cp/models/<family>/flavors.py, all layers of the family's kind) it runs one
forward + backward step (chunked loss) at global length L on P gloo ranks for every P in
``--cp_sizes`` and reports per rank: activation bytes (what autograd saves for the backward
in the decoder forward + the decoder output held for the loss), the allocator's peak, and
both as a cut vs CP = 1 (target ~P). The step, the two measurements and the table are
benchmarks/memory.py's (``run``, ``print_table``; benchmarks/memory_probes.py for the probes):
this script only chooses the models, and splits each peak into its terms (:func:`peak_terms`).
The models are small (``--dim`` etc. override the family's debug flavor) so that L = 16K fits
four CPU ranks.

    python -m benchmarks.family_memory                                 # kda + mamba2, L 16K, CP 1 vs 2
    python -m benchmarks.family_memory --cp_sizes 1 2 4 --seq_lens 4096 16384 --markdown
    python -m benchmarks.family_memory --families kda gdn --seq_lens 4096 16384 --no_peak
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from benchmarks.memory import MiB, MemoryArgs, print_table, run
from benchmarks.model_steps import ModelArgs, parse_flags

Family = Literal["kda", "mamba2", "gdn"]
FAMILY_FLAVORS: dict[str, tuple[str, str]] = {  # family -> (flavors module, its debug flavor)
    "kda": ("titan_cp.models.kda.flavors", "kda_debug"),
    "mamba2": ("titan_cp.models.mamba2.flavors", "mamba2_debug"),
    "gdn": ("titan_cp.models.gdn.flavors", "debug"),
}


@dataclass
class FamilyModelArgs(ModelArgs):
    """:class:`ModelArgs` of a family's flavor (no analytic estimate: the estimator models GDN only)."""

    family: str = "kda"
    has_estimate = False

    def config(self):
        module = importlib.import_module(FAMILY_FLAVORS[self.family][0])
        return module.model_config(self.flavor, cp_exchange=self.exchange, cp_layout=self.layout, **self.overrides)

    @staticmethod
    def layer_kind(block) -> str:
        return type(block.attention).__name__

    def describe(self) -> str:
        if self.family != "mamba2":
            return f"{self.family}: " + super().describe()
        c = self.config()
        return (f"mamba2: flavor {self.flavor}: dim {c.dim}, {c.n_layers} layers, {c.num_heads} heads x P "
                f"{c.head_dim}, state N {c.ssm_state_size}, {c.ssm_n_groups} group(s), conv {c.conv_size}, "
                f"no MLP, vocab {c.vocab_size}, kernel {c.kernel}, {self.dtype}")


@dataclass
class _FamilyRun(MemoryArgs):
    """benchmarks/memory.py's arguments with the model given, not parsed."""

    family_model: FamilyModelArgs | None = None

    def model_args(self):
        return self.family_model


@dataclass
class FamilyMemoryArgs:
    """The command line: families, shape overrides of their debug flavors, the step."""

    families: tuple[Family, ...] = ("kda", "mamba2")
    seq_lens: tuple[int, ...] = (16384,)
    """global sequence lengths L"""
    cp_sizes: tuple[int, ...] = (1, 2)
    dim: int = 128
    n_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    """K (KDA, GDN) / Mamba-2's P (head width); Mamba-2's state N stays its flavor's"""
    vocab_size: int = 2048
    kernel: str = "torch"
    exchange: str = "allgather"
    """allgather | logscan | alltoall"""
    layout: str = "contiguous"
    """contiguous | zigzag"""
    batch: int = 1
    loss_chunks: int = 8
    threads: int = 1
    """torch threads per rank"""
    peak: bool = True
    """also the allocator's peak (CPU: the profiler's allocation events, memory_probes.AllocationTracker);
    --no_peak: activation bytes only, a shorter run"""
    markdown: bool = False
    json: Path | None = None
    """write {family: benchmarks/memory.py result} here"""
    overrides: dict[str, str] = field(default_factory=dict)
    """further model fields for every family, e.g. --overrides ssm_state_size 32 (parsed as Python literals)"""

    def model(self, family: str) -> FamilyModelArgs:
        import ast

        extra = {k: ast.literal_eval(v) for k, v in self.overrides.items()}
        over = dict(dim=self.dim, n_layers=self.n_layers, num_heads=self.num_heads, head_dim=self.head_dim,
                    vocab_size=self.vocab_size, kernel=self.kernel, **extra)
        return FamilyModelArgs(flavor=FAMILY_FLAVORS[family][1], overrides=over, exchange=self.exchange,
                               layout=self.layout, family=family)


def peak_terms(family: str, result: dict) -> list[str]:
    """Markdown rows splitting each measured peak into its terms (each the worst rank's, as the table):

        peak = parameters + live after forward + backward on top

    *live after forward*: the bytes allocated in the step and still held when the decoder forward
    returns (the saved activations and the decoder output); *backward on top*: the most the loss
    chunks and the backward allocate above that at one time (gradients, the grad accumulator, a
    layer's recomputed kernel intermediates under CP)."""
    out = []
    for r in result["rows"]:
        if r["status"] == "ok" and "peak_bytes" in r:
            above = r["peak_delta_bytes"] - r["live_after_forward_bytes"]
            out.append(f"| {family} | {r['seq_len']:,} | {r['P']} | {r['param_bytes'] / MiB:,.1f} | "
                       f"{r['live_after_forward_bytes'] / MiB:,.1f} | {above / MiB:,.1f} | {r['peak_bytes'] / MiB:,.1f} |")
    return (["| family | L | P | param MiB | live after forward MiB | backward on top MiB | peak MiB |",
             "|---|---|---|---|---|---|---|"] + out) if out else []


def main(argv=None) -> int:
    a = parse_flags(FamilyMemoryArgs, argv, "python -m benchmarks.family_memory", __doc__)
    results = {}
    for family in a.families:
        margs = a.model(family)
        margs.config()  # unknown fields fail here, before any rank starts
        result = run(_FamilyRun(cp_sizes=a.cp_sizes, seq_lens=tuple(sorted(a.seq_lens)), batch=a.batch,
                                loss_chunks=a.loss_chunks, threads=a.threads, peak=a.peak, family_model=margs))
        print(print_table(result, a.markdown))
        if a.peak:
            print("\n".join(peak_terms(family, result)))
        for name, target in result["targets"].items():
            print(f"# {family} target {name}: {json.dumps(target)}")
        results[family] = result
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
        print(f"# wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
