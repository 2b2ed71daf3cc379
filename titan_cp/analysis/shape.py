"""Model shapes for the estimator and the scale model: ``GDNModel.Config``, read one way.

The analysis reads the model's own config (``titan_cp.models.gdn.model_config(flavor)``
or any ``GDNModel.Config``); :class:`Dims` names the derived sizes once:
H key heads of dim K, Hv value heads of dim V = K * expand_v, Dk = H K, Dv = Hv V.

Named shapes (:data:`SHAPES`): the ``340M`` and ``1.3B`` flavors (FLA's
published GDN configs) and ``7B-like`` (an assumption: no GDN of that size is
published; the 1.3B flavor widened to hidden 4096, 32 layers, 16 heads x 256,
FLA's MLP rule).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    """Sizes derived from a ``GDNModel.Config`` (``Dims.of(config)``)."""

    dim: int
    n_layers: int
    H: int  # key heads
    Hv: int  # value heads
    K: int  # key head dim
    V: int  # value head dim
    conv_size: int
    hidden: int  # SwiGLU hidden size
    vocab: int
    tied: bool
    n_attn: int = 0  # softmax attention blocks of a hybrid ('A' in model.layer_pattern); the rest are GDN
    attn_heads: int = 0  # their query heads, kv heads and head dim
    attn_kv_heads: int = 0
    attn_head_dim: int = 0

    @classmethod
    def of(cls, config, allow_attention: bool = False) -> "Dims":
        """The sizes of ``config`` (a ``GDNModel.Config``; a ``Dims`` is returned as is).

        Hybrid models (attention blocks) only where the caller models them (``allow_attention``:
        the memory estimator); the scale model prices GDN blocks only.
        """
        if not isinstance(config, Dims):
            n_attn = config.layer_types().count("A")
            config = cls(
                dim=config.dim, n_layers=config.n_layers, H=config.num_heads,
                Hv=config.num_v_heads or config.num_heads, K=config.head_dim,
                V=int(config.head_dim * config.expand_v), conv_size=config.conv_size,
                hidden=config.hidden_dim, vocab=config.vocab_size, tied=config.tie_embeddings,
                n_attn=n_attn, attn_heads=config.attn_num_heads if n_attn else 0,
                attn_kv_heads=config.attn_num_kv_heads if n_attn else 0,
                attn_head_dim=config.attn_head_dim if n_attn else 0,
            )
        if config.n_attn and not allow_attention:
            raise ValueError(
                f"a hybrid model ({config.n_attn} attention blocks): this analysis models GDN blocks only; "
                "use an all-GDN config (model.layer_pattern = '')."
            )
        return config

    @property
    def n_gdn(self) -> int:
        return self.n_layers - self.n_attn

    @property
    def key_dim(self) -> int:
        return self.H * self.K

    @property
    def value_dim(self) -> int:
        return self.Hv * self.V


def fla_mlp_hidden(dim: int, hidden_ratio: float = 4.0) -> int:
    """FLA's GatedMLP hidden size: int(dim * ratio * 2/3) rounded up to a multiple of 256."""
    h = int(dim * hidden_ratio * 2 / 3)
    return 256 * ((h + 255) // 256)


SHAPE_SOURCES = {
    "340M": "FLA/flame configs/gated_deltanet_340M.json (hidden 1024, 21 layers, 6 heads x 256, "
            "expand_v 2, vocab 32000, untied); counts ~0.51B parameters",
    "1.3B": "FLA/flame configs/gated_deltanet_1B.json (= FLA GatedDeltaNetConfig defaults: "
            "hidden 2048, 21 layers, 6 heads x 256, expand_v 2)",
    "7B-like": "ASSUMPTION, no published GDN config: hidden 4096, 32 layers, 16 heads x 256, "
               "expand_v 2, FLA MLP rule; counts ~8.9B parameters",
}


def named_shape(name: str, **overrides):
    """The ``GDNModel.Config`` of a named shape (:data:`SHAPE_SOURCES`) or any model flavor."""
    from titan_cp.models.gdn import model_config

    if name == "7B-like":
        return model_config("1.3B", dim=4096, n_layers=32, num_heads=16, hidden_dim=fla_mlp_hidden(4096), **overrides)
    return model_config(name, **overrides)


def parse_shape(spec: str) -> tuple[str, object]:
    """``name`` or ``name:field=value,...`` (model fields) -> (name, ``GDNModel.Config``).

    ``name`` is a shape of :data:`SHAPE_SOURCES` or a model flavor, e.g.
    ``340M:num_heads=8,head_dim=128``.
    """
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"shape '{spec}': want name or name:field=value,... (model fields), got '{item}'")
        overrides[key] = _parse_value(value)
    return (spec if overrides else name), named_shape(name, **overrides)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def layer_param_counts(model) -> dict[str, int]:
    """Parameters of one block of ``model`` (a ``GDNModel.Config``), by module (bias-free linears and convs)."""
    d = Dims.of(model, allow_attention=True)
    return {
        "attention_norm": d.dim,
        "q_proj": d.dim * d.key_dim,
        "k_proj": d.dim * d.key_dim,
        "v_proj": d.dim * d.value_dim,
        "a_proj": d.dim * d.Hv,
        "b_proj": d.dim * d.Hv,
        "g_proj": d.dim * d.value_dim,
        "convs": d.conv_size * (2 * d.key_dim + d.value_dim),  # depthwise: one kernel per channel
        "A_log_dt_bias": 2 * d.Hv,
        "o_norm": d.V,  # one weight of size V shared by the heads (FLA, Qwen3.5)
        "o_proj": d.value_dim * d.dim,
        "ffn_norm": d.dim,
        "mlp": 3 * d.dim * d.hidden,  # w1, w3: dim -> hidden; w2: hidden -> dim
    }


def attention_layer_param_counts(model) -> dict[str, int]:
    """Parameters of one softmax-attention block of a hybrid (titan_cp/models/gdn/attention.py: no biases)."""
    d = Dims.of(model, allow_attention=True)
    q_width, kv_width = d.attn_heads * d.attn_head_dim, d.attn_kv_heads * d.attn_head_dim
    return {
        "attention_norm": d.dim,
        "wq": d.dim * q_width,
        "wk_wv": 2 * d.dim * kv_width,
        "wo": q_width * d.dim,
        "ffn_norm": d.dim,
        "mlp": 3 * d.dim * d.hidden,
    }


# modules whose parameters TP does not shard
_REPLICATED_UNDER_TP = ("attention_norm", "o_norm", "ffn_norm", "final_norm")


def param_counts(model) -> dict[str, int]:
    """Totals of ``model``: per layer (the largest block kind), all layers, embedding, final norm,
    lm_head, total, tp-replicated part. Hybrids count their attention blocks."""
    d = Dims.of(model, allow_attention=True)
    kinds = [(d.n_gdn, layer_param_counts(d))]
    if d.n_attn:
        kinds.append((d.n_attn, attention_layer_param_counts(d)))
    layers = sum(n * sum(counts.values()) for n, counts in kinds)
    embedding = d.vocab * d.dim
    lm_head = 0 if d.tied else d.dim * d.vocab
    total = layers + embedding + d.dim + lm_head
    replicated = sum(n * sum(c[k] for k in _REPLICATED_UNDER_TP if k in c) for n, c in kinds) + d.dim
    return {
        "layer": max(sum(counts.values()) for n, counts in kinds if n),
        "layers": layers,
        "embedding": embedding,
        "final_norm": d.dim,
        "lm_head": lm_head,
        "total": total,
        "tp_replicated": replicated,
    }
