"""Mamba-2 flavors: field values of titan_cp's GDN LM (``GDNModel.Config``) with Mamba-2 layers.

``num_heads`` x ``head_dim`` = H x P (transformers' num_heads, head_dim; E = H P = expand x dim),
``ssm_state_size`` N, ``ssm_n_groups`` G, ``conv_size`` W, ``hidden_dim = 0`` (no MLP). The real sizes
are the state-spaces/mamba2-* shapes as transformers' Mamba2Config gives them (expand 2, head_dim 64,
state 128, one group, conv 4, vocab 50288 = GPT-NeoX's padded to 16, tied embeddings).
"""

from __future__ import annotations

from titan_cp.models.gdn.flavors import model_config as gdn_model_config

_DEBUG = dict(dim=64, n_layers=2, vocab_size=2048, num_heads=4, head_dim=32, ssm_state_size=16, ssm_n_groups=1,
              conv_size=4, hidden_dim=0, norm_eps=1e-5, layer_pattern="M")


def _real(dim: int, n_layers: int) -> dict:
    return dict(dim=dim, n_layers=n_layers, vocab_size=50288, num_heads=2 * dim // 64, head_dim=64,
                ssm_state_size=128, ssm_n_groups=1, conv_size=4, hidden_dim=0, norm_eps=1e-5, layer_pattern="M",
                tie_embeddings=True)


mamba2_configs: dict[str, dict] = {
    # Tiny Mamba-2 for CPU tests and the CPU CP run.
    "mamba2_debug": _DEBUG,
    # Tiny Mamba-2 / softmax-attention hybrid (3:1, attention last; no transformers format).
    "mamba2_debug_hybrid": {**_DEBUG, "n_layers": 4, "layer_pattern": "MMMA", "attn_num_heads": 4,
                            "attn_num_kv_heads": 2, "attn_head_dim": 16},
    "130m": _real(768, 24),
    "370m": _real(1024, 48),
    "780m": _real(1536, 48),
    "1.3b": _real(2048, 48),
    "2.7b": _real(2560, 64),
}

FLAVORS = tuple(sorted(mamba2_configs))


def model_config(flavor: str, **overrides):
    """``Mamba2Model.Config`` (the GDN LM's fields) of the Mamba-2 ``flavor`` with field ``overrides``."""
    from titan_cp.models.mamba2.model import Mamba2Model

    return Mamba2Model.Config.of(gdn_model_config(flavor, flavors=mamba2_configs, **overrides))


__all__ = ["FLAVORS", "mamba2_configs", "model_config"]
