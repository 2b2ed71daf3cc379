"""titan_cp: exact context parallelism (CP) for Gated DeltaNet models, in TorchTitan or any PyTorch loop.

The public names (documented in docs/library.md; internals may move, these stay):

context and data
    cp_context(group_or_mesh, mesh_dim=, layout=, exchange=) -> CPContext
    shard_sequence(x, cp, dim=1), gather_sequence(x_local, cp, dim=1)
    packed_positions(doc_starts) -> positions restarting at 0 at every document start
    CORPUS_PATH, TOKENIZER_PATH: the shipped tiny corpus (jsonl) and tokenizer folder
models
    model_config(flavor, **fields) -> GDNModel.Config (``.build()`` makes the model); FLAVORS
    make_cp_aware(model, cp): titan_cp's GDN and attention layers run under ``cp``;
        refuses other sequence mixers
ops (your own layers)
    gated_delta_rule(q, k, v, g, beta, cp=, kernel=, scale=, initial_state_BHKV=, doc_starts_BT=)
    ring_attention(q, k, v, cp=, scale=, doc_ids_BT=)
planning
    estimate_cp_memory(model_config, seq_len, cp, ..., budget_gib=) -> CPMemoryEstimate
errors
    ConfigError: bad arguments, named, with a fix

Names are loaded on first use, so ``import titan_cp`` stays cheap.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "CPContext": "titan_cp.cp.context",
    "cp_context": "titan_cp.library.context",
    "shard_sequence": "titan_cp.library.context",
    "gather_sequence": "titan_cp.library.context",
    "packed_positions": "titan_cp.library.context",
    "CORPUS_PATH": "titan_cp.components.data",
    "TOKENIZER_PATH": "titan_cp.components.data",
    "model_config": "titan_cp.models.gdn.flavors",
    "FLAVORS": "titan_cp.models.gdn.flavors",
    "GDNModel": "titan_cp.models.gdn.model",
    "make_cp_aware": "titan_cp.library.model",
    "gated_delta_rule": "titan_cp.library.ops",
    "ring_attention": "titan_cp.library.ops",
    "estimate_cp_memory": "titan_cp.library.planning",
    "CPMemoryEstimate": "titan_cp.library.planning",
    "ConfigError": "titan_cp.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'titan_cp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
