"""FLA's Hugging Face ``config.json`` (model_type ``gated_deltanet`` or ``kda``) <-> ``GDNModel.Config``.

FLA 0.6.0's ``GatedDeltaNetConfig`` / ``KDAConfig`` fields and titan_cp's, one to one
(the two configs share these fields; the model_type picks the linear layer letter of
``layer_pattern``: ``G`` for gated_deltanet, ``K`` for kda, :data:`FORMATS`):

    hidden_size        dim                 num_hidden_layers  n_layers
    vocab_size         vocab_size          num_heads          num_heads
    head_dim           head_dim            expand_v           expand_v
    num_v_heads        num_v_heads         conv_size          conv_size
    intermediate_size  hidden_dim          norm_eps           norm_eps
    tie_word_embeddings tie_embeddings

Hybrid models: FLA puts softmax attention on the layers listed in
``attn = {"layers": [...], "num_heads", "num_kv_heads", "rope_theta", ...}``
(``fla.models.configuration_utils.AttentionSpec``); titan_cp writes the same
layers as ``layer_pattern`` (one letter per layer, cycled: ``G`` GDN, ``A``
attention) plus ``attn_num_heads`` / ``attn_num_kv_heads`` / ``attn_head_dim``
/ ``rope_theta``. FLA's attention has ``head_dim = hidden_size / num_heads``,
rotate-half RoPE on the whole head and no q/k norm or bias -- what
:class:`titan_cp.models.gdn.attention.Attention` computes.

FLA options titan_cp's layers do not implement (no short conv, no output gate,
negative eigenvalues, PowLU, attention residuals, sliding windows, qkv bias,
q/k norm) raise :class:`titan_cp.errors.ConfigError` naming the field instead of
loading into a different model. FLA's ``intermediate_size`` is always written
explicitly: its default (``hidden_ratio``, rounded to 256) differs from
titan_cp's flavors; reading a config.json without it applies FLA's rule.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from titan_cp.errors import ConfigError

MODEL_TYPE = "gated_deltanet"
ARCHITECTURE = "GatedDeltaNetForCausalLM"
# FLA model_type -> (titan_cp layer letter of its linear layers, FLA architecture).
FORMATS = {MODEL_TYPE: ("G", ARCHITECTURE), "kda": ("K", "KDAForCausalLM")}

# config.json key -> GDNModel.Config field (the direct copies).
FIELD_OF_KEY = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "vocab_size": "vocab_size",
    "num_heads": "num_heads",
    "head_dim": "head_dim",
    "expand_v": "expand_v",
    "num_v_heads": "num_v_heads",
    "conv_size": "conv_size",
    "intermediate_size": "hidden_dim",
    "norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}
# FLA fields whose only value titan_cp implements (FLA's default first, then accepted aliases).
SUPPORTED_VALUES = {
    "use_gate": (True,),
    "use_short_conv": (True,),
    "allow_neg_eigval": (False,),
    "hidden_act": ("swish", "silu"),
    "output_gate_activation": ("swish", "silu"),
    "attnres_block_size": (None,),
    "use_l2warp": (False,),
    "safe_gate": (False,),  # KDA
    "lower_bound": (None,),  # KDA
}
ATTN_SUPPORTED_VALUES = {"window_size": (None,), "qkv_bias": (False,), "qk_norm": (False,)}  # absent = default


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` as a dict; ``path`` is the file or the folder holding it."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"model.hf_config = '{path}': no config.json there; point it at an FLA Hugging Face "
                          "checkpoint folder or its config.json.")
    with open(file) as f:
        return json.load(f)


def attention_layers(hf: dict[str, Any]) -> tuple[list[int], dict[str, Any] | None]:
    """The attention layer indices and their (single) spec from FLA's ``attn`` field."""
    attn = hf.get("attn")
    if attn is None:
        return [], None
    specs = [attn] if isinstance(attn, dict) else list(attn)
    if len(specs) != 1:
        raise ConfigError(f"model.hf_config: attn has {len(specs)} specifications; titan_cp supports one "
                          "attention shape for all attention layers.")
    spec = specs[0]
    return sorted(spec["layers"]), spec


def _shortest_period(pattern: str) -> str:
    """The shortest string whose cycle over len(pattern) letters gives ``pattern`` ('GGGAGGGA' -> 'GGGA')."""
    for p in range(1, len(pattern) + 1):
        if all(pattern[i] == pattern[i % p] for i in range(len(pattern))):
            return pattern[:p]
    return pattern


