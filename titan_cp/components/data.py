"""Training data for titan_cp: the shipped tiny corpus and a synthetic option.

Two sources, both selectable from TOML (``[dataloader] dataset = ...``):

``tiny_corpus`` (default)
    ``titan_cp/assets/data/tiny_corpus.jsonl`` (written by
    ``tools/build_assets.py``) registered as a local dataset in TorchTitan's
    dataset table, and read by TorchTitan's own ``HuggingFaceTextDataLoader``:
    same packing, positions, dp split and checkpoint state as TorchTitan's c4
    path, no network. The tokenizer is ``titan_cp/assets/tokenizer``
    (``hf_assets_path``). ``dataset_path`` points the same loader at a local
    dataset: JSONL, parquet, arrow, a ``save_to_disk`` folder or a glob of
    shards (:mod:`titan_cp.components.datasets`), ``text_column``,
    ``streaming`` and ``min_doc_tokens`` choose what is read
    (:mod:`titan_cp.components.text_loader`; start-up checks in
    :mod:`titan_cp.components.data_checks`).

``tiny_corpus_validation``
    Held-out documents of the same grammar
    (``titan_cp/assets/data/tiny_corpus_validation.jsonl``, another seed, none
    equal to a training document): the validator's default
    (:func:`validation_config`, ``--validator.enable``) and
    ``python -m titan_cp.cli.evaluate``'s default text.

``synthetic``
    :class:`SyntheticDataLoader`: documents of random or patterned tokens,
    packed exactly like TorchTitan packs text, generated statelessly from
    ``(seed, global row index)``. Row ``j`` of the ``k``-th local batch on
    data-parallel rank ``d`` is global row ``k * dp * B + d * B + j``, so the
    global batch of every step is the same whatever the data-parallel degree:
    a 1-rank run with ``local_batch_size = dp * B`` sees the same rows as a
    dp-rank run with ``B`` (TorchTitan's text path splits the *dataset* by
    rank instead, so its global batch depends on dp). The tests use it to
    compare layouts.

How document boundaries reach the model (TorchTitan 0.3.0 convention, both
sources): the dataloader yields ``({"input": tokens, "positions": pos},
labels)``; each document is ``[BOS] + text + [EOS]``, inputs are
``doc[:-1]``, labels ``doc[1:]`` (so no label crosses a document), and
``positions`` restart at 0 at every document start (a row always starts at
position 0, also when it continues a document cut by the previous row).
``doc_starts = positions == 0`` is therefore the boundary mask; TorchTitan
derives its own varlen/flex masks the same way
(``models/common/attention.py: create_varlen_metadata_for_document``,
``get_document_mask_mod``). The trainer passes ``positions`` to
``model(inputs, positions=...)`` and, under CP, shards it along with
``inputs`` and ``labels`` (``prepare_context_parallel_input``), so each CP
rank sees the boundaries of its own shard. Attention masks are only built for
``Decoder`` configs with Flex/Varlen attention; a GDN model gets positions
only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"  # titan_cp/assets: package data
TOKENIZER_PATH = ASSETS / "tokenizer"
CORPUS_PATH = ASSETS / "data" / "tiny_corpus.jsonl"
VALIDATION_PATH = ASSETS / "data" / "tiny_corpus_validation.jsonl"
TINY_CORPUS = "tiny_corpus"
TINY_CORPUS_VALIDATION = "tiny_corpus_validation"
# Validation batches per validation (TorchTitan's -1, "until the data ends", can hang when data-parallel
# ranks get unequal shares; a fixed count cycles the held-out set instead).
VALIDATION_STEPS = 5


def _read_documents(path: str):
    """A local text dataset in any format of :func:`titan_cp.components.datasets.load_local`."""
    from titan_cp.components.datasets import load_local

    if not Path(path).exists() and not any(c in str(path) for c in "*?["):
        raise FileNotFoundError(f"dataloader.dataset_path = '{path}' does not exist")
    return load_local(str(path))


def register_datasets() -> None:
    """Add ``tiny_corpus`` and ``tiny_corpus_validation`` to TorchTitan's dataset table (idempotent)."""
    from torchtitan.hf_datasets import DatasetConfig, text_datasets

    for name, path in ((TINY_CORPUS, CORPUS_PATH), (TINY_CORPUS_VALIDATION, VALIDATION_PATH)):
        if name not in text_datasets.DATASETS:
            text_datasets.DATASETS[name] = DatasetConfig(
                path=str(path),
                loader=_read_documents,
                sample_processor=lambda sample: sample["text"],
            )


def tiny_corpus_config(**kwargs):
    """titan_cp's text dataloader config (:class:`~titan_cp.components.text_loader.TextDataLoader`) reading
    the shipped corpus; ``dataset_path`` points it at a local JSONL / parquet / arrow / save_to_disk dataset."""
    from titan_cp.components.text_loader import TextDataLoader

    register_datasets()
    return TextDataLoader.Config(dataset=TINY_CORPUS, **kwargs)


