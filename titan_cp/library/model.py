"""Make a titan_cp model CP-aware outside TorchTitan."""

from __future__ import annotations

from torch import nn

from titan_cp.cp.context import CPContext
from titan_cp.errors import ConfigError
from titan_cp.models.common.parallelize import apply_cp


def make_cp_aware(model: nn.Module, cp: CPContext | None) -> nn.Module:
    """Run every titan_cp GDN and attention layer of ``model`` under ``cp`` (None: no CP).

    Call it before FSDP / TP wrapping. Afterwards ``model(tokens_local, positions=positions_local)``
    takes this rank's shards (``titan_cp.shard_sequence``) and computes exactly what the model
    computes on whole sequences. Raises ``ConfigError`` if the model holds a sequence mixer titan_cp
    does not know (``nn.Conv1d``, ``nn.MultiheadAttention``, RNNs, TorchTitan attention): it would
    silently see only this rank's shard.
    """
    try:
        apply_cp(model, cp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model
