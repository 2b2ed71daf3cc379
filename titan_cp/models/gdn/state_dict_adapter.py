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

from titan_cp.models.common.state_dict_adapter import RenamingStateDictAdapter

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


class FLAStateDictAdapter(RenamingStateDictAdapter):
    """``state_dict_adapter`` of titan_cp's model spec: FLA ``gated_deltanet`` safetensors in and out.

    ``to_hf`` / ``from_hf`` rename (module docstring); an unexpected name raises
    a ``KeyError`` naming it (a checkpoint of another architecture or shape).
    """

    hf_format = "FLA"
    to_hf_names = staticmethod(to_hf_names)
