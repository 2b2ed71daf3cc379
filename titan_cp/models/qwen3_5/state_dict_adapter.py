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

MoE routed experts. TorchTitan holds them grouped, ``w1_EFD`` / ``w3_EFD``
``[E, F, D]`` and ``w2_EDF`` ``[E, D, F]``. HF checkpoints of
``Qwen3_5MoeForCausalLM`` (what transformers 5.6.2's ``save_pretrained``
writes, and what its ``qwen2_moe`` conversion reads and fuses) store one
``nn.Linear`` per expert::

    mlp.experts.{e}.gate_proj.weight [F, D] = w1_EFD[e]
    mlp.experts.{e}.up_proj.weight   [F, D] = w3_EFD[e]
    mlp.experts.{e}.down_proj.weight [D, F] = w2_EDF[e]

(same orientation, no transpose). This adapter converts those with
TorchTitan's ``MoEStateDictAdapter`` helpers (as its Qwen3 adapter does): for a
DTensor (EP ``Shard(0)``, FSDP) each rank writes and reads only its local
experts. The fused ``mlp.experts.gate_up_proj`` layout is left to TorchTitan's
code. Router (``mlp.gate.weight``), shared expert and its sigmoid gate
(``mlp.shared_expert{,_gate}``) are TorchTitan's one-to-one names.

