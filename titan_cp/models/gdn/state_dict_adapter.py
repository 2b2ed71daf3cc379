"""TorchTitan ``StateDictAdapter`` between titan_cp's GDN model and FLA's Hugging Face format.

Parameter names, titan_cp -> FLA 0.6.0 ``GatedDeltaNetForCausalLM`` (``{i}`` a layer index)::

    tok_embeddings.weight                    model.embeddings.weight
    layers.{i}.attention_norm.weight         model.layers.{i}.attn_norm.weight
    layers.{i}.attention.<p>   (GDN layer)   model.layers.{i}.attn.<p>    the 13 GDN names are FLA's:
        q/k/v/a/b/g_proj.weight, q/k/v_conv1d.weight, A_log, dt_bias, o_norm.weight, o_proj.weight
    layers.{i}.attention.<p>   (KDA layer)   model.layers.{i}.attn.<p>    FLA's KimiDeltaAttention names
        (KDA_PARAMS; FLA's KDAForCausalLM has the same block, MLP and top-level names as GDN's)
    layers.{i}.attention.wq/wk/wv/wo.weight  model.layers.{i}.attn.q/k/v/o_proj.weight   (attention layer)
    layers.{i}.ffn_norm.weight               model.layers.{i}.mlp_norm.weight
    layers.{i}.feed_forward.w1/w3/w2.weight  model.layers.{i}.mlp.gate_proj/up_proj/down_proj.weight
    norm.weight                              model.norm.weight
    lm_head.weight                           lm_head.weight   (absent from HF when embeddings are tied)

Only names change: every tensor keeps its shape and values (both RoPEs are
rotate-half, so no q/k permutation as in TorchTitan's Llama adapter), which is
why the mapping also works on the sharded DTensors TorchTitan hands it during
``checkpoint.initial_load_in_hf`` / ``last_save_in_hf``.
"""

from __future__ import annotations

import re
from typing import Any

from torchtitan.protocols.state_dict_adapter import StateDictAdapter

# Names outside the layers (titan_cp -> FLA).
TOP_LEVEL = {
    "tok_embeddings.weight": "model.embeddings.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Names inside layer i, after "layers.{i}." / "model.layers.{i}." (titan_cp -> FLA).
IN_BLOCK = {
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
GDN_PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "a_proj.weight", "b_proj.weight",
              "g_proj.weight", "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight", "A_log", "dt_bias",
              "o_norm.weight", "o_proj.weight")
# FLA's KimiDeltaAttention (f_proj / g_proj are its two-layer low-rank projections).
KDA_PARAMS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_conv1d.weight", "k_conv1d.weight",
              "v_conv1d.weight", "f_proj.0.weight", "f_proj.1.weight", "b_proj.weight", "A_log", "dt_bias",
              "g_proj.0.weight", "g_proj.1.weight", "g_proj.1.bias", "o_norm.weight", "o_proj.weight")
ATTENTION_PARAMS = {"wq.weight": "q_proj.weight", "wk.weight": "k_proj.weight", "wv.weight": "v_proj.weight",
                    "wo.weight": "o_proj.weight"}


def block_names(layer_type: str) -> dict[str, str]:
    """titan_cp -> FLA names inside one block of type ``layer_type`` ('G', 'K' or 'A')."""
    names = dict(IN_BLOCK)
    if layer_type == "A":
        names.update({f"attention.{a}": f"attn.{b}" for a, b in ATTENTION_PARAMS.items()})
    else:
        names.update({f"attention.{p}": f"attn.{p}" for p in (KDA_PARAMS if layer_type == "K" else GDN_PARAMS)})
    return names


def to_hf_names(model_config) -> dict[str, str]:
    """Every titan_cp parameter name of ``model_config`` -> its FLA name."""
    names = {k: v for k, v in TOP_LEVEL.items() if not (k == "lm_head.weight" and model_config.tie_embeddings)}
    for i, layer_type in enumerate(model_config.layer_types()):
        for ours, theirs in block_names(layer_type).items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


class FLAStateDictAdapter(StateDictAdapter):
    """``state_dict_adapter`` of titan_cp's model spec: FLA ``gated_deltanet`` safetensors in and out.

    ``to_hf`` / ``from_hf`` rename (module docstring); an unexpected name raises
    a ``KeyError`` naming it (a checkpoint of another architecture or shape).
    """

    def __init__(self, model_config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        self.to_hf_map = to_hf_names(model_config)
        self.from_hf_map = {v: k for k, v in self.to_hf_map.items()}

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf = {}
        for key, value in state_dict.items():
            if key == "lm_head.weight" and self.model_config.tie_embeddings:
                continue  # FLA (like transformers) stores a tied head once, as the embedding
            if key not in self.to_hf_map:
                raise KeyError(f"titan_cp -> FLA: no FLA name for parameter '{key}' of this model shape")
            hf[self.to_hf_map[key]] = value
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = {}
        for key, value in hf_state_dict.items():
            if key not in self.from_hf_map:
                if key == "lm_head.weight" and self.model_config.tie_embeddings:
                    continue
                layer = re.match(r"model\.layers\.(\d+)\.", key)
                hint = f" (layer {layer.group(1)} is a different layer type or absent here)" if layer else ""
                raise KeyError(f"FLA -> titan_cp: checkpoint tensor '{key}' has no place in this model{hint}")
            state_dict[self.from_hf_map[key]] = value
        if self.model_config.tie_embeddings and "tok_embeddings.weight" in state_dict:
            state_dict["lm_head.weight"] = state_dict["tok_embeddings.weight"]
        return state_dict
