"""FLA ``kda`` (``KDAForCausalLM``) safetensors in and out: the GDN LM's adapter, whose 'K' blocks map to
FLA's KimiDeltaAttention names (titan_cp/models/gdn/state_dict_adapter.py, ``KDA_PARAMS``); the config.json
side is titan_cp/models/gdn/hf_config.py (model_type ``kda`` <-> layer letter K)."""

from __future__ import annotations

from titan_cp.models.gdn.state_dict_adapter import KDA_PARAMS, FLAStateDictAdapter as KDAStateDictAdapter

__all__ = ["KDA_PARAMS", "KDAStateDictAdapter"]
