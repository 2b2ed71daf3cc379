"""titan_cp's text loader: TorchTitan's ``HuggingFaceTextDataset`` over any local format, never looping on nothing.

:class:`TextDataLoader` is TorchTitan's ``HuggingFaceTextDataLoader`` with
three more fields (``text_column``, ``streaming``, ``min_doc_tokens``); its
dataset, :class:`TextDataset`, keeps TorchTitan's packing, positions,
data-parallel split, re-loop shuffle and checkpoint state (``sample_idx`` /
``epoch`` / buffers for map-style data, the ``IterableDataset``'s own
``state_dict`` when streaming), so a resumed run continues with exactly the
rows the uninterrupted run would have read. Packing (TorchTitan's): each
document is ``[BOS] + text + [EOS]``; rows of ``seq_len`` are cut from the
concatenation, so a document longer than ``seq_len`` spans several rows and
each continuation row's positions restart at 0 (``_normalize_positions``: a
row is one segment of the document for the model; ``positions == 0`` is its
document start). Short documents share rows, separated by their position
resets (document masking in the model).

``min_doc_tokens`` > 0 keeps only documents with at least that many tokens
(long-context training on the long documents only). A pass over this rank's share
that yields no row raises instead of re-looping forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader, HuggingFaceTextDataset

from titan_cp.components.datasets import check_column, load_local, text_of


class TextDataset(HuggingFaceTextDataset):
    """TorchTitan's text dataset over :func:`titan_cp.components.datasets.load_local`."""

    def __init__(self, *, dataset_name: str, dataset_path: str | None, tokenizer, text_column: str = "text",
                 streaming: bool = False, min_doc_tokens: int = 0, **kwargs):
        from torchtitan.hf_datasets import text_datasets

        path = dataset_path or text_datasets.DATASETS[dataset_name.lower()].path
        ds = load_local(str(path), streaming=streaming)
        check_column(ds, text_column, str(path))
        self.path, self.text_column, self.min_doc_tokens = str(path), text_column, min_doc_tokens
        self._ds = ds
        table = dict(text_datasets.DATASETS)
        text_datasets.DATASETS[dataset_name.lower()] = text_datasets.DatasetConfig(
            path=str(path), loader=lambda _: ds, sample_processor=lambda s: text_of(s, text_column, str(path)))
        try:
            super().__init__(dataset_name=dataset_name, dataset_path=str(path), tokenizer=tokenizer, **kwargs)
        finally:
            text_datasets.DATASETS.clear()
            text_datasets.DATASETS.update(table)
        self._rows_this_epoch = 0
        if min_doc_tokens > 0:
            self._tokenizer = _Filtering(tokenizer, min_doc_tokens)

    def __iter__(self):
        for item in super().__iter__():
            self._rows_this_epoch += 1
            yield item

    def reloop(self) -> None:
        grew = len(self._inputs_buffer) != getattr(self, "_buffer_at_pass_start", 0)
        self._buffer_at_pass_start = len(self._inputs_buffer)
        if self._rows_this_epoch == 0 and not grew:  # a pass that added no token: it would loop forever
            raise RuntimeError(
                f"dataloader.dataset_path = '{self.path}': a whole pass over this data-parallel rank's share "
                f"gave no row of seq_len tokens (no document, too few tokens, or none with >= "
                f"dataloader.min_doc_tokens = {self.min_doc_tokens} tokens), so it would re-loop forever. Use "
                f"more data per data-parallel rank, a shorter training.seq_len, or a lower min_doc_tokens.")
        self._rows_this_epoch = 0
        super().reloop()


class _Filtering:
    """A tokenizer view whose ``encode`` returns [] for documents shorter than ``min_tokens`` (skipped)."""

    def __init__(self, tokenizer, min_tokens: int):
        self._tok, self._min = tokenizer, min_tokens

    def encode(self, text, add_bos=True, add_eos=True):
        ids = self._tok.encode(text, add_bos=add_bos, add_eos=add_eos)
        return ids if len(ids) >= self._min else []

    def __getattr__(self, name):
        return getattr(self._tok, name)


class TextDataLoader(HuggingFaceTextDataLoader):
    """``HuggingFaceTextDataLoader`` with local formats, a text column, streaming and a length filter."""

    @dataclass(kw_only=True, slots=True)
    class Config(HuggingFaceTextDataLoader.Config):
        text_column: str = "text"
        """The column holding each document's text."""

        streaming: bool = False
        """Read the files lazily (data larger than memory); resumes from the iterable's own state."""

        min_doc_tokens: int = 0
        """Train only on documents with at least this many tokens (0: all)."""

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = 1, **kwargs):
        from torchtitan.components.dataloader import ParallelAwareDataloader

        ds = TextDataset(dataset_name=config.dataset, dataset_path=config.dataset_path, tokenizer=tokenizer,
                         text_column=config.text_column, streaming=config.streaming,
                         min_doc_tokens=config.min_doc_tokens, seq_len=seq_len, dp_rank=dp_rank,
                         dp_world_size=dp_world_size, infinite=config.infinite)
        ParallelAwareDataloader.__init__(
            self, ds, dp_rank=dp_rank, dp_world_size=dp_world_size, num_workers=config.num_workers,
            persistent_workers=config.persistent_workers, pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor, snapshot_every_n_steps=snapshot_every_n_steps,
            batch_size=local_batch_size)


__all__ = ["TextDataLoader", "TextDataset"]
