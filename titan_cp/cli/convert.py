"""Convert checkpoints between TorchTitan DCP and FLA's Hugging Face format (like flame's convert scripts).

    # DCP (a training run's checkpoint folder or one step-N) -> FLA HF folder
    python -m titan_cp.cli.convert to-hf --checkpoint outputs/cp2/checkpoint \
        --config_file train_configs/cp2.toml --out outputs/cp2/hf

    # FLA HF folder (config.json + *.safetensors) -> model-only DCP folder
    python -m titan_cp.cli.convert to-dcp --checkpoint path/to/fla_model --out path/to/dcp

The HF folder loads with ``fla.models.GatedDeltaNetForCausalLM.from_pretrained``
(and ``transformers.AutoModelForCausalLM`` once ``import fla`` registered it);
the tokenizer files of the run (``job.hf_assets_path``) are copied next to it.
The DCP folder starts a run with ``[checkpoint] initial_load_path = "<out>"``,
``initial_load_model_only = true`` -- or skip the conversion and load the HF
folder directly: ``initial_load_path = "<hf folder>"``, ``initial_load_in_hf = true``.
Both directions copy tensors unchanged (bit-exact in float32).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Literal, Union

import torch
import tyro

from titan_cp.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def to_hf(checkpoint: str, out: str, *, config_file: str | None = None, flavor: str | None = None,
          tokenizer: str | None = None, dtype: str = "float32") -> str:
    from titan_cp.cli.trained_model import load_checkpoint, tokenizer_folder
    from titan_cp.models.gdn.hf_folder import save_hf

    model, source = load_checkpoint(checkpoint, config_file=config_file, flavor=flavor)
    if tokenizer is None:
        tokenizer = tokenizer_folder(source, config_file)
    state = {k: v.to(DTYPES[dtype]) for k, v in model.state_dict().items()}
    save_hf(state, model.config, out, tokenizer_path=tokenizer)
    return f"{source} -> {out} (FLA gated_deltanet, {len(state)} tensors, {dtype})"


def to_dcp(checkpoint: str, out: str) -> str:
    from titan_cp.models.gdn.hf_folder import is_hf_folder, load_model, save_dcp

    if not is_hf_folder(checkpoint):
        raise ConfigError(f"--checkpoint '{checkpoint}' is not an FLA Hugging Face folder (config.json + "
                          "*.safetensors); to-dcp converts those.")
    model, source = load_model(checkpoint)
    save_dcp(model, out)
    return f"{source} -> {out} (model-only DCP)"


@dataclass
class ToHf:
    """DCP checkpoint -> FLA Hugging Face folder"""

    checkpoint: str
    """a step-N folder, or a checkpoint folder (latest step)"""
    out: str
    config_file: str | None = None
    """the training TOML (gives the model shape and tokenizer)"""
    flavor: str | None = None
    """the model flavor, instead of --config_file"""
    tokenizer: str | None = None
    """tokenizer folder to copy (default: the config's hf_assets_path)"""
    dtype: Literal["bfloat16", "float32"] = "float32"

    def run(self) -> str:
        return to_hf(self.checkpoint, self.out, config_file=self.config_file, flavor=self.flavor,
                     tokenizer=self.tokenizer, dtype=self.dtype)


@dataclass
class ToDcp:
    """FLA Hugging Face folder -> model-only DCP folder"""

    checkpoint: str
    out: str

    def run(self) -> str:
        return to_dcp(self.checkpoint, self.out)


Direction = Union[Annotated[ToHf, tyro.conf.subcommand("to-hf")], Annotated[ToDcp, tyro.conf.subcommand("to-dcp")]]


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Direction, args=argv, prog="python -m titan_cp.cli.convert", description=__doc__.split("\n\n")[0],
                    use_underscores=True)
    try:
        print(args.run())
    except ConfigError as e:
        print(f"titan_cp.cli.convert: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
