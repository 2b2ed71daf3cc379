"""Write a tiny FLA Gated DeltaNet checkpoint with FLA's own ``save_pretrained`` (no download, no GPU).

    python -m tools.make_tiny_fla_checkpoint [--out outputs/fla_tiny] [--seed 0]

The folder (config.json + model.safetensors + the shipped tokenizer) is what a
Hugging Face hub FLA checkpoint looks like, at CPU size: 2 layers, hidden 64,
2 key heads x 16 with 4 value heads (grouped values) x 32, SwiGLU 96, vocab
1024 (the shipped tokenizer's 1016 tokens fit). FLA's default initialisation,
seeded. ``train_configs/fla_tiny_cp2.toml`` continues training it under CP 2.
Needs ``fla`` (scripts/setup.sh installs it); building and saving the model
runs no Triton kernel.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=2.0, num_v_heads=4,
            intermediate_size=96, vocab_size=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def make(out: str | Path, seed: int = 0) -> Path:
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    from titan_cp.components.data import TOKENIZER_PATH

    torch.manual_seed(seed)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**TINY))
    out = Path(out)
    model.save_pretrained(out)
    for file in TOKENIZER_PATH.iterdir():
        shutil.copyfile(file, out / file.name)
    return out


@dataclass
class Args:
    out: str = str(REPO / "outputs" / "fla_tiny")
    """where the FLA Hugging Face folder is written"""
    seed: int = 0
    """seed of the random weights"""


def main() -> None:
    args = tyro.cli(Args, prog="python -m tools.make_tiny_fla_checkpoint", description=__doc__.splitlines()[0])
    print(f"wrote {make(args.out, args.seed)}")


if __name__ == "__main__":
    main()
