"""KDA flavors: field values of titan_cp's GDN LM (``GDNModel.Config``) with KDA layers.

FLA's ``KDAForCausalLM`` is the GDN LM's decoder (same block, MLP and names) with
``fla.layers.KimiDeltaAttention`` as the mixer: ``layer_pattern`` ``K`` (all KDA) or
``K``s and ``A``s (hybrid with softmax attention, as Kimi Linear's 3:1).
"""

from __future__ import annotations

from titan_cp.models.gdn.flavors import model_config as gdn_model_config

_DEBUG = dict(dim=64, n_layers=2, vocab_size=2048, num_heads=4, head_dim=16, expand_v=1.0, conv_size=4,
              hidden_dim=128, layer_pattern="K")

kda_configs: dict[str, dict] = {
    # Tiny KDA for CPU tests and the CPU CP run.
    "kda_debug": _DEBUG,
    # Tiny 3:1 KDA / softmax-attention hybrid (Kimi Linear's ratio), attention last.
    "kda_debug_hybrid": {**_DEBUG, "n_layers": 4, "layer_pattern": "KKKA", "attn_num_heads": 4,
                         "attn_num_kv_heads": 2, "attn_head_dim": 16},
}

FLAVORS = tuple(sorted(kda_configs))


def model_config(flavor: str, **overrides):
    """``GDNModel.Config`` of the KDA ``flavor`` with field ``overrides``."""
    return gdn_model_config(flavor, flavors=kda_configs, **overrides)


__all__ = ["FLAVORS", "kda_configs", "model_config"]
