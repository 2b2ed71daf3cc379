"""Reading and writing model weights on one process: DCP folders and FLA Hugging Face folders.

A titan_cp checkpoint is either

* a DCP step folder ``<dump_folder>/checkpoint/step-N`` (TorchTitan's ``.metadata`` +
  ``__*_*.distcp``; full training state or model only), whose model shape comes
  from the training config (``--config_file``/``--flavor``), or
* an FLA Hugging Face folder: ``config.json`` (model_type ``gated_deltanet`` or ``kda``) +
  ``*.safetensors`` (+ tokenizer files), as FLA's ``save_pretrained`` writes it
  and as :func:`save_hf` writes it.

:func:`load_model` takes either (or a ``checkpoint`` folder, meaning its
latest step) and returns a ready ``GDNModel``; the converter, evaluation and
generation all start there. Everything runs without a process group (DCP's
single-process mode).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from titan_cp.errors import ConfigError
from titan_cp.models.gdn.state_dict_adapter import FLAStateDictAdapter
from titan_cp.models.gdn.hf_config import hf_config_from_model, model_config_from_hf, read_hf_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def is_hf_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and any(Path(path).glob("*.safetensors"))


def latest_step_folder(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint (DCP or HF), else its ``step-N`` subfolder with the largest N."""
    path = Path(path)
    if (path / ".metadata").is_file() or is_hf_folder(path):
        return path
    steps = [(int(m.group(1)), p) for p in path.glob("step-*") if (m := re.fullmatch(r"step-(\d+)", p.name))
             and ((p / ".metadata").is_file() or any(p.glob("*.safetensors")))]
    if not steps:
        raise ConfigError(f"--checkpoint '{path}': no checkpoint there (neither a DCP step folder with .metadata, "
                          "an FLA folder with config.json + *.safetensors, nor a folder of step-N checkpoints). "
                          "Train first (the run writes <dump_folder>/checkpoint/step-N) or pass an existing path.")
    return max(steps)[1]


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``path`` (FLA's names)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def save_hf(state_dict: dict[str, torch.Tensor], model_config, out: str | Path,
            tokenizer_path: str | Path | None = None) -> Path:
    """Write an FLA Hugging Face folder: ``model.safetensors`` + ``config.json`` (+ the tokenizer's files)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = FLAStateDictAdapter(model_config, None).to_hf(state_dict)
    save_file({k: v.detach().contiguous() for k, v in hf.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    write_hf_config(model_config, out, tokenizer_path, dtype=str(next(iter(hf.values())).dtype).split(".")[-1])
    return out


def write_hf_config(model_config, out: str | Path, tokenizer_path: str | Path | None = None,
                    dtype: str = "float32") -> None:
    """``config.json`` for ``model_config`` in ``out``; with a tokenizer folder, its files and token ids too."""
    out = Path(out)
    bos = eos = None
    if tokenizer_path is not None and (Path(tokenizer_path) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(tokenizer_path) / "tokenizer.json"))
        special = json.loads((Path(tokenizer_path) / "tokenizer_config.json").read_text()) \
            if (Path(tokenizer_path) / "tokenizer_config.json").is_file() else {}
        bos = tokenizer.token_to_id(special.get("bos_token", "")) if special.get("bos_token") else None
        eos = tokenizer.token_to_id(special.get("eos_token", "")) if special.get("eos_token") else None
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_path) / name).is_file() and Path(tokenizer_path).resolve() != out.resolve():
                shutil.copyfile(Path(tokenizer_path) / name, out / name)
    # A model family with its own HF config (e.g. titan_cp.models.qwen3_5) provides it; else FLA's GDN config.
    make = getattr(model_config, "hf_config", None) or functools.partial(hf_config_from_model, model_config)
    hf = make(bos_token_id=bos, eos_token_id=eos, dtype=dtype)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")


def complete_hf_save(config) -> Path | None:
    """After training with ``checkpoint.last_save_in_hf``: add config.json + tokenizer to the last step.

    TorchTitan's HF save writes only safetensors; with this the folder is a
    complete FLA checkpoint (``from_pretrained`` / ``--checkpoint`` of the
    generate and evaluate commands). Rank 0 only; returns the folder.
    """
    import os

    if not (config.checkpoint.enable and config.checkpoint.last_save_in_hf) or os.environ.get("RANK", "0") != "0":
        return None
    folder = latest_step_folder(Path(config.dump_folder) / config.checkpoint.folder)
    write_hf_config(config.model_spec.model, folder, config.hf_assets_path)
    return folder


def build_model(model_config, device: str | torch.device = "cpu"):
    """An uninitialised ``GDNModel`` (weights to be loaded) on ``device``."""
    from titan_cp.models.gdn.model import GDNModel

    with torch.device("meta"):
        model = GDNModel(model_config)
    model = model.to_empty(device=device)
    if model_config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    return model


def load_dcp_into(model, path: str | Path) -> None:
    """Load the model tensors of a TorchTitan DCP step folder (full or model-only) into ``model``."""
    state = model.state_dict()  # TorchTitan's names; a tied head appears twice, as lm_head and the embedding
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    stored = metadata.state_dict_metadata
    stored_model = {k for k in stored if re.match(r"(tok_embeddings|layers\.\d+|norm|lm_head)\.", k)}
    for names, where in ((set(state) - set(stored), "has no tensor"), (stored_model - set(state), "has an extra tensor")):
        if names:
            raise ConfigError(f"--checkpoint '{path}' {where} {min(names)!r} (and {len(names) - 1} more): the model "
                              "shape given (--config_file/--flavor) is not the one that was trained.")
    for name, tensor in state.items():
        if tuple(stored[name].size) != tuple(tensor.shape):
            raise ConfigError(f"--checkpoint '{path}': {name} is {tuple(stored[name].size)} there but "
                              f"{tuple(tensor.shape)} in the model shape given (--config_file/--flavor); pass the "
                              "training config of that run.")
    dcp.load(state, checkpoint_id=str(path))


def save_dcp(model, out: str | Path) -> Path:
    """A model-only DCP folder TorchTitan loads with ``checkpoint.initial_load_path`` (model only)."""
    out = Path(out)
    dcp.save(model.state_dict(), checkpoint_id=str(out))
    return out


def load_model(checkpoint: str | Path, *, model_config=None, flavor: str | None = None, kernel: str = "torch",
               device: str | torch.device = "cpu"):
    """(model, path of the weights loaded) from a DCP or FLA HF checkpoint (see the module docstring).

    DCP checkpoints need their shape: ``model_config`` (the commands parse it from
    the training TOML, :mod:`titan_cp.cli.trained_model`) or ``flavor``; an HF
    folder carries it in ``config.json``.
    """
    path = latest_step_folder(checkpoint)
    if is_hf_folder(path):
        model_config = model_config_from_hf(read_hf_config(path), kernel=kernel)
        model = build_model(model_config, device)
        state = FLAStateDictAdapter(model_config, None).from_hf(load_hf_state_dict(path))
        model.load_state_dict(state, strict=True)
        return model.eval(), path
    if model_config is None and flavor is not None:
        from titan_cp.models.gdn import model_config as flavor_config
        from titan_cp.models.kda.flavors import FLAVORS as KDA_FLAVORS, model_config as kda_config

        model_config = (kda_config if flavor in KDA_FLAVORS else flavor_config)(flavor, kernel=kernel)
    if model_config is None:
        raise ConfigError(f"--checkpoint '{path}' is a DCP checkpoint, which does not record the model shape: "
                          "pass the training config (--config_file train_configs/X.toml) or --flavor.")
    model = build_model(model_config, device)
    load_dcp_into(model, path)
    return model.eval(), path
