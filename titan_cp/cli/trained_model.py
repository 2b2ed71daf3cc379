"""The checkpoint arguments of the convert, generate and evaluate commands.

``--checkpoint`` (DCP step folder, run checkpoint folder or FLA HF folder) with
``--config_file`` (the training TOML, which gives a DCP checkpoint its model
shape and tokenizer) or ``--flavor``, and ``--kernel``. The TOML is parsed
here, in the command layer: :mod:`titan_cp.hf` takes a model config, so the
config layer (which imports ``titan_cp.hf``) is never imported back from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from titan_cp.models.gdn.hf_folder import is_hf_folder, latest_step_folder, load_model
from titan_cp.train.toml_config import config_from_args

ONE_RANK = ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.data_parallel_replicate_degree", "1",
            "--parallelism.context_parallel_degree", "1", "--parallelism.tensor_parallel_degree", "1",
            "--parallelism.pipeline_parallel_degree", "1"]


def add_checkpoint_args(parser) -> None:
    """``--checkpoint`` / ``--config_file`` / ``--flavor`` / ``--kernel`` of the evaluate and generate commands."""
    parser.add_argument("--checkpoint", required=True,
                        help="FLA HF folder, DCP step-N folder, or a run's checkpoint folder (its latest step)")
    parser.add_argument("--config_file", help="the training TOML (the model shape of a DCP checkpoint)")
    parser.add_argument("--flavor", help="the model flavor of a DCP checkpoint, instead of --config_file")
    parser.add_argument("--kernel", default="torch", help="gated delta rule kernel: torch (CPU/GPU) or triton (GPU)")


def model_config_from_train_config(config_file: str | Path, overrides: dict[str, Any] | None = None):
    """The model config a TOML training config trains (at one rank), and its Trainer.Config."""
    argv = ["--job.config_file", str(config_file), *ONE_RANK]
    for key, value in (overrides or {}).items():
        argv += [f"--model.{key}", json.dumps(value) if not isinstance(value, str) else f'"{value}"']
    config = config_from_args(argv, world_size=1, check_runtime=False)
    return config.model_spec.model, config


def load_checkpoint(checkpoint: str | Path, *, config_file: str | Path | None = None, flavor: str | None = None,
                    kernel: str = "torch", device: str | torch.device = "cpu"):
    """:func:`titan_cp.models.gdn.hf_folder.load_model` with the shape of a DCP checkpoint from ``config_file``."""
    model_config = None
    if config_file is not None and not is_hf_folder(latest_step_folder(checkpoint)):
        model_config, _ = model_config_from_train_config(config_file, {"kernel": kernel})
    return load_model(checkpoint, model_config=model_config, flavor=flavor, kernel=kernel, device=device)


def tokenizer_folder(weights: str | Path, config_file: str | Path | None = None) -> Path:
    """The tokenizer of a checkpoint: its own files (HF folder), else the training config's, else the shipped one."""
    from titan_cp.components.data import TOKENIZER_PATH

    if (Path(weights) / "tokenizer.json").is_file():
        return Path(weights)
    if config_file is not None:
        return Path(model_config_from_train_config(config_file)[1].hf_assets_path)
    return TOKENIZER_PATH
