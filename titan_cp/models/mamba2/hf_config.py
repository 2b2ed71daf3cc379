"""transformers' ``Mamba2Config`` (config.json, model_type ``mamba2``) <-> ``GDNModel.Config``, and HF folders.

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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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


def model_config_from_hf(hf: dict[str, Any], **overrides):
    """``GDNModel.Config`` of a transformers ``mamba2`` config dict, then field ``overrides`` (e.g. kernel)."""
    from titan_cp.models.gdn.model import GDNModel

    return GDNModel.Config(**{**model_fields_from_hf(hf), **overrides})


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


def load_hf_folder(path: str | Path, *, kernel: str = "torch", device: str | torch.device = "cpu"):
    """A ready (eval) Mamba-2 ``GDNModel`` from a transformers ``Mamba2ForCausalLM`` folder."""
    from titan_cp.models.gdn.hf_folder import build_model, load_hf_state_dict, read_hf_config
    from titan_cp.models.mamba2.state_dict_adapter import Mamba2StateDictAdapter

    model_config = model_config_from_hf(read_hf_config(path), kernel=kernel)
    model = build_model(model_config, device)
    model.load_state_dict(Mamba2StateDictAdapter(model_config, None).from_hf(load_hf_state_dict(path)), strict=True)
    return model.eval()


def save_hf_folder(model, out: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` that transformers' ``Mamba2ForCausalLM.from_pretrained`` reads."""
    import json

    from safetensors.torch import save_file

    from titan_cp.models.mamba2.state_dict_adapter import Mamba2StateDictAdapter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = Mamba2StateDictAdapter(model.config, None).to_hf(model.state_dict())
    save_file({k: v.detach().contiguous() for k, v in hf.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    dtype = str(next(iter(hf.values())).dtype).split(".")[-1]
    (out / "config.json").write_text(json.dumps(hf_config_from_model(model.config, dtype=dtype), indent=2) + "\n")
    return out


__all__ = ["hf_config_from_model", "load_hf_folder", "model_config_from_hf", "model_fields_from_hf",
           "save_hf_folder"]
