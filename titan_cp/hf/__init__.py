"""FLA Hugging Face checkpoints in and out: config.json <-> model config, the state-dict adapter, file I/O."""

from titan_cp.hf.adapter import FLAStateDictAdapter
from titan_cp.hf.checkpoints import load_model, save_dcp, save_hf
from titan_cp.hf.config import hf_config_from_model, model_config_from_hf, read_hf_config

__all__ = [
    "FLAStateDictAdapter",
    "hf_config_from_model",
    "load_model",
    "model_config_from_hf",
    "read_hf_config",
    "save_dcp",
    "save_hf",
]
