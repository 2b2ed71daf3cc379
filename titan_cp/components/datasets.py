"""Local text datasets in the formats users have, read through HF ``datasets`` (offline, no cache files).

``dataloader.dataset_path`` may be

- a ``.jsonl`` / ``.json`` file (one JSON object per line; a line that is not
  JSON fails naming file and line),
- a ``.parquet`` file, an ``.arrow`` file (memory-mapped, as written by
  ``Dataset.save_to_disk`` shards),
- a folder written by ``Dataset.save_to_disk`` (``dataset_info.json`` /
  ``state.json`` inside),
- a glob of shards of one of those formats (``data/train-*.parquet``), read
  in sorted order,
- any other file: one plain-text document.

``dataloader.text_column`` names the column holding the text ("text").
With ``dataloader.streaming`` the files are read lazily
(``load_dataset(format, data_files=..., streaming=True)``, an
``IterableDataset``: data larger than memory); otherwise a map-style
``Dataset`` (parquet and JSONL in memory, arrow memory-mapped), which
TorchTitan resumes by index. Either way
:class:`torchtitan.hf_datasets.text_datasets.HuggingFaceTextDataset` splits
it by data-parallel rank (``split_dataset_by_node``: rows for map-style, whole
shards when the shard count divides by dp for streaming) and packs it; CP
ranks of one DP rank get the same rows (the trainer shards each batch along
the sequence).
"""

from __future__ import annotations

import glob as globlib
import json
from pathlib import Path

from titan_cp.errors import ConfigError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def data_files(path: str) -> list[str]:
    """The files behind ``path`` (a file or a glob), sorted; ConfigError if none."""
    files = sorted(globlib.glob(path)) if any(c in path for c in "*?[") else [path] if Path(path).is_file() else []
    if not files:
        raise ConfigError(f"dataloader.dataset_path = '{path}' matches no file. Point it at a .jsonl / .parquet / "
                          f".arrow file, a glob of such shards, or a save_to_disk folder.")
    kinds = {FORMATS.get(Path(f).suffix) for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"dataloader.dataset_path = '{path}' mixes file formats "
                          f"({sorted(map(str, kinds))}); use one format per dataset.")
    return files


def _read_jsonl(files: list[str]):
    from datasets import Dataset

    rows = []
    for f in files:
        with open(f) as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"dataloader.dataset_path: {f}:{line_no} is not a JSON object ({e.msg}). "
                                      f"Fix or delete that line.") from e
                if not isinstance(row, dict):
                    raise ConfigError(f"dataloader.dataset_path: {f}:{line_no} is {type(row).__name__}, not a "
                                      f"JSON object like {{\"text\": ...}}. Fix or delete that line.")
                rows.append(row)
    return Dataset.from_list(rows)


def load_local(path: str, *, streaming: bool = False):
    """``path`` (see the module docstring) as an HF ``Dataset`` (or ``IterableDataset`` when streaming)."""
    import datasets

    p = Path(path)
    if p.is_dir():
        if not ((p / "dataset_info.json").is_file() or (p / "state.json").is_file()):
            raise ConfigError(f"dataloader.dataset_path = '{path}' is a folder but not one written by "
                              f"Dataset.save_to_disk (no state.json); point it at the files, e.g. '{path}/*.parquet'.")
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds.to_iterable_dataset(num_shards=max(1, len(ds.cache_files))) if streaming else ds
    files = data_files(path)
    fmt = FORMATS.get(Path(files[0]).suffix)
    if fmt is None:  # plain text: one document per file
        return datasets.Dataset.from_list([{"text": Path(f).read_text()} for f in files])
    if streaming:
        return datasets.load_dataset(fmt, data_files=files, split="train", streaming=True)
    if fmt == "json":
        return _read_jsonl(files)
    if fmt == "arrow":
        return datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
    import pyarrow as pa
    import pyarrow.parquet as pq

    return datasets.Dataset(pa.concat_tables([pq.read_table(f) for f in files]))


def check_column(ds, column: str, path: str) -> None:
    """ConfigError naming ``dataloader.text_column`` when ``ds`` has no such column."""
    names = ds.column_names if ds.column_names is not None else list(next(iter(ds), {}).keys())
    if names and column not in names:  # no columns at all: an empty dataset, reported as such by the caller
        raise ConfigError(f"dataloader.text_column = '{column}' is not a column of '{path}' (columns: {names}). "
                          f"Set dataloader.text_column to the column holding the text.")


def text_of(sample: dict, column: str, path: str) -> str:
    text = sample.get(column)
    if not isinstance(text, str):
        raise ConfigError(f"dataloader.text_column = '{column}': a record of '{path}' holds "
                          f"{type(text).__name__} there, not text ({str(sample)[:80]}). Fix the record or the column.")
    return text


__all__ = ["FORMATS", "check_column", "data_files", "load_local", "text_of"]
