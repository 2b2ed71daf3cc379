"""Qwen3.5 (TorchTitan's model, HF checkpoints) trained with titan_cp's context parallelism.

- :mod:`~titan_cp.models.qwen3_5.layers`: TorchTitan's GatedDeltaNet / gated attention / block with CP mixing
- :mod:`~titan_cp.models.qwen3_5.model`: the decoder (text only unless ``with_vision``) and config conversion
- :mod:`~titan_cp.models.qwen3_5.flavors`: TorchTitan's flavors, shapes, HF config.json fields
- :mod:`~titan_cp.models.qwen3_5.parallelize`: CP + TP + AC + compile + FSDP/HSDP
- :mod:`~titan_cp.models.qwen3_5.state_dict_adapter`: TorchTitan's HF adapter for text-only checkpoints too
- :mod:`~titan_cp.models.qwen3_5.preflight`: start-up checks
- :mod:`~titan_cp.models.qwen3_5.config_registry`: ModelSpec and TorchTitan config functions
"""

from titan_cp.models.qwen3_5.flavors import FLAVORS
from titan_cp.models.qwen3_5.model import Qwen35CPModel, titan_cp_config

__all__ = ["FLAVORS", "Qwen35CPModel", "titan_cp_config"]
