"""Perplexity of a DCP or FLA Hugging Face checkpoint on a held-out text file, optionally with CP.

    python -m titan_cp.cli.evaluate --checkpoint outputs/cp2/checkpoint --config_file train_configs/cp2.toml
    torchrun --nproc_per_node=2 -m titan_cp.cli.evaluate --checkpoint path/to/fla_model \
        --text long_documents.jsonl --seq_len 65536          # every rank holds 1/2 of each row

The text (``.jsonl`` with one ``{"text": ...}`` per line, or a plain-text file
= one document; default: the shipped held-out documents) is tokenized and
packed exactly as TorchTitan packs training and validation data
(``[BOS] text [EOS]`` per document, rows of ``--seq_len`` tokens, positions
restarting at every document, the last partial row dropped), so the number
equals ``--validator.enable``'s validation loss on the same rows. Under
``torchrun`` every rank is a CP rank: each row is split along the sequence
(``--cp_layout``), states cross shards through ``--cp_exchange``, and a long
document is evaluated whole, with no window. Prints tokens, mean
cross-entropy (nats/token) and perplexity = exp(loss); ``--json`` also writes them.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan_cp.cli.trained_model import CheckpointArgs, parse
from titan_cp.components.data import VALIDATION_PATH
from titan_cp.errors import ConfigError


def packed_rows(text_path: str, tokenizer, seq_len: int, max_rows: int | None):
    """TorchTitan's packing of ``text_path`` into rows: yields (tokens [T], positions [T], labels [T])."""
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    from titan_cp.components.data import TINY_CORPUS, register_datasets

    register_datasets()
    dataset = HuggingFaceTextDataset(TINY_CORPUS, text_path, tokenizer, seq_len=seq_len, infinite=False)
    for i, (inputs, labels) in enumerate(dataset):
        if max_rows is not None and i >= max_rows:
            return
        yield inputs["input"], inputs["positions"], labels


@torch.no_grad()
def evaluate_rows(model, rows, *, batch_size: int = 1, cp=None) -> tuple[float, int]:
    """(sum of token cross-entropies, number of tokens) over ``rows``; under CP each rank its shard."""
    from titan_cp.cp.layout import rank_segments

    nll_sum = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    batch: list = []

    def run(batch):
        nonlocal nll_sum, n_tokens
        tokens, positions, labels = (torch.stack(t) for t in zip(*batch))
        if cp is not None and cp.size > 1:
            tokens, positions, labels = (rank_segments(t, 1, cp.rank, cp.size, cp.layout)
                                         for t in (tokens, positions, labels))
        logits = model(tokens, positions=positions)
        nll_sum += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").double()
        n_tokens += labels.numel()

    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if cp is not None and cp.size > 1:
        totals = torch.stack([nll_sum, torch.tensor(float(n_tokens), dtype=torch.float64)])
        dist.all_reduce(totals, group=cp.group)
        return totals[0].item(), int(totals[1].item())
    return nll_sum.item(), n_tokens


@dataclass
class EvaluateArgs(CheckpointArgs):
    text: str = str(VALIDATION_PATH)
    """.jsonl ({'text': ...} per line) or a text file; default: the shipped held-out documents"""
    seq_len: int = 512
    batch_size: int = 1
    max_rows: int | None = None
    """evaluate the first N rows only"""
    cp_layout: str = "contiguous"
    """how each row is split over the CP ranks (under torchrun)"""
    cp_exchange: str = "allgather"
    """how states cross the shards"""
    json: str | None = None
    """also write the result to this file"""


def main(argv: list[str] | None = None) -> int:
    args = parse(EvaluateArgs, argv, "python -m titan_cp.cli.evaluate", __doc__)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        if world > 1:  # before any process group: the row length must split into the CP segments
            from titan_cp.cp.layout import check_divisible

            try:
                check_divisible(args.seq_len, world, args.cp_layout)
            except ValueError as e:
                raise ConfigError(f"--seq_len: {e}") from e
        model, weights = args.load()
    except ConfigError as e:
        print(f"titan_cp.cli.evaluate: {e}", file=sys.stderr)
        return 2
    cp = None
    if world > 1:
        from titan_cp.cp.context import CPContext
        from titan_cp.models.common.parallelize import apply_cp

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        cp = CPContext(group=dist.group.WORLD, layout=args.cp_layout, exchange=args.cp_exchange)
        apply_cp(model, cp)
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(tokenizer_path=str(args.tokenizer(weights)))
    rows = packed_rows(args.text, tokenizer, args.seq_len, args.max_rows)
    nll_sum, n_tokens = evaluate_rows(model, rows, batch_size=args.batch_size, cp=cp)
    if n_tokens == 0:
        print(f"titan_cp.cli.evaluate: --text '{args.text}' has fewer than --seq_len = {args.seq_len} tokens; "
              "lower --seq_len.", file=sys.stderr)
        return 2
    loss = nll_sum / n_tokens
    result = {"checkpoint": str(weights), "text": args.text, "tokens": n_tokens, "seq_len": args.seq_len,
              "cp": world, "loss": loss, "perplexity": math.exp(loss)}
    if int(os.environ.get("RANK", "0")) == 0:
        text = os.path.relpath(args.text) if not os.path.relpath(args.text).startswith("..") else args.text
        print(f"{weights}: {n_tokens} tokens of {text} in rows of {args.seq_len} (CP {world}): "
              f"loss {loss:.4f} nats/token, perplexity {math.exp(loss):.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
