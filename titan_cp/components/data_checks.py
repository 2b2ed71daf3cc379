"""Start-up checks of the training data, before any process group: a named field and a fix, or nothing.

:func:`check_data` runs from the TOML front end (``TomlJob.build``, after
:func:`titan_cp.models.common.preflight.validate`, with ``check_runtime``
like the kernel checks: the data is the machine's, so parsing a GPU config
elsewhere does not read it) for titan_cp's text loader
(:class:`~titan_cp.components.text_loader.TextDataLoader`):

- the dataset opens (file, glob, ``save_to_disk`` folder; JSONL lines parse:
  file and line named) and has ``dataloader.text_column``;
- it yields documents, and at least one global batch of tokens
  (``dp x local_batch_size x seq_len``, counting only documents with
  ``>= dataloader.min_doc_tokens`` tokens); the scan stops as soon as that
  much is seen, so a large dataset costs one batch of tokenization (rank 0
  logs progress every 10 s if it takes longer);
- the tokenizer's ids fit the model's embedding (``tokenizer vocab <=
  model.vocab_size``).
"""

from __future__ import annotations

import os
import time

from titan_cp.errors import ConfigError

PROGRESS_SECONDS = 10.0  # rank 0 prints the scan's progress this often


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def check_data(config, dp: int) -> None:
    """ConfigError when the training data cannot give one batch of valid token ids (see the module docstring)."""
    from titan_cp.components.text_loader import TextDataLoader

    dl = config.dataloader
    if not isinstance(dl, TextDataLoader.Config):
        return
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from titan_cp.components.data import register_datasets
    from titan_cp.components.datasets import check_column, load_local, text_of

    register_datasets()
    tokenizer = HuggingFaceTokenizer(tokenizer_path=config.hf_assets_path)
    model_vocab = getattr(config.model_spec.model, "vocab_size", None)
    if model_vocab is not None and tokenizer.get_vocab_size() > model_vocab:
        raise ConfigError(
            f"model.vocab_size = {model_vocab} is smaller than the tokenizer's {tokenizer.get_vocab_size()} ids "
            f"(job.hf_assets_path = '{config.hf_assets_path}'): ids >= {model_vocab} would index past the "
            f"embedding. Set model.vocab_size >= {tokenizer.get_vocab_size()} or use a matching tokenizer/flavor.")
    if dl.dataset_path is None:
        return  # the shipped corpus (a stand-in in the GPU configs) is known good; it re-loops to fill long rows
    path = str(dl.dataset_path or DATASETS[dl.dataset.lower()].path)
    ds = load_local(path, streaming=dl.streaming)
    check_column(ds, dl.text_column, path)
    need = dp * config.training.local_batch_size * config.training.seq_len
    docs = kept = tokens = 0
    start = last_log = time.monotonic()
    for sample in ds:
        ids = tokenizer.encode(text_of(sample, dl.text_column, path), add_bos=True, add_eos=True)
        docs += 1
        if len(ids) >= max(dl.min_doc_tokens, 1):
            kept += 1
            tokens += len(ids) - 1  # inputs of a document: [BOS] + text
        if tokens >= need:
            return
        if _rank0() and time.monotonic() - last_log >= PROGRESS_SECONDS:
            last_log = time.monotonic()
            print(f"[titan_cp] checking {path}: {docs} documents, {tokens}/{need} tokens "
                  f"({last_log - start:.0f} s)", flush=True)
    if docs == 0:
        raise ConfigError(f"dataloader.dataset_path = '{path}' holds no documents, so no step could run. Point it "
                          f"at a dataset with records (column dataloader.text_column = '{dl.text_column}').")
    filt = f" with >= dataloader.min_doc_tokens = {dl.min_doc_tokens} tokens" if dl.min_doc_tokens else ""
    raise ConfigError(
        f"dataloader.dataset_path = '{path}': {docs} documents ({kept}{filt}) give {tokens} tokens, fewer than "
        f"one batch ({dp} data-parallel ranks x training.local_batch_size = {config.training.local_batch_size} x "
        f"training.seq_len = {config.training.seq_len} = {need}). Add data, lower training.local_batch_size / "
        f"training.seq_len{', or lower dataloader.min_doc_tokens' if dl.min_doc_tokens else ''}.")


__all__ = ["check_data"]