``moe.expert_bias_E`` (TorchTitan's auxiliary-loss-free load balancing) has no
HF counterpart: transformers routes by the softmax scores alone. Loading an HF
checkpoint leaves it at its init (zero, so routing equals transformers'); an
export drops it, with a warning when it is non-zero (the HF model then routes
without the learned bias, i.e. not exactly like the trained titan_cp model).

``config.json`` of an MoE flavor: :func:`hf_moe_fields` (read by the model
config's ``hf_config()``) gives transformers' ``Qwen3_5MoeTextConfig`` fields
(``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
``shared_expert_intermediate_size``) and refuses routing transformers cannot
express (its sparse block: MoE in every layer, softmax scores, top-k
renormalised, scale 1, no expert groups, a sigmoid-gated shared expert).

For fine-tuning, point ``hf_assets_path`` (tokenizer, config.json, index)
and ``checkpoint.initial_load_path`` at the same HF directory; the HF save
at the end then uses the checkpoint's own key names (transformers loads
both layouts: its ``qwen3_5_text`` conversion drops ``language_model.``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from torch.distributed.tensor import DTensor
from torchtitan.models.qwen3_5.state_dict_adapter import Qwen35StateDictAdapter
from torchtitan.models.utils import MoEStateDictAdapter

from titan_cp.errors import ConfigError
from titan_cp.models.common.dtensor import local_tensor

logger = logging.getLogger(__name__)

MULTIMODAL_PREFIX = "model.language_model."
TEXT_PREFIX = "model."
# TorchTitan grouped-expert key (layer "{}") -> HF per-expert key (layer, expert "{}").
EXPERT_KEYS = {
    "layers.{}.moe.routed_experts.inner_experts.w1_EFD": MULTIMODAL_PREFIX + "layers.{}.mlp.experts.{}.gate_proj.weight",
    "layers.{}.moe.routed_experts.inner_experts.w3_EFD": MULTIMODAL_PREFIX + "layers.{}.mlp.experts.{}.up_proj.weight",
    "layers.{}.moe.routed_experts.inner_experts.w2_EDF": MULTIMODAL_PREFIX + "layers.{}.mlp.experts.{}.down_proj.weight",
}
HF_EXPERT_KEYS = {hf: tt for tt, hf in EXPERT_KEYS.items()}


def hf_moe_fields(config) -> dict[str, Any]:
    """``Qwen3_5MoeTextConfig`` fields of a TorchTitan Qwen3.5 config with MoE layers ({} for a dense one).

    Raises ConfigError (naming the field) for what transformers' ``Qwen3_5MoeForCausalLM`` cannot load
    as the same model (module docstring).
    """
    moes = [layer.moe for layer in config.layers]
    if all(moe is None for moe in moes):
        return {}
    where = "HF config.json of a Qwen3.5 MoE model (transformers' Qwen3_5MoeForCausalLM)"
    dense = [i for i, moe in enumerate(moes) if moe is None]
    if dense:
        raise ConfigError(f"{where}: layers {dense} have a dense feed-forward (model.layers[{dense[0]}].moe is "
                          "None) but transformers puts experts in every layer; export a flavor whose layers are all "
                          "MoE (TorchTitan's debugmodel_moe, 35B-A3B, ...) or a dense flavor")
    per_layer = [_moe_fields(i, moe, where) for i, moe in enumerate(moes)]
    for i, fields in enumerate(per_layer):
        if fields != per_layer[0]:
            raise ConfigError(f"{where}: model.layers[{i}].moe is {fields}, layer 0's {per_layer[0]}, but transformers "
                              "has one MoE shape for all layers; give every layer the same MoE config")
    return per_layer[0]


def _moe_fields(i: int, moe, where: str) -> dict[str, Any]:
    router, field = moe.router, f"model.layers[{i}].moe"
    expected = {"score_func": "softmax", "route_norm": True, "route_scale": 1.0, "num_expert_groups": None}
    for name, want in expected.items():
        if getattr(router, name) != want:
            raise ConfigError(f"{where}: {field}.router.{name} = {getattr(router, name)!r}, but transformers routes "
                              f"with {name} = {want!r}; set it to {want!r} to export")
    if moe.shared_experts is None:
        raise ConfigError(f"{where}: {field}.shared_experts is None but transformers' sparse block has a "
                          "sigmoid-gated shared expert; keep TorchTitan's shared experts to export")
    return {"num_experts": moe.num_experts, "num_experts_per_tok": router.top_k,
            "moe_intermediate_size": moe.routed_experts.inner_experts.hidden_dim,
            "shared_expert_intermediate_size": moe.shared_experts.w1.out_features}


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


def _abstract(key: str, count: int) -> str:
    return re.sub(r"\d+", "{}", key, count=count)


class Qwen35CPStateDictAdapter(Qwen35StateDictAdapter, MoEStateDictAdapter):
    """TorchTitan's Qwen3.5 adapter plus text-only HF key names and per-expert MoE weights (module docstring)."""

    def __init__(self, model_config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        self.text_only = is_text_only_checkpoint(hf_assets_path)

    def _num_experts(self) -> int:
        return next(layer.moe for layer in self.model_config.layers if layer.moe is not None).num_experts

    def _experts_to_hf(self, tt_key: str, value) -> dict[str, Any]:
        """One grouped expert weight -> this rank's per-expert HF weights (all of them for a plain tensor)."""
        abstract, layer = _abstract(tt_key, 1), re.search(r"\d+", tt_key).group(0)
        hf_abstract = EXPERT_KEYS[abstract]
        if isinstance(value, DTensor):
            self.grouped_expert_weight_placements[abstract] = value.placements
            self.grouped_expert_weight_shape[abstract] = value.shape
            self.grouped_expert_weight_mesh[abstract] = value.device_mesh
            return self._get_local_experts_weights(hf_abstract, abstract, layer, value)
        return {hf_abstract.format(layer, e): w for e, w in enumerate(value.unbind(0))}

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        experts, rest = {}, {}
        for key, value in state_dict.items():
            if _abstract(key, 1) in EXPERT_KEYS:
                experts |= self._experts_to_hf(key, value)
            else:
                rest[key] = value
                if key.endswith("moe.expert_bias_E") and bool((local_tensor(value) != 0).any()):
                    logger.warning("%s is non-zero but has no HF counterpart: the HF checkpoint routes by the "
                                   "softmax scores alone (dropped)", key)
        hf_state_dict = super().to_hf(rest) | experts
        return _rename(hf_state_dict, MULTIMODAL_PREFIX, TEXT_PREFIX) if self.text_only else hf_state_dict

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        if not any(k.startswith(MULTIMODAL_PREFIX) for k in hf_state_dict):
            hf_state_dict = _rename(hf_state_dict, TEXT_PREFIX, MULTIMODAL_PREFIX)
        by_layer: dict[str, dict[str, dict[int, Any]]] = {}  # TorchTitan's helpers' {layer: {tt key: {e: w}}}
        rest, state_dict = {}, {}
        for key, value in hf_state_dict.items():
            tt_abstract = HF_EXPERT_KEYS.get(_abstract(key, 2))
            if tt_abstract is None:
                rest[key] = value
                continue
            layer, expert = re.findall(r"\d+", key)[:2]
            by_layer.setdefault(layer, {}).setdefault(tt_abstract, {})[int(expert)] = value
            if tt_abstract in self.local_experts_indices:  # online (DTensor) load: this rank's experts
                stacked = self._concatenate_expert_weights_dtensor(by_layer, tt_abstract, layer)
            else:
                stacked = self._concatenate_expert_weights(by_layer, tt_abstract, layer, self._num_experts())
            if stacked is not None:
                state_dict[tt_abstract.format(layer)] = stacked
        return super().from_hf(rest) | state_dict
