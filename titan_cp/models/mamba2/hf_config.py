"""transformers' ``Mamba2Config`` (config.json, model_type ``mamba2``) <-> ``Mamba2Model.Config`` fields.

Fields, transformers -> titan_cp (one to one)::

    hidden_size        dim              num_hidden_layers   n_layers
    vocab_size         vocab_size       num_heads           num_heads
    head_dim           head_dim         state_size          ssm_state_size
    n_groups           ssm_n_groups     conv_kernel         conv_size
    layer_norm_epsilon norm_eps         tie_word_embeddings tie_embeddings

plus ``layer_pattern = "M"`` and ``hidden_dim = 0``; ``expand`` must equal num_heads x head_dim /
hidden_size (transformers sizes the conv and norm by expand, the heads by num_heads x head_dim).
Options that would compute something else are refused, naming the field (:data:`SUPPORTED_VALUES`:
biases on in_proj/out_proj, no conv bias, another activation, a time_step_limit other than
(0, inf)). Accepted without effect on fp32 numerics: ``residual_in_fp32`` (titan_cp keeps the
residual in the parameter dtype, fp32 in training), ``chunk_size`` (kernel tiling),
``rescale_prenorm_residual`` / ``time_step_*`` init ranges (initialisation only).
Folders (safetensors + config.json): :mod:`titan_cp.models.mamba2.hf_folder`.
"""

from __future__ import annotations

from typing import Any

from titan_cp.errors import ConfigError

MODEL_TYPE = "mamba2"
ARCHITECTURE = "Mamba2ForCausalLM"
FIELD_OF_KEY = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "vocab_size": "vocab_size",
    "num_heads": "num_heads",
    "head_dim": "head_dim",
    "state_size": "ssm_state_size",
    "n_groups": "ssm_n_groups",
    "conv_kernel": "conv_size",
    "layer_norm_epsilon": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}
SUPPORTED_VALUES = {"use_bias": (False,), "use_conv_bias": (True,), "hidden_act": ("silu", "swish")}


def _json_float(x) -> float:
    """A config.json number; transformers 5 writes infinities as {"__float__": "Infinity"}."""
    return float(x["__float__"] if isinstance(x, dict) else x)


def model_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """``GDNModel.Config`` field values of a transformers ``mamba2`` config dict (every shape field)."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"model.hf_config: model_type = {hf.get('model_type')!r}; the mamba2 family reads "
                          f"transformers Mamba-2 checkpoints (model_type '{MODEL_TYPE}').")
    for key, allowed in SUPPORTED_VALUES.items():
        if key in hf and hf[key] not in allowed:
            raise ConfigError(f"model.hf_config: {key} = {hf[key]!r} is not implemented by titan_cp's Mamba-2 layer "
                              f"(supported: {allowed[0]!r}).")
    limit = [_json_float(x) for x in hf.get("time_step_limit", (0.0, float("inf")))]
    if limit != [0.0, float("inf")]:
        raise ConfigError(f"model.hf_config: time_step_limit = {hf['time_step_limit']!r} is not implemented "
                          "(titan_cp's Mamba-2 layer clamps dt to the default (0.0, inf)).")
    if hf["num_heads"] * hf["head_dim"] != hf.get("expand", 2) * hf["hidden_size"]:
        raise ConfigError(f"model.hf_config: num_heads x head_dim = {hf['num_heads']} x {hf['head_dim']} != expand "
                          f"x hidden_size = {hf.get('expand', 2)} x {hf['hidden_size']}: transformers' Mamba-2 needs "
                          "them equal.")
    values = {field: hf[key] for key, field in FIELD_OF_KEY.items() if key in hf}
    values.update(layer_pattern="M", hidden_dim=0)
    return values


def hf_config_from_model(config, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                         dtype: str = "float32") -> dict[str, Any]:
    """transformers' ``config.json`` dict for a Mamba-2 ``GDNModel.Config`` (ConfigError if it cannot express it)."""
    from titan_cp.models.mamba2.state_dict_adapter import check_hf_expressible

    check_hf_expressible(config)
    expand = config.num_heads * config.head_dim / config.dim
    if expand != int(expand):
        raise ConfigError(f"model.num_heads x model.head_dim = {config.num_heads} x {config.head_dim} is not a whole "
                          f"multiple of model.dim = {config.dim}: transformers' Mamba2Config has an integer expand.")
    hf: dict[str, Any] = {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "expand": int(expand),
                          "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "rms_norm": True,
                          "residual_in_fp32": True, "time_step_limit": [0.0, {"__float__": "Infinity"}],
                          "dtype": dtype}
    hf.update({key: getattr(config, field) for key, field in FIELD_OF_KEY.items()})
    for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if value is not None:
            hf[key] = value
    return hf


__all__ = ["hf_config_from_model", "model_fields_from_hf"]
