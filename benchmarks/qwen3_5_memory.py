"""The Qwen3.5 model of ``benchmarks/memory.py --model qwen3_5``.

TorchTitan's Qwen3.5 flavor (default ``debugmodel`` shrunk like the CPU debug
config: 4 layers = 3 Gated DeltaNet + 1 gated full attention, vocabulary
1024) on titan_cp's CP layers (titan_cp.models.qwen3_5). :class:`QwenArgs` has the
interface the memory script uses from its own ``ModelArgs`` (``build``,
``hidden``, ``layer_kind``, ``describe``); rows carry the analytic estimate of
titan_cp.analysis.qwen3_5_memory (through ``estimate_memory``) and its error.

Per layer kind (GDN / attention) the script reports the bytes autograd saves
in the decoder blocks of that kind, per layer and per token of the rank.

Beside CP, a :class:`Layout` adds TP (with or without sequence parallel) and EP
(MoE flavors): :meth:`QwenArgs.build_parallel` builds TorchTitan's ``ParallelDims``
mesh and applies titan_cp's Qwen3.5 plan (``apply_ep``, ``apply_cp``, ``apply_tp`` of
titan_cp.models.qwen3_5, as ``parallelize_qwen3_5_cp`` does) without FSDP, so dense
parameters are replicated over CP (and over the data-parallel ranks an EP degree larger
than cp x tp borrows), as in the CP-only rows.

    python -m benchmarks.memory --model qwen3_5 --cp_sizes 1 2 4 --seq_lens 2048 4096 8192
    python -m benchmarks.memory --model qwen3_5 --flavor debug_moe --layouts tp2 tp2sp ep2 cp2xep2 cp2xtp2xep2
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    """One row's parallel layout: CP ``cp`` x TP ``tp`` (``sp``: sequence parallel) x EP ``ep``.

    EP borrows ranks from cp x tp (TorchTitan's ``efsdp = dp_shard cp tp / ep``); when
    cp x tp has fewer ranks than ``ep`` needs, :attr:`dp` data-parallel ranks (each its own
    batch rows) complete the mesh. World size = dp x cp x tp. Spelled ``cp2``, ``tp2``,
    ``tp2sp``, ``ep2``, ``cp2xtp2spxep4`` (parts joined by ``x``, any order).
    """

    cp: int = 1
    tp: int = 1
    sp: bool = False
    ep: int = 1

    PART = re.compile(r"^(cp|tp|ep)([1-9][0-9]*)(sp)?$")

    @classmethod
    def parse(cls, text: str) -> "Layout":
        fields = {}
        for part in text.lower().split("x"):
            m = cls.PART.match(part)
            if not m or (m[3] and m[1] != "tp") or m[1] in fields:
                raise ValueError(f"--layouts '{text}': '{part}' is not one of cp<N>, tp<N>, tp<N>sp, ep<N> "
                                 "(each once, joined by 'x', e.g. cp2xtp2spxep2)")
            fields[m[1]] = int(m[2])
            if m[3]:
                fields["sp"] = True
        return cls(**fields)

    @property
    def dp(self) -> int:
        return self.ep // math.gcd(self.ep, self.cp * self.tp)

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def cp_only(self) -> bool:
        return self.tp == 1 and self.ep == 1

    def __str__(self) -> str:
        parts = ([f"DP {self.dp}"] if self.dp > 1 else []) + ([f"CP {self.cp}"] if self.cp > 1 else []) \
            + ([f"TP {self.tp}" + (" + SP" if self.sp else "")] if self.tp > 1 else []) \
            + ([f"EP {self.ep}"] if self.ep > 1 else [])
        return " x ".join(parts) or "1 rank"


@dataclass
class QwenArgs:
    """A Qwen3.5 flavor with :class:`~titan_cp.models.qwen3_5.flavors.TextShape` overrides, plus the CP strategy."""

    flavor: str = "debugmodel"
    overrides: dict = field(default_factory=dict)
    exchange: str = "allgather"
    layout: str = "contiguous"
    dtype: str = "float32"
    kernel: str = "torch"
    q_transition: str = "recompute"  # parallelism.cp_q_transition
    has_estimate = True  # titan_cp.analysis.qwen3_5_memory

    def config(self, max_seq_len: int | None = None):
        from titan_cp.models.qwen3_5.flavors import MOE_FLAVORS, torchtitan_config
        from titan_cp.models.qwen3_5.model import titan_cp_config

        shape = dict(self.overrides)
        if max_seq_len is not None and self.flavor not in MOE_FLAVORS:  # MoE flavors keep their RoPE table  # RoPE table length; the flavor's default may be shorter than the run
            shape["max_seq_len"] = max(max_seq_len, shape.get("max_seq_len", 0))
        return titan_cp_config(torchtitan_config(self.flavor, **shape), kernel=self.kernel,
                               cp_layout=self.layout, cp_exchange=self.exchange, cp_q_transition=self.q_transition)

    @property
    def has_experts(self) -> bool:
        from titan_cp.models.qwen3_5.flavors import MOE_FLAVORS

        return self.flavor in MOE_FLAVORS

    def describe(self) -> str:
        from titan_cp.models.qwen3_5.flavors import shape_of

        s = shape_of(self.config())
        n_attn = s.n_layers // s.full_attention_interval
        return (f"Qwen3.5 {self.flavor}: dim {s.dim}, {s.n_layers} layers ({s.n_layers - n_attn} GDN + {n_attn} "
                f"attention), GDN {s.n_key_heads} key heads x {s.key_head_dim} / {s.n_value_heads} value heads x "
                f"{s.value_head_dim}, attention {s.n_heads} q / {s.n_kv_heads} kv heads x {s.head_dim}, "
                f"MLP {s.hidden_dim}, vocab {s.vocab_size}, kernel {self.kernel}, {self.dtype}")

    def _seeded_model(self, device: torch.device, max_seq_len: int, seed: int):
        """The unparallelised model on ``device``, the same weights on every rank (``seed``)."""
        torch.manual_seed(seed)
        model = self.config(max_seq_len).build()
        model.init_weights()
        model.to(device=device, dtype=getattr(torch, self.dtype))  # float32 | float64 | bfloat16
        model._skip_lm_head = True  # the chunked loss applies lm_head itself
        return model

    def build(self, device: torch.device, cp_group, max_seq_len: int, seed: int = 0):
        """The model on ``device`` (same weights on every rank), CP applied when the group has > 1 rank."""
        from titan_cp.cp.context import CPContext
        from titan_cp.models.common.parallelize import apply_cp

        model = self._seeded_model(device, max_seq_len, seed)
        group = cp_group if cp_group is not None and dist.get_world_size(cp_group) > 1 else None
        apply_cp(model, None if group is None else CPContext(group=group, layout=self.layout, exchange=self.exchange,
                                                             q_transition=self.q_transition))
        return model

    def build_parallel(self, device: torch.device, layout: Layout, max_seq_len: int, seed: int = 0):
        """The model under ``layout`` on TorchTitan's ParallelDims mesh (same weights on every rank), without
        FSDP. Returns (model, the ParallelDims): its ``cp`` / ``batch`` meshes say which shard a rank holds."""
        from torchtitan.distributed import ParallelDims
        from torchtitan.distributed.utils import set_spmd_backend

        from titan_cp.components import compat
        from titan_cp.cp.context import CPContext
        from titan_cp.models.common.parallelize import apply_cp
        from titan_cp.models.qwen3_5.moe import apply_ep
        from titan_cp.models.qwen3_5.parallelize import apply_tp

        compat.apply()
        set_spmd_backend("partial_dtensor")  # as TorchTitan's trainer does from parallelism.spmd_backend
        dims = ParallelDims(dp_replicate=1, dp_shard=layout.dp, cp=layout.cp, tp=layout.tp, pp=1, ep=layout.ep,
                            world_size=layout.world, spmd_backend="partial_dtensor")
        dims.build_mesh()
        model = self._seeded_model(device, max_seq_len, seed)
        if dims.ep_enabled:
            apply_ep(model, dims.get_mesh("ep"))
        apply_cp(model, CPContext(group=dims.get_mesh("cp").get_group(), layout=self.layout, exchange=self.exchange,
                                  q_transition=self.q_transition) if dims.cp_enabled else None)
        if dims.tp_enabled:
            apply_tp(model, dims.get_mesh("tp"), sequence_parallel=layout.sp, expert_parallel=dims.ep_enabled)
        return model, dims

    @staticmethod
    def hidden(model, inputs: torch.Tensor) -> torch.Tensor:
        """Decoder output (after the final norm) that the chunked loss receives."""
        return model(inputs)

    @staticmethod
    def layer_kind(block) -> str:
        return "attention" if block.full_attn else "gdn"


def qwen_args_from(a) -> QwenArgs:
    """From :class:`benchmarks.model_steps.ModelFlags`: ``--flavor`` (debug / debug_moe: TorchTitan's
    debugmodel / debugmodel_moe with 4 layers and vocabulary 1024), kernel and CP strategy.

    The GDN model's shape flags (--dim, --n_layers ...) do not apply: the shape is the flavor's.
    """
    if a.flavor in ("debug", "debug_moe"):
        from titan_cp.models.qwen3_5.config_registry import DEBUG_SHAPE  # the CPU debug config's shape (imports TorchTitan)

        flavor = "debugmodel" if a.flavor == "debug" else "debugmodel_moe"
        return QwenArgs(flavor, dict(DEBUG_SHAPE), a.exchange, a.layout, a.dtype, a.kernel, a.q_transition)
    return QwenArgs(a.flavor, {}, a.exchange, a.layout, a.dtype, a.kernel, a.q_transition)


def layer_kind_rows(rows: list[dict]) -> list[str]:
    """Markdown rows: saved bytes per layer and per token of the rank, by layer kind, for every ok row."""
    lines = ["| layout | seq len | tokens/rank | kind | layers | saved MiB per layer | bytes / token / layer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for kind, (n, b) in sorted(r.get("saved_by_kind", {}).items()):
            per_layer = b / n
            lines.append(f"| {r['layout']} | {r['seq_len']:,} | {r['tokens_per_rank']:,} | {kind} | {n} | "
                         f"{per_layer / float(1 << 20):,.2f} | {per_layer / r['tokens_per_rank']:,.0f} |")
    return lines
