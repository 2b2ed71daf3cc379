"""Qwen3.5 (TorchTitan's model, HF checkpoints) trained with titan_cp's context parallelism.

- :mod:`~titan_cp.qwen3_5.layers`: TorchTitan's GatedDeltaNet / gated attention / block with CP mixing
- :mod:`~titan_cp.qwen3_5.model`: the decoder (text only unless ``with_vision``) and config conversion
- :mod:`~titan_cp.qwen3_5.flavors`: TorchTitan's flavors, shapes, HF config.json fields
- :mod:`~titan_cp.qwen3_5.parallelize`: CP + TP + AC + compile + FSDP/HSDP
- :mod:`~titan_cp.qwen3_5.checkpoint`: TorchTitan's HF adapter for text-only checkpoints too
- :mod:`~titan_cp.qwen3_5.validate`: start-up checks
- :mod:`~titan_cp.qwen3_5.configs`: ModelSpec and TorchTitan config functions
"""

from titan_cp.qwen3_5.model import Qwen35CPModel, titan_cp_config

__all__ = ["Qwen35CPModel", "titan_cp_config"]
