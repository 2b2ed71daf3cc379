"""How long are the documents of a dataset, in tokens? Before training, not after.

    titan_cp data-report                                    # the shipped corpus, shipped tokenizer
    titan_cp data-report --path 'data/train-*.parquet' --text_column content --tokenizer path/to/tokenizer
    titan_cp data-report --path corpus.jsonl --json report.json

``--path`` takes everything ``dataloader.dataset_path`` takes (JSONL, parquet,
arrow, a ``save_to_disk`` folder, a glob of shards;
:mod:`titan_cp.components.datasets`), read the same way (streaming, so a
dataset larger than memory is scanned, not loaded). Each document is counted
as the trainer tokenizes it, ``[BOS] + text + [EOS]``. The report: documents,
tokens, a histogram of document lengths in power-of-two bins (bin ``[2^k,
2^(k+1))``), and the documents / tokens in documents of at least 4K, 32K and
128K tokens (``--thresholds``): the data a long-context run at that
``training.seq_len`` can learn long-range dependencies from (see
``dataloader.min_doc_tokens``). Progress goes to stderr every
``--progress_seconds`` on long scans.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from titan_cp.errors import ConfigError


@dataclass
class DataReport:
    """Documents and tokens of a local dataset under a tokenizer."""

    path: str = ""
    """Dataset (file, glob of shards, save_to_disk folder); empty: the shipped tiny corpus."""
    text_column: str = "text"
    """Column holding each document's text."""
    tokenizer: str = ""
    """Hugging Face tokenizer folder (job.hf_assets_path); empty: the shipped tokenizer."""
    thresholds: tuple[int, ...] = (4096, 32768, 131072)
    """Report documents / tokens in documents with at least this many tokens."""
    limit: int = 0
    """Stop after this many documents (0: all)."""
    progress_seconds: float = 10.0
    """Print progress to stderr this often on long scans."""
    json: str = ""
    """Also write the report to this file as JSON."""


@dataclass
class Counts:
    documents: int = 0
    tokens: int = 0
    histogram: dict[int, int] = field(default_factory=dict)  # k -> documents with 2^k <= length < 2^(k+1)
    long: dict[int, list[int]] = field(default_factory=dict)  # threshold -> [documents, tokens]

    def add(self, n: int, thresholds) -> None:
        self.documents += 1
        self.tokens += n
        k = max(n, 1).bit_length() - 1
        self.histogram[k] = self.histogram.get(k, 0) + 1
        for t in thresholds:
            if n >= t:
                c = self.long.setdefault(t, [0, 0])
                c[0] += 1
                c[1] += n


def scan(args: DataReport, out=None) -> Counts:
    """Tokenize every document of ``args.path`` once (streaming) and count."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from titan_cp.components.data import CORPUS_PATH, TOKENIZER_PATH
    from titan_cp.components.datasets import check_column, load_local, text_of

    path = args.path or str(CORPUS_PATH)
    tok = HuggingFaceTokenizer(tokenizer_path=args.tokenizer or str(TOKENIZER_PATH))
    ds = load_local(path, streaming=True)
    check_column(ds, args.text_column, path)
    counts = Counts(long={t: [0, 0] for t in args.thresholds})
    start = last = time.monotonic()
    for sample in ds:
        counts.add(len(tok.encode(text_of(sample, args.text_column, path), add_bos=True, add_eos=True)),
                   args.thresholds)
        if time.monotonic() - last >= args.progress_seconds:
            last = time.monotonic()
            print(f"[data-report] {counts.documents} documents, {counts.tokens} tokens ({last - start:.0f} s)",
                  file=out or sys.stderr, flush=True)
        if args.limit and counts.documents >= args.limit:
            break
    return counts


def format_report(path: str, c: Counts) -> str:
    lines = [f"dataset: {path}", f"documents: {c.documents}", f"tokens: {c.tokens}",
             "length histogram (tokens per document, [BOS] and [EOS] included):"]
    for k in sorted(c.histogram):
        lines.append(f"  [{2 ** k:>7}, {2 ** (k + 1):>7}): {c.histogram[k]:>8}")
    for t, (docs, toks) in sorted(c.long.items()):
        share = toks / c.tokens if c.tokens else 0.0
        lines.append(f"documents >= {t} tokens: {docs} ({toks} tokens, {share:.1%} of all tokens)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tyro

    args = tyro.cli(DataReport, args=argv, prog="titan_cp data-report", description=__doc__.split("\n\n")[0],
                    use_underscores=True)
    try:
        counts = scan(args)
    except ConfigError as e:
        print(f"titan_cp data-report: {e}", file=sys.stderr)
        return 2
    print(format_report(args.path or "tiny_corpus (shipped)", counts))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "documents": counts.documents, "tokens": counts.tokens,
            "histogram": {str(2 ** k): v for k, v in sorted(counts.histogram.items())},
            "long": {str(t): {"documents": d, "tokens": n} for t, (d, n) in counts.long.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
