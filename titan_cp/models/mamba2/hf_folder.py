"""transformers ``Mamba2ForCausalLM`` folders (``model.safetensors`` + ``config.json``) in and out, on one process.

Names: :mod:`titan_cp.models.mamba2.state_dict_adapter`; config.json fields:
:mod:`titan_cp.models.mamba2.hf_config`. The GDN LM's folder helpers (safetensors reading, the
config.json + tokenizer writer) do the file work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from titan_cp.models.gdn.hf_folder import build_model, load_hf_state_dict, read_hf_config, write_hf_config
from titan_cp.models.mamba2.hf_config import model_fields_from_hf
from titan_cp.models.mamba2.model import Mamba2Model
from titan_cp.models.mamba2.state_dict_adapter import Mamba2StateDictAdapter


def model_config_from_hf(hf: dict[str, Any], **overrides):
    """``Mamba2Model.Config`` of a transformers ``mamba2`` config dict, then field ``overrides`` (e.g. kernel)."""
    return Mamba2Model.Config(**{**model_fields_from_hf(hf), **overrides})


def load_hf_folder(path: str | Path, *, kernel: str = "torch", device: str | torch.device = "cpu"):
    """A ready (eval) Mamba-2 model from a transformers ``Mamba2ForCausalLM`` folder."""
    model_config = model_config_from_hf(read_hf_config(path), kernel=kernel)
    model = build_model(model_config, device)
    model.load_state_dict(Mamba2StateDictAdapter(model_config, None).from_hf(load_hf_state_dict(path)), strict=True)
    return model.eval()


def save_hf_folder(model, out: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """``model.safetensors`` + ``config.json`` (+ the tokenizer's files) that transformers'
    ``Mamba2ForCausalLM.from_pretrained`` reads; ``model.config`` is a ``Mamba2Model.Config``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = Mamba2StateDictAdapter(model.config, None).to_hf(model.state_dict())
    save_file({k: v.detach().contiguous() for k, v in hf.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    write_hf_config(model.config, out, tokenizer_path, dtype=str(next(iter(hf.values())).dtype).split(".")[-1])
    return out


__all__ = ["load_hf_folder", "model_config_from_hf", "save_hf_folder"]
