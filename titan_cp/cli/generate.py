"""Generate text with titan_cp's own model from a DCP or FLA Hugging Face checkpoint.

    python -m titan_cp.cli.generate --checkpoint outputs/cp2/checkpoint \
        --config_file train_configs/cp2.toml --prompt "Dear Bram," --max_new_tokens 60

The prompt is encoded like the training documents ([BOS] + text), prefilled
with the chunk kernel, then continued one token at a time from the carried
GDN state and conv history (O(1) per token) and, in hybrid models, a KV cache
(:mod:`titan_cp.models.gdn.decode`). Sampled from the ``--top_k`` most likely
tokens at ``--temperature`` with ``--seed`` (greedy with ``--temperature 0``).
Generation stops at the end-of-text token or after ``--max_new_tokens``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from titan_cp.cli.trained_model import CheckpointArgs, parse
from titan_cp.errors import ConfigError


@dataclass
class GenerateArgs(CheckpointArgs):
    prompt: str = ""
    """text to continue (default: start a document)"""
    max_new_tokens: int = 60
    temperature: float = 0.7
    """0 = greedy"""
    top_k: int = 40
    """sample from the k most likely tokens (0 = all)"""
    seed: int = 0


def main(argv: list[str] | None = None) -> int:
    from titan_cp.models.gdn.decode import generate

    args = parse(GenerateArgs, argv, "python -m titan_cp.cli.generate", __doc__)
    try:
        model, weights = args.load()
    except ConfigError as e:
        print(f"titan_cp.cli.generate: {e}", file=sys.stderr)
        return 2
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(tokenizer_path=str(args.tokenizer(weights)))
    prompt_ids = tokenizer.encode(args.prompt, add_bos=True, add_eos=False)
    out = generate(model, torch.tensor([prompt_ids]), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, eos_id=tokenizer.eos_id, generator=torch.Generator().manual_seed(args.seed))
    new_ids = [t for t in out[0, len(prompt_ids):].tolist() if t != tokenizer.eos_id]
    print(args.prompt + tokenizer.decode(new_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
