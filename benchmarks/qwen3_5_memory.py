"""The Qwen3.5 model of ``benchmarks/memory.py --model qwen3_5``.

TorchTitan's Qwen3.5 flavor (default ``debugmodel`` shrunk like the CPU debug
config: 4 layers = 3 Gated DeltaNet + 1 gated full attention, vocabulary
1024) on titan_cp's CP layers (titan_cp.models.qwen3_5). :class:`QwenArgs` has the
interface the memory script uses from its own ``ModelArgs`` (``build``,
``hidden``, ``layer_kind``, ``describe``); rows carry the analytic estimate of
titan_cp.analysis.qwen3_5_memory (through ``estimate_memory``) and its error.

Per layer kind (GDN / attention) the script reports the bytes autograd saves
in the decoder blocks of that kind, per layer and per token of the rank.

    python -m benchmarks.memory --model qwen3_5 --cp_sizes 1 2 4 --seq_lens 2048 4096 8192
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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

    def describe(self) -> str:
        from titan_cp.models.qwen3_5.flavors import shape_of

        s = shape_of(self.config())
        n_attn = s.n_layers // s.full_attention_interval
        return (f"Qwen3.5 {self.flavor}: dim {s.dim}, {s.n_layers} layers ({s.n_layers - n_attn} GDN + {n_attn} "
                f"attention), GDN {s.n_key_heads} key heads x {s.key_head_dim} / {s.n_value_heads} value heads x "
                f"{s.value_head_dim}, attention {s.n_heads} q / {s.n_kv_heads} kv heads x {s.head_dim}, "
                f"MLP {s.hidden_dim}, vocab {s.vocab_size}, kernel {self.kernel}, {self.dtype}")

    def build(self, device: torch.device, cp_group, max_seq_len: int, seed: int = 0):
        """The model on ``device`` (same weights on every rank), CP applied when the group has > 1 rank."""
        from titan_cp.cp.context import CPContext
        from titan_cp.models.common.parallelize import apply_cp

        torch.manual_seed(seed)
        model = self.config(max_seq_len).build()
        model.init_weights()
        model.to(device=device, dtype=getattr(torch, self.dtype))  # float32 | float64 | bfloat16
        model._skip_lm_head = True  # the chunked loss applies lm_head itself
        group = cp_group if cp_group is not None and dist.get_world_size(cp_group) > 1 else None
        apply_cp(model, None if group is None else CPContext(group=group, layout=self.layout, exchange=self.exchange,
                                                             q_transition=self.q_transition))
        return model

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
    lines = ["| P | seq len | tokens/rank | kind | layers | saved MiB per layer | bytes / token / layer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        for kind, (n, b) in sorted(r.get("saved_by_kind", {}).items()):
            per_layer = b / n
            lines.append(f"| {r['P']} | {r['seq_len']:,} | {r['tokens_per_rank']:,} | {kind} | {n} | "
                         f"{per_layer / float(1 << 20):,.2f} | {per_layer / r['tokens_per_rank']:,.0f} |")
    return lines
