"""The checkpoint arguments of the convert, generate and evaluate commands.

``--checkpoint`` (DCP step folder, run checkpoint folder or FLA HF folder) with
``--config_file`` (the training TOML, which gives a DCP checkpoint its model
shape and tokenizer) or ``--flavor``, and ``--kernel``: :class:`CheckpointArgs`,
a dataclass the commands extend and parse with tyro (:func:`parse`). The TOML
is parsed here, in the command layer: :mod:`titan_cp.models.gdn.hf_folder`
takes a model config, so the trainer layer is never imported from the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from titan_cp.models.gdn.hf_config import read_hf_config
from titan_cp.models.gdn.hf_folder import is_hf_folder, latest_step_folder, load_model
from titan_cp.train.toml_config import config_from_args

ONE_RANK = ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.data_parallel_replicate_degree", "1",
            "--parallelism.context_parallel_degree", "1", "--parallelism.tensor_parallel_degree", "1",
            "--parallelism.pipeline_parallel_degree", "1"]


@dataclass
class CheckpointArgs:
    """``--checkpoint`` / ``--config_file`` / ``--flavor`` / ``--kernel`` of the evaluate and generate commands."""

    checkpoint: str
    """FLA HF folder, DCP step-N folder, or a run's checkpoint folder (its latest step)"""
    config_file: str | None = None
    """the training TOML (the model shape of a DCP checkpoint)"""
    flavor: str | None = None
    """the model flavor of a DCP checkpoint, instead of --config_file"""
    kernel: Literal["torch", "triton"] = "torch"
    """gated delta rule kernel: torch (CPU/GPU) or triton (GPU)"""

    def load(self):
        """(model, weights folder) of :func:`load_checkpoint`."""
        return load_checkpoint(self.checkpoint, config_file=self.config_file, flavor=self.flavor, kernel=self.kernel)

    def tokenizer(self, weights: str | Path) -> Path:
        return tokenizer_folder(weights, self.config_file)


def parse(cls, argv: list[str] | None, prog: str, doc: str):
    """``argv`` parsed into the dataclass ``cls`` by tyro; flags spelled as the fields (``--config_file``)."""
    import tyro

    return tyro.cli(cls, args=argv, prog=prog, description=doc.split("\n\n")[0], use_underscores=True)


def model_config_from_train_config(config_file: str | Path, overrides: dict[str, Any] | None = None):
    """The model config a TOML training config trains (at one rank), and its Trainer.Config."""
    argv = ["--job.config_file", str(config_file), *ONE_RANK]
    for key, value in (overrides or {}).items():
        argv += [f"--model.{key}", json.dumps(value) if not isinstance(value, str) else f'"{value}"']
    config = config_from_args(argv, world_size=1, check_runtime=False)
    return config.model_spec.model, config


def load_checkpoint(checkpoint: str | Path, *, config_file: str | Path | None = None, flavor: str | None = None,
                    kernel: str = "torch", device: str | torch.device = "cpu"):
    """:func:`titan_cp.models.gdn.hf_folder.load_model` with the shape of a DCP checkpoint from ``config_file``;
    a transformers Mamba-2 folder (model_type ``mamba2``) through :func:`titan_cp.models.mamba2.hf_folder.load_hf_folder`."""
    folder = latest_step_folder(checkpoint)
    if is_hf_folder(folder) and read_hf_config(folder).get("model_type") == "mamba2":
        from titan_cp.models.mamba2.hf_folder import load_hf_folder

        return load_hf_folder(folder, kernel=kernel, device=device), folder
    model_config = None
    if config_file is not None and not is_hf_folder(latest_step_folder(checkpoint)):
        model_config, _ = model_config_from_train_config(config_file, {"kernel": kernel})
    elif config_file is None and flavor is not None:
        from titan_cp.models.mamba2.flavors import FLAVORS as MAMBA2_FLAVORS, model_config as mamba2_config

        if flavor in MAMBA2_FLAVORS:  # a DCP checkpoint of a Mamba-2 flavor
            model_config = mamba2_config(flavor, kernel=kernel)
    return load_model(checkpoint, model_config=model_config, flavor=flavor, kernel=kernel, device=device)


def tokenizer_folder(weights: str | Path, config_file: str | Path | None = None) -> Path:
    """The tokenizer of a checkpoint: its own files (HF folder), else the training config's, else the shipped one."""
    from titan_cp.components.data import TOKENIZER_PATH

    if (Path(weights) / "tokenizer.json").is_file():
        return Path(weights)
    if config_file is not None:
        return Path(model_config_from_train_config(config_file)[1].hf_assets_path)
    return TOKENIZER_PATH
