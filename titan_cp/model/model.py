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
from titan_cp.cp.layout import shard_sequence
from titan_cp.model.layers import GatedDeltaNet, GDNBlock, RMSNorm, SequenceInfo
from titan_cp.validate import validate


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
        hidden_dim: int = 512  # SwiGLU hidden size
        norm_eps: float = 1e-6
        tie_embeddings: bool = False
        kernel: str = "torch"  # titan_cp.kernels.KERNEL_NAMES
        # Context parallelism (set by the config function or the TOML front end; checked by titan_cp.validate).
        cp_exchange: str = "allgather"  # titan_cp.cp.context.EXCHANGES
        cp_layout: str = "contiguous"  # titan_cp.cp.layout.LAYOUTS
        doc_masking: bool = True  # reset state + conv history at document starts (positions == 0)
        # Hybrid models: one letter per layer, cycled over n_layers: G = Gated DeltaNet,
        # A = softmax attention (RoPE, GQA; ring attention under CP). "" = all GDN.
        layer_pattern: str = ""
        attn_num_heads: int = 4
        attn_num_kv_heads: int = 2
        attn_head_dim: int = 64
        rope_theta: float = 10000.0

        def layer_types(self) -> list[str]:
            pattern = self.layer_pattern or "G"
            if set(pattern) - {"G", "A"}:
                raise ValueError(
                    f"model.layer_pattern = '{self.layer_pattern}' may only contain 'G' (Gated DeltaNet) "
                    "and 'A' (softmax attention), e.g. 'GGGA'."
                )
            return [pattern[i % len(pattern)] for i in range(self.n_layers)]

        def update_from_config(self, *, config, **kwargs) -> None:
            """Reject jobs this model cannot run, before any weights exist (:func:`titan_cp.validate.validate`)."""
            validate(config, check_runtime=False)

        def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
            """Parameters and training FLOPs per token (``titan_cp.analysis.flops``: 6 x matmul params
            + the chunked delta rule + attention)."""
            from titan_cp.analysis.flops import training_flops_per_token

            nparams = sum(p.numel() for p in model.parameters())
            embedding = sum(p.numel() for p in model.tok_embeddings.parameters())
            matmul_params = nparams - embedding if not self.tie_embeddings else nparams
            return nparams, int(training_flops_per_token(self, matmul_params, seq_len))

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict()
        for layer_id, layer_type in enumerate(config.layer_types()):
            mixer = self._build_mixer(config, layer_type)
            mixer.layer_name = f"layers.{layer_id}.attention"
            self.layers[str(layer_id)] = GDNBlock(
                layer_id, mixer, config.dim, config.hidden_dim, config.norm_eps, config.n_layers
            )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.cp: CPContext | None = None  # set by parallelize_gdn together with every mixer's cp

    @property
    def enable_weight_tying(self) -> bool:  # read by TorchTitan's FSDP wrapping
        return self.config.tie_embeddings

    @staticmethod
    def _build_mixer(config: Config, layer_type: str) -> nn.Module:
        if layer_type == "A":
            from titan_cp.model.attention import Attention

            return Attention(
                dim=config.dim,
                n_heads=config.attn_num_heads,
                n_kv_heads=config.attn_num_kv_heads,
                head_dim=config.attn_head_dim,
                rope_theta=config.rope_theta,
            )
        return GatedDeltaNet(
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
        """TorchTitan's init: normal embeddings, depth-scaled outputs, FLA's GDN-specific params."""
        nn.init.normal_(self.tok_embeddings.weight)
        for block in self.layers.values():
            block.init_weights()
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            std = self.config.dim**-0.5
            nn.init.trunc_normal_(self.lm_head.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def sequence_info(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> SequenceInfo:
        """Global token index of this rank's tokens (from the CP layout), and document facts.

        With packed documents ``positions`` restart at 0 at every document start;
        a document's id is the global index of its first token (index - position),
        the same on every rank without any communication.
        """
        B, T = tokens.shape
        cp: CPContext | None = self.cp
        index = torch.arange(T * (cp.size if cp else 1), device=tokens.device)
        if cp is not None and cp.size > 1:
            index = shard_sequence(index, 0, cp.rank, cp.size, cp.layout)
        index = index.expand(B, T)
        if positions is None or not self.config.doc_masking:
            return SequenceInfo(positions=index if positions is None else positions)
        return SequenceInfo(doc_starts=positions == 0, positions=positions, doc_ids=index - positions)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_masks=None,
        **kwargs,
    ) -> torch.Tensor:
        """tokens [B, T] (this rank's shard under CP) -> logits [B, T, vocab]."""
        seq = self.sequence_info(tokens, positions)
        h = self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h, seq)
        h = self.norm(h)
        return self.lm_head(h)