def model_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """``GDNModel.Config`` field values of an FLA ``gated_deltanet`` / ``kda`` config dict (every shape field)."""
    model_type = hf.get("model_type")
    if model_type not in FORMATS:
        raise ConfigError(f"model.hf_config: model_type = {model_type!r}; titan_cp reads FLA Gated DeltaNet and "
                          f"KDA checkpoints (model_type in {sorted(FORMATS)}).")
    letter = FORMATS[model_type][0]
    for key, allowed in SUPPORTED_VALUES.items():
        if key in hf and hf[key] not in allowed:
            raise ConfigError(f"model.hf_config: {key} = {hf[key]!r} is not supported by titan_cp's GDN layers "
                              f"(supported: {allowed[0]!r}).")
    values = {field: hf[key] for key, field in FIELD_OF_KEY.items() if key in hf}
    if hf.get("intermediate_size") is None:  # FLA's GatedMLP rule: 2/3 * hidden * ratio, rounded up to 256
        ratio = hf.get("hidden_ratio") or 4
        values["hidden_dim"] = 256 * -(-int(hf["hidden_size"] * ratio * 2 / 3) // 256)
    values["layer_pattern"] = "" if letter == "G" else letter
    layers, spec = attention_layers(hf)
    if spec is not None:
        for key, allowed in ATTN_SUPPORTED_VALUES.items():
            if spec.get(key, allowed[0]) not in allowed:
                raise ConfigError(f"model.hf_config: attn.{key} = {spec.get(key)!r} is not supported "
                                  f"(supported: {allowed[0]!r}).")
        n_layers = values["n_layers"]
        pattern = "".join("A" if i in layers else letter for i in range(n_layers))
        values.update(
            layer_pattern=_shortest_period(pattern),
            attn_num_heads=spec["num_heads"],
            attn_num_kv_heads=spec.get("num_kv_heads") or spec["num_heads"],
            attn_head_dim=values["dim"] // spec["num_heads"],
            rope_theta=float(spec.get("rope_theta", 10000.0)),
        )
    return values


def model_config_from_hf(hf: dict[str, Any], **overrides):
    """``GDNModel.Config`` of an FLA ``gated_deltanet`` config dict, then field ``overrides`` (e.g. kernel)."""
    from titan_cp.models.gdn.model import GDNModel

    return GDNModel.Config(**{**model_fields_from_hf(hf), **overrides})


def hf_config_from_model(config, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                         dtype: str = "float32") -> dict[str, Any]:
    """FLA's ``config.json`` dict for a titan_cp ``GDNModel.Config`` (ConfigError if FLA cannot express it):
    ``gated_deltanet`` for G (+ A) layers, ``kda`` for K (+ A) layers."""
    types = config.layer_types()
    if "M" in types:
        raise ConfigError(f"model.layer_pattern = '{config.layer_pattern}' has Mamba-2 (M) layers, which FLA's GDN / KDA "
                          "format cannot hold: transformers' Mamba2ForCausalLM holds layer_pattern = 'M' (model.name = 'mamba2').")
    if "G" in types and "K" in types:
        raise ConfigError(f"model.layer_pattern = '{config.layer_pattern}' mixes G and K layers; an FLA checkpoint "
                          "has one linear layer type (gated_deltanet or kda): use G or K (+ A) only.")
    model_type = "kda" if "K" in types else MODEL_TYPE
    hf: dict[str, Any] = {"model_type": model_type, "architectures": [FORMATS[model_type][1]]}
    for key, field in FIELD_OF_KEY.items():
        hf[key] = getattr(config, field)
    if hf["num_v_heads"] in (None, config.num_heads):
        hf["num_v_heads"] = None
    if "A" in types:
        if config.attn_num_heads * config.attn_head_dim != config.dim:
            raise ConfigError(
                f"model.attn_num_heads x model.attn_head_dim = {config.attn_num_heads} x {config.attn_head_dim} "
                f"!= model.dim = {config.dim}: FLA's attention layer has head_dim = hidden_size / num_heads, so "
                "this hybrid cannot be written in FLA's format."
            )
        hf["attn"] = {
            "layers": [i for i, t in enumerate(types) if t == "A"],
            "num_heads": config.attn_num_heads,
            "num_kv_heads": config.attn_num_kv_heads,
            "qkv_bias": False,
            "window_size": None,
            "rope_theta": config.rope_theta,
        }
    else:
        hf["attn"] = None
    hf.update(attn_mode="chunk", use_short_conv=True, allow_neg_eigval=False, hidden_act="swish", dtype=dtype)
    if model_type == "kda":
        hf.update(safe_gate=False, lower_bound=None)
    else:
        hf.update(use_gate=True, output_gate_activation="swish")
    if bos_token_id is not None:
        hf["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        hf["eos_token_id"] = eos_token_id
    return hf


def same_shape(a, b) -> bool:
    """Two ``GDNModel.Config`` describe the same weights and computation (run-time fields ignored)."""
    runtime = {"kernel", "cp_exchange", "cp_layout", "cp_q_transition", "doc_masking"}
    if a.layer_types() != b.layer_types():
        return False
    fields = [f.name for f in dataclasses.fields(a) if not f.name.startswith("_") and f.name not in runtime
              and f.name != "layer_pattern" and ("A" in a.layer_types() or not f.name.startswith(("attn_", "rope")))]
    return all(getattr(a, f) == getattr(b, f) for f in fields)
