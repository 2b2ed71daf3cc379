"""GDN model flavors as Python (TorchTitan's shape: ``llama3_configs``-style dict of field values).

``model_config(flavor, **overrides)`` turns a flavor into ``GDNModel.Config``.
The shapes travel with the package (no files outside it), so an installed
wheel has every flavor.
"""

from __future__ import annotations

import dataclasses

from titan_cp.errors import unknown_choice_message

_DEBUG = dict(dim=64, n_layers=2, vocab_size=2048, num_heads=4, head_dim=16, expand_v=2.0, conv_size=4,
              hidden_dim=128)
_HYBRID_ATTENTION = dict(layer_pattern="GGGA", rope_theta=10000.0)

gdn_configs: dict[str, dict] = {
    # Tiny GDN for CPU tests and the default CPU run.
    "debug": _DEBUG,
    # Tiny hybrid (3 GDN : 1 softmax attention, Qwen3-Next style): the debug shape, 4 layers, attention last.
    "debug_hybrid": {**_DEBUG, "n_layers": 4, **_HYBRID_ATTENTION, "attn_num_heads": 4, "attn_num_kv_heads": 2,
                     "attn_head_dim": 16},
    # FLA's gated_deltanet 340M shape (6 heads x 256 at hidden 1024, ~0.5B parameters untied).
    "340M": dict(dim=1024, n_layers=21, vocab_size=32000, num_heads=6, head_dim=256, expand_v=2.0, conv_size=4,
                 hidden_dim=2816, norm_eps=1e-6),
    # FLA's gated_deltanet 1.3B shape (its layer defaults: 6 heads x 256, expand_v 2).
    "1.3B": dict(dim=2048, n_layers=21, vocab_size=32000, num_heads=6, head_dim=256, expand_v=2.0, conv_size=4,
                 hidden_dim=5632, norm_eps=1e-6),
}
# The 1.3B shape as a 3:1 hybrid: every 4th layer softmax attention (GQA 16 / 4 x 128, RoPE; ring
# attention under CP); 24 layers = 18 GDN + 6 attention.
gdn_configs["1.3B_hybrid"] = {**gdn_configs["1.3B"], "n_layers": 24, **_HYBRID_ATTENTION, "attn_num_heads": 16,
                              "attn_num_kv_heads": 4, "attn_head_dim": 128}

FLAVORS = tuple(sorted(gdn_configs))


def model_config(flavor: str, *, flavors: dict[str, dict] | None = None, **overrides):
    """``GDNModel.Config`` of ``flavor`` with field ``overrides`` (e.g. n_layers=1, kernel="recurrent");
    ``flavors``: another family's table of the same decoder (default: the GDN flavors)."""
    from titan_cp.models.gdn.model import GDNModel

    flavors = gdn_configs if flavors is None else flavors
    if flavor not in flavors:
        raise ValueError(unknown_choice_message("model.flavor", flavor, tuple(sorted(flavors))))
    values = {**flavors[flavor], **overrides}
    known = {f.name for f in dataclasses.fields(GDNModel.Config) if not f.name.startswith("_")}
    for key in values:
        if key not in known:
            raise ValueError(unknown_choice_message(f"model.{key} (a model field)", key, known))
    return GDNModel.Config(**values)
