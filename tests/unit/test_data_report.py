"""``titan_cp data-report``: its counts equal a count done here, on the shipped corpus and on long documents."""

from __future__ import annotations

import json

import datasets
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from titan_cp.cli import data_report
from titan_cp.components.data import CORPUS_PATH, TOKENIZER_PATH


def _expected(texts, tok, thresholds):
    lens = [len(tok.encode(t, add_bos=True, add_eos=True)) for t in texts]
    hist = {}
    for n in lens:
        lo = 1
        while lo * 2 <= n:
            lo *= 2
        hist[str(lo)] = hist.get(str(lo), 0) + 1
    long = {str(t): {"documents": sum(n >= t for n in lens), "tokens": sum(n for n in lens if n >= t)}
            for t in thresholds}
    return {"documents": len(lens), "tokens": sum(lens), "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "long": long}


def test_report_on_the_shipped_corpus(tmp_path, capsys):
    tok = HuggingFaceTokenizer(tokenizer_path=str(TOKENIZER_PATH))
    texts = [json.loads(line)["text"] for line in CORPUS_PATH.read_text().splitlines() if line.strip()]
    assert data_report.main(["--json", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    assert got == _expected(texts, tok, (4096, 32768, 131072))
    assert f"documents: {len(texts)}" in capsys.readouterr().out


def test_report_on_generated_long_documents(tmp_path, capsys):
    tok = HuggingFaceTokenizer(tokenizer_path=str(TOKENIZER_PATH))
    base = "the cat sat on the mat and the dog ran far away . "
    texts = [base * n for n in (1, 3, 40, 90, 200, 7, 400)]  # ~13 tokens per copy: up to ~5K tokens
    datasets.Dataset.from_list([{"content": t} for t in texts]).to_parquet(str(tmp_path / "long.parquet"))
    thresholds = (256, 1024, 4096)
    argv = ["--path", str(tmp_path / "long.parquet"), "--text_column", "content", "--json", str(tmp_path / "r.json"),
            "--progress_seconds", "0", "--thresholds", *map(str, thresholds)]
    assert data_report.main(argv) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    want = _expected(texts, tok, thresholds)
    assert got == want
    assert 0 < want["long"]["4096"]["documents"] < want["long"]["256"]["documents"] < len(texts)  # the set spans bins
    captured = capsys.readouterr()
    assert "[data-report]" in captured.err  # progress lines
    assert data_report.main(["--path", str(tmp_path / "long.parquet")]) == 2  # no "text" column: named, rc 2
    assert "dataloader.text_column" in capsys.readouterr().err
