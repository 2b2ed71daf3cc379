"""HF checkpoints in and out: TorchTitan's ``Qwen35StateDictAdapter`` plus text-only key names.

TorchTitan's adapter speaks the multimodal layout of the released Qwen3.5
checkpoints (``model.language_model.layers.N...``, HF
``Qwen3_5ForConditionalGeneration``). A text-only checkpoint written by
transformers' ``Qwen3_5ForCausalLM`` (``config.json`` ``model_type``
``qwen3_5_text``) names the same tensors ``model.layers.N...``. This adapter
looks at the weight names in ``hf_assets_path`` (``model.safetensors.index.json``
or the safetensors headers) and, for a text-only checkpoint, renames
``model.language_model.`` <-> ``model.`` around TorchTitan's conversion (which fuses in_proj_q/k/v -> in_proj_qkv and
conv_q/k/v -> conv1d); everything else is TorchTitan's code.

For fine-tuning, point ``hf_assets_path`` (tokenizer, config.json, index)
and ``checkpoint.initial_load_path`` at the same HF directory; the HF save
at the end then uses the checkpoint's own key names (transformers loads
both layouts: its ``qwen3_5_text`` conversion drops ``language_model.``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from torchtitan.models.qwen3_5.state_dict_adapter import Qwen35StateDictAdapter

MULTIMODAL_PREFIX = "model.language_model."
TEXT_PREFIX = "model."


def checkpoint_keys(path: str | None) -> list[str]:
    """Tensor names of the HF checkpoint in ``path`` (index file or safetensors headers; [] if none)."""
    if not path or not os.path.isdir(path):
        return []
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return list(json.load(f)["weight_map"])
    from safetensors import safe_open

    keys: list[str] = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                keys.extend(f.keys())
    return keys


def is_text_only_checkpoint(path: str | None) -> bool:
    """True when the checkpoint in ``path`` uses text-only names (``model.layers.N``, ``*ForCausalLM``)."""
    keys = checkpoint_keys(path)
    return any(k.startswith(TEXT_PREFIX + "layers.") for k in keys) and not any(
        k.startswith(MULTIMODAL_PREFIX) for k in keys)


def _rename(state_dict: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    return {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state_dict.items()}


class Qwen35CPStateDictAdapter(Qwen35StateDictAdapter):
    """TorchTitan's Qwen3.5 adapter that also reads and writes text-only HF key names."""

    def __init__(self, model_config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        self.text_only = is_text_only_checkpoint(hf_assets_path)

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        hf_state_dict = super().to_hf(state_dict)
        return _rename(hf_state_dict, MULTIMODAL_PREFIX, TEXT_PREFIX) if self.text_only else hf_state_dict

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        if not any(k.startswith(MULTIMODAL_PREFIX) for k in hf_state_dict):
            hf_state_dict = _rename(hf_state_dict, TEXT_PREFIX, MULTIMODAL_PREFIX)
        return super().from_hf(hf_state_dict)
