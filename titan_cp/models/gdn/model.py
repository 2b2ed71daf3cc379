"""GDNModel: a decoder of Gated DeltaNet blocks (optionally hybrid with softmax attention).

Built like TorchTitan's models: ``GDNModel.Config`` holds the hyper-parameters
(``config.build()`` makes the model, on the meta device in the trainer),
``init_weights`` initialises it after ``to_empty``, and
``get_nparams_and_flops`` reports size and training FLOPs per token.

    tokens [B, T] -> tok_embeddings -> n_layers x block -> norm -> lm_head -> logits [B, T, vocab]

Under CP, ``tokens`` is this rank's shard; ``positions`` (global token
positions, TorchTitan's name) mark document starts in packed data: a token
with position 0 starts a document (state and conv history reset there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchtitan.protocols.model import BaseModel

from titan_cp.cp.context import CPContext
from titan_cp.models.gdn.init import init_unit_in_full
from titan_cp.models.common.sequence import SequenceInfo, sequence_info
from titan_cp.models.gdn.layers import GatedDeltaNet, GDNBlock, KimiDeltaAttention, RMSNorm
from titan_cp.models.common.preflight import validate


class GDNModel(BaseModel):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        dim: int = 256
        n_layers: int = 2
        vocab_size: int = 2048
        num_heads: int = 4  # key heads of every GDN layer
        head_dim: int = 64  # K
        expand_v: float = 2.0  # V = head_dim * expand_v
        num_v_heads: int | None = None  # grouped value heads (multiple of num_heads)
        conv_size: int = 4
        hidden_dim: int = 512  # SwiGLU hidden size; 0 = blocks without an MLP (transformers' Mamba-2 blocks)
        norm_eps: float = 1e-6
        tie_embeddings: bool = False
        kernel: str = "torch"  # titan_cp.ops.gated_delta_rule.KERNEL_NAMES
        # Context parallelism (set by the config function or the TOML front end; checked by titan_cp.models.common.preflight).
        cp_exchange: str = "allgather"  # titan_cp.cp.context.EXCHANGES
        cp_layout: str = "contiguous"  # titan_cp.cp.layout.LAYOUTS
        cp_q_transition: str = "recompute"  # titan_cp.cp.settings.Q_TRANSITIONS: recompute q M in the backward, or keep it
        doc_masking: bool = True  # reset state + conv history at document starts (positions == 0)
        # Hybrid models: one letter per layer, cycled over n_layers: G = Gated DeltaNet,
        # K = Kimi Delta Attention (FLA's KDA layer, same head fields),
        # M = Mamba-2 (transformers' Mamba2Mixer: num_heads heads of head_dim channels, state
        #     ssm_state_size, B/C in ssm_n_groups groups; models/gdn/mamba2_layer.py),
        # A = softmax attention (RoPE, GQA; ring attention under CP). "" = all GDN.
        layer_pattern: str = ""
        ssm_state_size: int = 128  # Mamba-2 N
        ssm_n_groups: int = 1  # Mamba-2 groups of B and C
        attn_num_heads: int = 4
        attn_num_kv_heads: int = 2
        attn_head_dim: int = 64
        rope_theta: float = 10000.0
        # Weights are a function of this seed and each unit's name only, the same on every
        # layout (titan_cp/models/gdn/init.py); update_from_config sets it from debug.seed.
        init_seed: int = 0

        def layer_types(self) -> list[str]:
            pattern = self.layer_pattern or "G"
            if set(pattern) - {"G", "A", "K", "M"}:
                raise ValueError(
                    f"model.layer_pattern = '{self.layer_pattern}' may only contain 'G' (Gated DeltaNet), "
                    "'K' (Kimi Delta Attention), 'M' (Mamba-2) and 'A' (softmax attention), e.g. 'GGGA'."
                )
            return [pattern[i % len(pattern)] for i in range(self.n_layers)]

        @property
        def layers(self) -> list[str]:
            """One entry per layer: TorchTitan's pipelining counts ``len(model_config.layers)``."""
            return self.layer_types()

        def update_from_config(self, *, config, **kwargs) -> None:
            """Reject jobs this model cannot run, before any weights exist (:func:`titan_cp.models.common.preflight.validate`);
            take the init seed from ``debug.seed``."""
            validate(config, check_runtime=False)
            if config.debug.seed is not None:
                self.init_seed = config.debug.seed

        def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
            """Parameters and training FLOPs per token (``titan_cp.models.gdn.flops``: 6 x matmul params
            + the chunked delta rule + attention)."""
            from titan_cp.models.gdn.flops import training_flops_per_token

            nparams = sum(p.numel() for p in model.parameters())
            embedding = sum(p.numel() for p in model.tok_embeddings.parameters())
            matmul_params = nparams - embedding if not self.tie_embeddings else nparams
            return nparams, int(training_flops_per_token(self, matmul_params, seq_len))

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = self.build_unit(config, "tok_embeddings")
        self.layers = nn.ModuleDict(
            {str(i): self.build_unit(config, f"layers.{i}") for i in range(config.n_layers)}
        )
        self.norm = self.build_unit(config, "norm")
        self.lm_head = self.build_unit(config, "lm_head")
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.cp: CPContext | None = None  # set by parallelize_gdn together with every mixer's cp

    @classmethod
    def build_unit(cls, config: Config, name: str) -> nn.Module:
        """One unit of the model by name: ``tok_embeddings``, ``layers.<i>``, ``norm``, ``lm_head``."""
        if name == "tok_embeddings":
            return nn.Embedding(config.vocab_size, config.dim)
        if name == "norm":
            return RMSNorm(config.dim, config.norm_eps)
        if name == "lm_head":
            return nn.Linear(config.dim, config.vocab_size, bias=False)
        layer_id = int(name.removeprefix("layers."))
        mixer = cls._build_mixer(config, config.layer_types()[layer_id])
        mixer.layer_name = f"{name}.attention"
        return GDNBlock(layer_id, mixer, config.dim, config.hidden_dim, config.norm_eps, config.n_layers)

    @staticmethod
    def init_unit(config: Config, name: str, unit: nn.Module) -> None:
        """TorchTitan's init of one unit: normal embeddings, depth-scaled outputs, FLA's GDN-specific params."""
        if name == "tok_embeddings":
            nn.init.normal_(unit.weight)
        elif name == "norm":
            unit.reset_parameters()
        elif name == "lm_head":
            std = config.dim**-0.5
            nn.init.trunc_normal_(unit.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        else:
            unit.init_weights()

    def units(self) -> list[tuple[str, nn.Module]]:
        """The units this model (or pipeline stage: pruned units are None / absent) holds, in order."""
        named = [("tok_embeddings", self.tok_embeddings)]
        named += [(f"layers.{i}", block) for i, block in self.layers.items()]
        named += [("norm", self.norm), ("lm_head", self.lm_head)]
        return [(name, unit) for name, unit in named if unit is not None]

    @property
    def enable_weight_tying(self) -> bool:  # read by TorchTitan's FSDP wrapping
        return self.config.tie_embeddings

    @staticmethod
    def _build_mixer(config: Config, layer_type: str) -> nn.Module:
        if layer_type == "A":
            from titan_cp.models.gdn.attention import Attention

            return Attention(
                dim=config.dim,
                n_heads=config.attn_num_heads,
                n_kv_heads=config.attn_num_kv_heads,
                head_dim=config.attn_head_dim,
                rope_theta=config.rope_theta,
            )
        if layer_type == "M":
            from titan_cp.models.gdn.mamba2_layer import Mamba2Mixer

            return Mamba2Mixer(dim=config.dim, num_heads=config.num_heads, head_dim=config.head_dim,
                               state_size=config.ssm_state_size, n_groups=config.ssm_n_groups,
                               conv_size=config.conv_size, norm_eps=config.norm_eps, kernel=config.kernel)
        mixer_cls = KimiDeltaAttention if layer_type == "K" else GatedDeltaNet
        return mixer_cls(
            dim=config.dim,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            expand_v=config.expand_v,
            num_v_heads=config.num_v_heads,
            conv_size=config.conv_size,
            norm_eps=config.norm_eps,
            kernel=config.kernel,
        )

    def verify_module_protocol(self) -> None:
        """Submodules are plain ``nn.Module`` (classic TP/FSDP plans apply to them); nothing to verify."""

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        """Layout-invariant init (:mod:`titan_cp.models.gdn.init`): each unit built and initialised in full,
        seeded by (``config.init_seed``, unit name), then copied into this rank's shards."""
        for name, unit in self.units():
            if name == "lm_head" and self.config.tie_embeddings:
                continue  # the embedding's weight
            init_unit_in_full(
                unit,
                name=name,
                seed=self.config.init_seed,
                build=lambda name=name: self.build_unit(self.config, name),
                init=lambda full, name=name: self.init_unit(self.config, name, full),
            )

    def sequence_info(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> SequenceInfo:
        """:func:`sequence_info` of this rank's tokens ([B, T], or a later pipeline stage's [B, T, D])."""
        return sequence_info(tokens, positions, self.cp, self.config.doc_masking)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_masks=None,
        **kwargs,
    ) -> torch.Tensor:
        """tokens [B, T] (this rank's shard under CP) -> logits [B, T, vocab].

        A pipeline stage (TorchTitan's split prunes units to None) runs the units
        it holds: without ``tok_embeddings`` its input is the previous stage's
        hidden states [B, T, D]; without ``norm`` / ``lm_head`` it returns them.
        ``positions`` reach every stage (the schedule forwards model kwargs).
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        seq = self.sequence_info(h, positions)
        for block in self.layers.values():
            h = block(h, seq)
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is not None and not getattr(self, "_skip_lm_head", False):
            h = self.lm_head(h)
        return h
