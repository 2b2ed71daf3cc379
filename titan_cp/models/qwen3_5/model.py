"""Qwen35CPModel: TorchTitan's Qwen3.5 decoder with titan_cp's CP layers, text only by default.

    tokens [B, T] (this rank's shard under CP) -> tok_embeddings -> hybrid blocks
      (3 x CPGatedDeltaNet : 1 x CPQwen35Attention, TorchTitan's layer plan) -> norm -> lm_head

``positions`` (TorchTitan's per-document positions, sharded by the trainer
under CP) drive both RoPE and document resets: a token with position 0
starts a document. Without them each row is one sequence and RoPE uses the
global token index of this rank's tokens (titan_cp.models.gdn.model.sequence_info).

:func:`titan_cp_config` turns any TorchTitan ``Qwen35Model.Config`` (a
``qwen3_5_configs`` flavor) into this model's config, swapping only the
sequence-mixing modules; everything else (FFN / MoE, norms, embeddings, init)
is TorchTitan's, so parameter names and the HF adapter are unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from torchtitan.models.common.decoder import Decoder
from torchtitan.models.qwen3_5.model import Qwen35Model

from titan_cp.cp.context import CPContext
from titan_cp.errors import ConfigError, unknown_choice_message
from titan_cp.models.common.sequence import sequence_info
from titan_cp.models.qwen3_5.moe import EXPERT_COMPUTE, CPGroupedExperts, moe_layers
from titan_cp.models.qwen3_5.layers import (CPGatedDeltaNet, CPQwen35Attention, CPQwen35Block, RingAttention,
                                            dtype_following)


def _fields(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


class Qwen35CPModel(Qwen35Model):
    @dataclass(kw_only=True, slots=True)
    class Config(Qwen35Model.Config):
        vision_encoder: object = None  # built only with ``with_vision``
        with_vision: bool = False
        kernel: str = "torch"  # titan_cp.ops.gated_delta_rule.KERNEL_NAMES: the GDN layers' delta-rule kernel
        # Context parallelism (the job's parallelism.cp_layout / cp_exchange / cp_q_transition).
        cp_layout: str = "contiguous"
        cp_exchange: str = "allgather"
        cp_q_transition: str = "recompute"  # titan_cp.cp.settings.Q_TRANSITIONS
        doc_masking: bool = True  # reset state, conv and attention at positions == 0
        # Routed experts: TorchTitan's bf16 grouped_mm, or "exact" (titan_cp.models.qwen3_5.moe).
        expert_compute: str = "grouped_mm_bf16"

        def update_from_config(self, *, config, **kwargs) -> None:
            """TorchTitan's RoPE / seq_len checks, then titan_cp's start-up checks (titan_cp.models.common.preflight)."""
            from titan_cp.models.common.preflight import validate

            Decoder.Config.update_from_config(self, config=config, **kwargs)
            validate(config, check_runtime=False)

        def check_job(self, config) -> None:
            """This model's own start-up rules (titan_cp.models.common.preflight calls it; see qwen3_5/validate.py)."""
            from titan_cp.models.qwen3_5.preflight import check_job

            check_job(self, config)

        def hf_config(self, **extra) -> dict:
            """``config.json`` of transformers' ``Qwen3_5ForCausalLM`` (dense) or ``Qwen3_5MoeForCausalLM``
            (MoE flavors: state_dict_adapter.hf_moe_fields) for this shape (+ ``extra`` fields)."""
            from titan_cp.models.qwen3_5.flavors import hf_text_config, shape_of
            from titan_cp.models.qwen3_5.state_dict_adapter import hf_moe_fields

            moe = hf_moe_fields(self)
            architecture, model_type = ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text") if moe else (
                "Qwen3_5ForCausalLM", "qwen3_5_text")
            return {"architectures": [architecture], "model_type": model_type,
                    **hf_text_config(shape_of(self)), **moe, **extra}

        def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
            return Qwen35Model.Config.get_nparams_and_flops(self, model, seq_len)

    def __init__(self, config: Config):
        Decoder.__init__(self, config)
        self.vision_encoder = config.vision_encoder.build() if config.with_vision else None
        self.spatial_merge_size = config.vision_encoder.spatial_merge_size if config.with_vision else None
        for layer_id, block in self.layers.items():
            block.attn.layer_name = f"layers.{layer_id}.attn"
            if not block.full_attn:
                block.attn.mixing_kernel = config.kernel
        if config.expert_compute not in EXPERT_COMPUTE:
            raise ConfigError(unknown_choice_message("model.expert_compute", config.expert_compute, EXPERT_COMPUTE))
        for _, moe in moe_layers(self):
            moe.routed_experts.inner_experts.exact = config.expert_compute == "exact"
        self.cp: CPContext | None = None  # set by apply_cp with every mixer's cp

    def verify_module_protocol(self) -> None:
        """Every submodule is a TorchTitan Module (titan_cp's layers subclass TorchTitan's)."""
        Decoder.verify_module_protocol(self)

    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        grid_thw: torch.Tensor | None = None,
        grid_thw_videos: torch.Tensor | None = None,
        attention_masks=None,
        positions: torch.Tensor | None = None,
        mrope_positions: torch.Tensor | None = None,
        special_tokens: dict[str, int] | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab]. ``attention_masks`` is unused (documents come from positions).

        A pipeline stage (TorchTitan's split prunes units to None) runs the units
        it holds: without ``tok_embeddings`` its input is the previous stage's
        hidden states [B, T, D]; without ``norm`` / ``lm_head`` it returns them.
        ``positions`` reach every stage (the schedule forwards model kwargs).
        """
        has_vision = pixel_values is not None or pixel_values_videos is not None or mrope_positions is not None
        if self.tok_embeddings is None:
            h = tokens
        elif has_vision:
            self._check_vision_allowed()
            h = self._prepare_multimodal_embeds(
                tokens, pixel_values=pixel_values, pixel_values_videos=pixel_values_videos,
                grid_thw=grid_thw, grid_thw_videos=grid_thw_videos, special_tokens=special_tokens,
            )
        else:
            h = self.tok_embeddings(tokens)
        seq = sequence_info(h, positions, self.cp, self.config.doc_masking)
        if mrope_positions is not None:
            seq.positions = mrope_positions
        for block in self.layers.values():
            h = block(h, seq)
        h = self.norm(h) if self.norm is not None else h
        return h if self._skip_lm_head or self.lm_head is None else self.lm_head(h)

    def _check_vision_allowed(self) -> None:
        if self.cp is not None and self.cp.size > 1:
            raise ConfigError(
                f"Qwen3.5 under context parallelism (parallelism.context_parallel_degree = {self.cp.size}) "
                "is text only: image/video inputs would need their vision tokens scattered before the "
                "sequence is sharded. Train on text-only data, or set context_parallel_degree = 1."
            )
        if self.vision_encoder is None:
            raise ConfigError(
                "this Qwen3.5 model was built text only (model.with_vision = false) but got image/video "
                "inputs; set model.with_vision = true (and context_parallel_degree = 1) to train on them."
            )


def titan_cp_config(config: Qwen35Model.Config, **fields) -> Qwen35CPModel.Config:
    """A TorchTitan Qwen3.5 config with titan_cp's CP layers (same shapes, inits and names).

    Every norm (the final one included) and RoPE become their dtype-following
    twins (float64 for float64 inputs; layers.dtype_following). ``fields``:
    :class:`Qwen35CPModel.Config` fields (kernel, cp_layout, cp_exchange,
    doc_masking, with_vision, expert_compute).
    """
    layers = []
    for layer in config.layers:
        values = _fields(layer) | {name: dtype_following(getattr(layer, name))
                                   for name in ("attention_norm", "ffn_norm")}
        if layer.attention is not None:
            attention = _fields(layer.attention) | {"inner_attention": RingAttention.Config()}
            attention |= {name: dtype_following(attention[name]) for name in ("q_norm", "k_norm", "rope")}
            values["attention"] = CPQwen35Attention.Config(**attention)
        if layer.delta_net is not None:
            delta_net = _fields(layer.delta_net)
            delta_net["norm"] = dtype_following(delta_net["norm"])
            values["delta_net"] = CPGatedDeltaNet.Config(**delta_net)
        if layer.moe is not None:
            routed = layer.moe.routed_experts
            experts = CPGroupedExperts.Config(**_fields(routed.inner_experts))
            values["moe"] = dataclasses.replace(layer.moe, routed_experts=dataclasses.replace(routed,
                                                                                           inner_experts=experts))
        layers.append(CPQwen35Block.Config(**values))
    norm = {"norm": dtype_following(config.norm)}
    return Qwen35CPModel.Config(**(_fields(config) | {"layers": layers} | norm | fields))
