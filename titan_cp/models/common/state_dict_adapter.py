"""A TorchTitan ``StateDictAdapter`` that only renames: the HF formats whose tensors have titan_cp's shapes.

A family gives ``to_hf_names(model_config)`` (every titan_cp parameter name -> its HF name) and the
format's name for messages. Every tensor keeps its shape and values, so the mapping also works on
the sharded DTensors TorchTitan hands it during ``checkpoint.initial_load_in_hf`` / ``last_save_in_hf``.
A tied ``lm_head`` is stored once, as the embedding (FLA and transformers both do). An unexpected
name raises a ``KeyError`` naming it (a checkpoint of another architecture or shape).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from torchtitan.protocols.state_dict_adapter import StateDictAdapter


class RenamingStateDictAdapter(StateDictAdapter):
    """Subclasses set ``hf_format`` (e.g. ``"FLA"``) and ``to_hf_names`` (a function of the model config)."""

    hf_format: str
    to_hf_names: Callable[[Any], dict[str, str]]

    def __init__(self, model_config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        self.to_hf_map = type(self).to_hf_names(model_config)
        self.from_hf_map = {v: k for k, v in self.to_hf_map.items()}

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf = {}
        for key, value in state_dict.items():
            if key == "lm_head.weight" and self.model_config.tie_embeddings:
                continue  # stored once, as the embedding
            if key not in self.to_hf_map:
                raise KeyError(f"titan_cp -> {self.hf_format}: no {self.hf_format} name for parameter '{key}' "
                               "of this model shape")
            hf[self.to_hf_map[key]] = value
        return hf

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict = {}
        for key, value in hf_state_dict.items():
            if key not in self.from_hf_map:
                if key == "lm_head.weight" and self.model_config.tie_embeddings:
                    continue
                layer = re.match(r"\w+\.layers\.(\d+)\.", key)
                hint = f" (layer {layer.group(1)} is a different layer type or absent here)" if layer else ""
                raise KeyError(f"{self.hf_format} -> titan_cp: checkpoint tensor '{key}' has no place in this "
                               f"model{hint}")
            state_dict[self.from_hf_map[key]] = value
        if self.model_config.tie_embeddings and "tok_embeddings.weight" in state_dict:
            state_dict["lm_head.weight"] = state_dict["tok_embeddings.weight"]
        return state_dict


__all__ = ["RenamingStateDictAdapter"]
