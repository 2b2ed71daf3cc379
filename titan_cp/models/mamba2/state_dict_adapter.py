"""TorchTitan ``StateDictAdapter`` between titan_cp's Mamba-2 LM and transformers' ``Mamba2ForCausalLM``.

Parameter names, titan_cp -> transformers 5.6.2 (``{i}`` a layer index)::

    tok_embeddings.weight              backbone.embeddings.weight
    layers.{i}.attention_norm.weight   backbone.layers.{i}.norm.weight
    layers.{i}.attention.<p>           backbone.layers.{i}.mixer.<p>   transformers' Mamba2Mixer names (MIXER_PARAMS):
        in_proj.weight, conv1d.weight, conv1d.bias, dt_bias, A_log, D, norm.weight, out_proj.weight
    norm.weight                        backbone.norm_f.weight
    lm_head.weight                     lm_head.weight   (absent from the folder when embeddings are tied)

Only names change (every tensor keeps its shape and values), so the mapping also works on the
sharded DTensors TorchTitan hands it (``checkpoint.initial_load_in_hf`` / ``last_save_in_hf``).
transformers' format has Mamba-2 blocks only: a model with other layer letters or an MLP
(``hidden_dim`` > 0) raises :class:`titan_cp.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from titan_cp.errors import ConfigError
from titan_cp.models.common.state_dict_adapter import RenamingStateDictAdapter

TOP_LEVEL = {
    "tok_embeddings.weight": "backbone.embeddings.weight",
    "norm.weight": "backbone.norm_f.weight",
    "lm_head.weight": "lm_head.weight",
}
MIXER_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                "out_proj.weight")


def check_hf_expressible(model_config) -> None:
    """transformers' Mamba2ForCausalLM holds this model: all layers 'M', no MLP."""
    if set(model_config.layer_types()) != {"M"}:
        raise ConfigError(f"model.layer_pattern = '{model_config.layer_pattern}': transformers' Mamba2ForCausalLM "
                          "has Mamba-2 layers only; use layer_pattern = 'M' to write or read its format.")
    if model_config.hidden_dim:
        raise ConfigError(f"model.hidden_dim = {model_config.hidden_dim}: transformers' Mamba-2 blocks have no MLP; "
                          "set hidden_dim = 0 for its format.")


def to_hf_names(model_config) -> dict[str, str]:
    """Every titan_cp parameter name of ``model_config`` -> its transformers name."""
    check_hf_expressible(model_config)
    names = {k: v for k, v in TOP_LEVEL.items() if not (k == "lm_head.weight" and model_config.tie_embeddings)}
    for i in range(model_config.n_layers):
        names[f"layers.{i}.attention_norm.weight"] = f"backbone.layers.{i}.norm.weight"
        names.update({f"layers.{i}.attention.{p}": f"backbone.layers.{i}.mixer.{p}" for p in MIXER_PARAMS})
    return names


class Mamba2StateDictAdapter(RenamingStateDictAdapter):
    """``state_dict_adapter`` of the Mamba-2 model spec: transformers ``mamba2`` safetensors in and out.

    An unexpected name raises a ``KeyError`` naming it (a checkpoint of another architecture or shape).
    """

    hf_format = "transformers' Mamba-2"
    to_hf_names = staticmethod(to_hf_names)


__all__ = ["MIXER_PARAMS", "Mamba2StateDictAdapter", "check_hf_expressible", "to_hf_names"]
