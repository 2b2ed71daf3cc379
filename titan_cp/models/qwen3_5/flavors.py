"""Qwen3.5 flavors: TorchTitan's ``qwen3_5_configs``, their text shapes, and shrunk variants.

A flavor name is one of TorchTitan's (``debugmodel``, ``0.8B``, ``2B``, ``4B``,
``9B``, ``27B``, MoE ``debugmodel_moe``, ``35B-A3B``, ...). :class:`TextShape`
is the decoder's shape; dense flavors accept shape overrides (``vocab_size=1024``,
``dim=32`` ...) and are rebuilt with TorchTitan's own config builders, so
inits and layer plan stay TorchTitan's. :func:`hf_text_config` /
:func:`shape_differences` relate a shape to a Hugging Face ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torchtitan.models.qwen3_5 as tt_qwen
from torchtitan.models.common import Embedding, Linear
from torchtitan.models.qwen3_5 import MRoPE, qwen3_5_configs

from titan_cp.errors import ConfigError, unknown_choice_message

FLAVORS = tuple(qwen3_5_configs)
MOE_FLAVORS = tuple(f for f in FLAVORS if "moe" in f or "-A" in f)


@dataclass
class TextShape:
    """The text decoder's hyper-parameters (HF ``config.json`` name in comments)."""

    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    vocab_size: int  # vocab_size
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim
    rotary_dim: int  # head_dim * rope_parameters.partial_rotary_factor
    hidden_dim: int | None  # intermediate_size (dense FFN; None for MoE)
    n_key_heads: int  # linear_num_key_heads
    n_value_heads: int  # linear_num_value_heads
    key_head_dim: int  # linear_key_head_dim
    value_head_dim: int  # linear_value_head_dim
    conv_kernel_size: int  # linear_conv_kernel_dim
    full_attention_interval: int  # layer_types: every Nth layer is full_attention
    rope_theta: float  # rope_parameters.rope_theta
    mrope_section: list[int] = field(default_factory=lambda: [11, 11, 10])  # rope_parameters.mrope_section
    max_seq_len: int = 262144


def shape_of(config) -> TextShape:
    """The :class:`TextShape` of a TorchTitan ``Qwen35Model.Config``."""
    attn = config.first_attention
    dn = next(layer.delta_net for layer in config.layers if layer.delta_net is not None)
    first_full = next(i for i, layer in enumerate(config.layers) if layer.attention is not None)
    ffn = config.layers[0].feed_forward
    return TextShape(
        dim=config.dim,
        n_layers=len(config.layers),
        vocab_size=config.vocab_size,
        n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads,
        head_dim=attn.head_dim,
        rotary_dim=attn.rotary_dim,
        hidden_dim=ffn.w1.out_features if ffn is not None else None,
        n_key_heads=dn.in_proj_q.out_features // dn.key_head_dim,
        n_value_heads=dn.in_proj_v.out_features // dn.value_head_dim,
        key_head_dim=dn.key_head_dim,
        value_head_dim=dn.value_head_dim,
        conv_kernel_size=dn.conv_kernel_size,
        full_attention_interval=first_full + 1,
        rope_theta=attn.rope.theta,
        mrope_section=list(attn.rope.mrope_section),
        max_seq_len=attn.rope.max_seq_len,
    )


def build_dense(shape: TextShape, vision_encoder) -> "tt_qwen.Qwen35Model.Config":
    """A dense TorchTitan Qwen3.5 config of ``shape``, made by TorchTitan's own builders."""
    s = shape
    layers = tt_qwen._build_qwen35_layers(
        rope=MRoPE.Config(dim=s.rotary_dim, max_seq_len=s.max_seq_len, theta=s.rope_theta,
                          mrope_section=list(s.mrope_section)),
        attn_backend="flex", n_layers=s.n_layers, dim=s.dim, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads,
        head_dim=s.head_dim, rotary_dim=s.rotary_dim, hidden_dim=s.hidden_dim, n_key_heads=s.n_key_heads,
        n_value_heads=s.n_value_heads, key_head_dim=s.key_head_dim, value_head_dim=s.value_head_dim,
        full_attention_interval=s.full_attention_interval,
    )
    for layer in layers:
        if layer.delta_net is not None and s.conv_kernel_size != layer.delta_net.conv_kernel_size:
            raise ConfigError(f"model.conv_kernel_size = {s.conv_kernel_size}: TorchTitan's Qwen3.5 builder "
                              f"fixes it at {layer.delta_net.conv_kernel_size}; keep the default.")
    return tt_qwen.Qwen35Model.Config(
        vocab_size=s.vocab_size,
        dim=s.dim,
        norm=tt_qwen._offset_norm(s.dim),
        tok_embeddings=Embedding.Config(num_embeddings=s.vocab_size, embedding_dim=s.dim,
                                        param_init=tt_qwen._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=s.dim, out_features=s.vocab_size,
                              param_init=tt_qwen._output_linear_init(s.dim)),
        layers=layers,
        vision_encoder=vision_encoder,
    )


