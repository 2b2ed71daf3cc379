"""Every family's TorchTitan config functions under one module, for ``--module titan_cp``.

TorchTitan 0.3.0's native entry point imports ``titan_cp.config_registry``
for ``--module titan_cp``::

    torchrun --nproc_per_node=2 -m torchtitan.train --module titan_cp --config gdn_debug \
        --parallelism.context_parallel_degree 2

Each family's own module answers too (``--module titan_cp.models.gdn``,
``--module titan_cp.models.qwen3_5``); this one only forwards to them. The
Qwen3.5 functions import TorchTitan's Qwen3.5 on first use.
"""

from __future__ import annotations

import importlib

from titan_cp.models.gdn.config_registry import (
    gdn_1_3b,
    gdn_1_3b_hybrid,
    gdn_340m,
    gdn_debug,
    gdn_debug_hybrid,
    gdn_from_hf,
)

QWEN3_5_CONFIGS = ("qwen3_5_debug", "qwen3_5_2b_128k", "qwen3_5_9b_256k")


def __getattr__(name: str):
    if name in QWEN3_5_CONFIGS:
        return getattr(importlib.import_module("titan_cp.models.qwen3_5.config_registry"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["gdn_1_3b", "gdn_1_3b_hybrid", "gdn_340m", "gdn_debug", "gdn_debug_hybrid", "gdn_from_hf",
           *QWEN3_5_CONFIGS]