def validation_config(**kwargs):
    """TorchTitan's text dataloader config reading the held-out documents (the validator's default)."""
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

    register_datasets()
    return HuggingFaceTextDataLoader.Config(dataset=TINY_CORPUS_VALIDATION, infinite=False, **kwargs)


# --- synthetic data --------------------------------------------------------------------------


def synthetic_row(
    global_row: int,
    *,
    seq_len: int,
    vocab_size: int,
    kind: str,
    mean_doc_len: int,
    seed: int,
    bos_id: int,
    eos_id: int,
    first_token: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One packed row ``(input, positions, labels)``, a pure function of its arguments."""
    r = random.Random(seed * 1_000_003 + global_row)
    inputs: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    lo, hi = first_token, vocab_size
    while len(inputs) < seq_len:
        if mean_doc_len > 0:
            body_len = max(1, int(r.expovariate(1.0 / mean_doc_len)))
        else:
            body_len = seq_len  # one document fills the row
        if kind == "random":
            body = [r.randrange(lo, hi) for _ in range(body_len)]
        else:  # "pattern": an arithmetic progression mod the token range; learnable
            start, stride = r.randrange(lo, hi), r.randrange(1, 8)
            body = [lo + (start - lo + i * stride) % (hi - lo) for i in range(body_len)]
        doc = [bos_id] + body + [eos_id]
        inputs.extend(doc[:-1])
        labels.extend(doc[1:])
        positions.extend(range(len(doc) - 1))
    return (
        torch.tensor(inputs[:seq_len], dtype=torch.long),
        torch.tensor(positions[:seq_len], dtype=torch.long),
        torch.tensor(labels[:seq_len], dtype=torch.long),
    )


class SyntheticDataset(IterableDataset, Stateful):
    """Infinite packed rows of synthetic documents; see the module docstring for the row order."""

    def __init__(
        self,
        *,
        seq_len: int,
        vocab_size: int,
        local_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        kind: str,
        mean_doc_len: int,
        seed: int,
        bos_id: int,
        eos_id: int,
    ):
        self.kw = {
            "seq_len": seq_len, "vocab_size": vocab_size, "kind": kind, "mean_doc_len": mean_doc_len, "seed": seed,
            "bos_id": bos_id, "eos_id": eos_id, "first_token": max(bos_id, eos_id) + 1,
        }
        if self.kw["first_token"] >= vocab_size:
            raise ValueError(f"synthetic data: vocab_size {vocab_size} leaves no ordinary tokens")
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self._sample_idx = 0

    def global_row(self, sample_idx: int) -> int:
        batch, j = divmod(sample_idx, self.local_batch_size)
        return (batch * self.dp_world_size + self.dp_rank) * self.local_batch_size + j

    def __iter__(self):
        while True:
            x, pos, y = synthetic_row(self.global_row(self._sample_idx), **self.kw)
            self._sample_idx += 1
            yield {"input": x, "positions": pos}, y

    def state_dict(self) -> dict[str, Any]:
        return {"sample_idx": self._sample_idx}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sample_idx = int(state_dict["sample_idx"])


class SyntheticDataLoader(ParallelAwareDataloader):
    """TorchTitan dataloader over :class:`SyntheticDataset` (``[dataloader] dataset = "synthetic"``)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "synthetic"
        """Always "synthetic" for this loader."""

        kind: Literal["pattern", "random"] = "pattern"
        """"pattern": learnable arithmetic progressions; "random": uniform tokens (loss stays near ln V)."""

        vocab_size: int = 0
        """Token range [0, vocab_size); 0 means the tokenizer's vocabulary size."""

        mean_doc_len: int = 64
        """Mean document length in tokens (exponential); 0 means one document per row."""

        seed: int = 0
        """Data seed (independent of the model's init seed)."""

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer | None,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs,
    ):
        vocab = config.vocab_size or (tokenizer.get_vocab_size() if tokenizer is not None else 0)
        if vocab <= 0:
            raise ValueError("dataloader.vocab_size must be > 0 when there is no tokenizer")
        bos = getattr(tokenizer, "bos_id", None)
        eos = getattr(tokenizer, "eos_id", None)
        ds = SyntheticDataset(
            seq_len=seq_len,
            vocab_size=vocab,
            local_batch_size=local_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            kind=config.kind,
            mean_doc_len=config.mean_doc_len,
            seed=config.seed,
            bos_id=0 if bos is None else bos,
            eos_id=1 if eos is None else eos,
        )
        super().__init__(
            ds,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            snapshot_every_n_steps=snapshot_every_n_steps,
            batch_size=local_batch_size,
        )


__all__ = [
    "ASSETS",
    "CORPUS_PATH",
    "TINY_CORPUS",
    "TINY_CORPUS_VALIDATION",
    "VALIDATION_PATH",
    "VALIDATION_STEPS",
    "TOKENIZER_PATH",
    "SyntheticDataLoader",
    "SyntheticDataset",
    "register_datasets",
    "synthetic_row",
    "tiny_corpus_config",
    "validation_config",
]