def torchtitan_config(flavor: str, **shape_overrides) -> "tt_qwen.Qwen35Model.Config":
    """TorchTitan's config of ``flavor``, with :class:`TextShape` overrides for dense flavors."""
    if flavor not in FLAVORS:
        raise ConfigError(unknown_choice_message("model.flavor", flavor, FLAVORS))
    config = qwen3_5_configs[flavor](attn_backend="flex")
    if not shape_overrides:
        return config
    known = {f.name for f in dataclasses.fields(TextShape)}
    for key in shape_overrides:
        if key not in known:
            raise ConfigError(unknown_choice_message(f"model.{key} (a Qwen3.5 shape field)", key, known))
    if flavor in MOE_FLAVORS:
        return _resized_moe(config, flavor, **shape_overrides)
    shape = dataclasses.replace(shape_of(config), **shape_overrides)
    return build_dense(shape, config.vision_encoder)


def _resized_moe(config, flavor: str, vocab_size: int | None = None, n_layers: int | None = None, **other):
    """A MoE flavor with another vocabulary and / or its first ``n_layers`` layers (nothing else changes)."""
    if other:
        raise ConfigError(f"model.flavor = '{flavor}' is a MoE flavor: only vocab_size and n_layers can be "
                          f"overridden, not {', '.join(other)}.")
    if vocab_size is not None:
        config.vocab_size = vocab_size
        config.tok_embeddings = dataclasses.replace(config.tok_embeddings, num_embeddings=vocab_size)
        config.lm_head = dataclasses.replace(config.lm_head, out_features=vocab_size)
    if n_layers is not None:
        config.layers = config.layers[:n_layers]
    return config


# ---------------------------------------------------------------------------
# Hugging Face config.json
# ---------------------------------------------------------------------------


def _hf_values(shape: TextShape) -> dict[str, object]:
    """HF text-config field -> value implied by ``shape``."""
    s = shape
    layer_types = ["full_attention" if (i + 1) % s.full_attention_interval == 0 else "linear_attention"
                   for i in range(s.n_layers)]
    values = {
        "hidden_size": s.dim, "num_hidden_layers": s.n_layers, "vocab_size": s.vocab_size,
        "num_attention_heads": s.n_heads, "num_key_value_heads": s.n_kv_heads, "head_dim": s.head_dim,
        "linear_num_key_heads": s.n_key_heads, "linear_num_value_heads": s.n_value_heads,
        "linear_key_head_dim": s.key_head_dim, "linear_value_head_dim": s.value_head_dim,
        "linear_conv_kernel_dim": s.conv_kernel_size, "layer_types": layer_types,
        "rope_parameters.rope_theta": s.rope_theta,
        "rope_parameters.partial_rotary_factor": s.rotary_dim / s.head_dim,
        "rope_parameters.mrope_section": list(s.mrope_section),
    }
    if s.hidden_dim is not None:
        values["intermediate_size"] = s.hidden_dim
    return values


def hf_text_config(shape: TextShape) -> dict[str, object]:
    """Keyword arguments for ``transformers.Qwen3_5TextConfig`` describing ``shape`` (no tied embeddings)."""
    values = _hf_values(shape)
    rope = {k.split(".", 1)[1]: values.pop(k) for k in list(values) if k.startswith("rope_parameters.")}
    return values | {"rope_parameters": {"rope_type": "default", **rope}, "tie_word_embeddings": False,
                     "rms_norm_eps": 1e-6}


def _lookup(text_config: dict, dotted: str):
    value = text_config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def shape_differences(shape: TextShape, hf_config: dict) -> list[str]:
    """``'field: checkpoint X, flavor Y'`` for every HF field of ``config.json`` that disagrees with ``shape``.

    ``hf_config`` is the parsed ``config.json`` (a multimodal one keeps the
    text part under ``text_config``). Fields absent from the file are skipped.
    """
    text = hf_config.get("text_config", hf_config)
    out = []
    for name, expected in _hf_values(shape).items():
        found = _lookup(text, name)
        if found is None and "." in name:  # older files keep rope fields at the top level
            found = _lookup(text, name.split(".", 1)[1])
        if found is None:
            continue
        same = abs(float(found) - float(expected)) < 1e-9 if isinstance(expected, float) else found == expected
        if not same:
            out.append(f"{name}: checkpoint {found!r}, flavor {expected!r}")
    return out
