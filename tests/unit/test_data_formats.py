"""Local dataset formats through titan_cp's text loader: the same token ids, a dp split, exact resume, filters, watchdog.

Small files written here: JSONL shards (a glob), parquet, an arrow file and a
``save_to_disk`` folder holding the same 40 documents; each must give the
same packed batches as the JSONL shards (map-style and streaming).
"""

from __future__ import annotations

import json
import time

import datasets
import pytest
import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from titan_cp.components.data import TOKENIZER_PATH, register_datasets
from titan_cp.components.text_loader import TextDataLoader
from titan_cp.components.watchdog import StepWatchdog

SEQ, BATCH = 32, 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    rows = [{"body": f"the cat number {i} sat on the mat " * (1 + i % 7), "id": i} for i in range(40)]
    for k in range(2):
        (d / f"train-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k * 20:(k + 1) * 20]))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(d / "train.parquet"))
    ds.save_to_disk(str(d / "disk"))
    arrow = next(p for p in (d / "disk").iterdir() if p.suffix == ".arrow")
    return {"jsonl": (str(d / "train-*.jsonl"), False), "parquet": (str(d / "train.parquet"), False),
            "arrow": (str(arrow), False), "save_to_disk": (str(d / "disk"), False),
            "parquet_streaming": (str(d / "train.parquet"), True), "rows": rows}


@pytest.fixture(scope="module")
def tokenizer():
    register_datasets()
    return HuggingFaceTokenizer(tokenizer_path=str(TOKENIZER_PATH))


def loader(tokenizer, path, streaming=False, dp=(0, 1), **kw):
    cfg = TextDataLoader.Config(dataset="tiny_corpus", dataset_path=path, text_column="body", streaming=streaming, **kw)
    return TextDataLoader(cfg, dp_world_size=dp[1], dp_rank=dp[0], tokenizer=tokenizer, seq_len=SEQ,
                          local_batch_size=BATCH)


def batches(dl, n):
    it = iter(dl)
    return [next(it) for _ in range(n)]


def packed_reference(tokenizer, texts, n_rows):
    """TorchTitan's packing written out: [BOS]+doc+[EOS] concatenated, rows of SEQ, positions per document."""
    inputs, labels, pos = [], [], []
    while len(inputs) < n_rows * SEQ:
        for t in texts:
            ids = tokenizer.encode(t, add_bos=True, add_eos=True)
            inputs += ids[:-1]
            labels += ids[1:]
            pos += range(len(ids) - 1)
    rows = []
    for r in range(n_rows):
        p = pos[r * SEQ:(r + 1) * SEQ]
        first_reset = next((i for i, v in enumerate(p) if v == 0), SEQ)
        p = [v - p[0] if i < first_reset else v for i, v in enumerate(p)]  # a continued document restarts at 0
        rows.append((inputs[r * SEQ:(r + 1) * SEQ], p, labels[r * SEQ:(r + 1) * SEQ]))
    return rows


def test_every_format_gives_the_same_token_ids(files, tokenizer):
    ref = packed_reference(tokenizer, [r["body"] for r in files["rows"]], 8)
    got = {name: batches(loader(tokenizer, *files[name]), 4)
           for name in ("jsonl", "parquet", "arrow", "save_to_disk", "parquet_streaming")}
    for name, bs in got.items():
        rows = [(x["input"][j].tolist(), x["positions"][j].tolist(), y[j].tolist()) for x, y in bs for j in range(BATCH)]
        assert rows == ref, name
    # long documents span rows: some row starts mid-document (label continues) and still has position 0 first
    assert any(r[1][0] == 0 and r[0][0] != tokenizer.bos_id for r in ref)


def test_data_parallel_ranks_read_disjoint_rows(files, tokenizer):
    firsts = [batches(loader(tokenizer, *files["parquet"], dp=(r, 2)), 1)[0][0]["input"] for r in range(2)]
    assert not torch.equal(firsts[0], firsts[1])


@pytest.mark.parametrize("name", ["parquet", "parquet_streaming"])
def test_resume_mid_epoch_sees_the_uninterrupted_batches(files, tokenizer, name):
    full = batches(loader(tokenizer, *files[name]), 7)
    first = loader(tokenizer, *files[name])
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    resumed = loader(tokenizer, *files[name])
    resumed.load_state_dict(state)
    after = batches(resumed, 4)
    for (x, y), (xr, yr) in zip(full[3:], after):
        assert torch.equal(x["input"], xr["input"]) and torch.equal(x["positions"], xr["positions"])
        assert torch.equal(y, yr)


def test_min_doc_tokens_keeps_only_long_documents(files, tokenizer):
    long_texts = [r["body"] for r in files["rows"]
                  if len(tokenizer.encode(r["body"], add_bos=True, add_eos=True)) >= 60]
    assert 0 < len(long_texts) < len(files["rows"])
    ref = packed_reference(tokenizer, long_texts, 4)
    bs = batches(loader(tokenizer, *files["parquet"], min_doc_tokens=60), 2)
    assert [x["input"][j].tolist() for x, _ in bs for j in range(BATCH)] == [r[0] for r in ref]


def test_a_share_without_rows_raises_instead_of_relooping(tmp_path, tokenizer):
    (tmp_path / "one.jsonl").write_text(json.dumps({"body": "a cat"}) + "\n")
    with pytest.raises(RuntimeError, match="dataloader.dataset_path"):
        batches(loader(tokenizer, str(tmp_path / "one.jsonl"), min_doc_tokens=1000), 1)  # every doc filtered


def test_step_watchdog_ends_a_busy_process_without_steps():
    exits = []
    dog = StepWatchdog(no_step_s=0.3, interval_s=0.05, exit_fn=exits.append)
    for step in range(1, 6):  # steps every 0.1 s: quiet
        dog.step_seen(step)
        time.sleep(0.1)
    assert exits == []
    deadline = time.monotonic() + 3
    while not exits and time.monotonic() < deadline:  # busy, no step
        sum(range(10_000))
    dog.stop()
    assert exits == [StepWatchdog.EXIT_CODE]


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_start_up_scan_shows_progress_on_rank_0_only(files, monkeypatch, capsys, rank, shown):
    """The start-up data check scans until one batch of tokens is seen; rank 0 prints where it is."""
    from types import SimpleNamespace

    from titan_cp.components import data_checks
    from titan_cp.errors import ConfigError

    monkeypatch.setattr(data_checks, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setenv("RANK", rank)
    path, _ = files["parquet"]
    dl = TextDataLoader.Config(dataset="tiny_corpus", dataset_path=path, text_column="body", min_doc_tokens=10**6)
    config = SimpleNamespace(dataloader=dl, hf_assets_path=str(TOKENIZER_PATH), model_spec=SimpleNamespace(
        model=SimpleNamespace(vocab_size=2048)), training=SimpleNamespace(local_batch_size=BATCH, seq_len=SEQ))
    with pytest.raises(ConfigError, match="dataloader.min_doc_tokens"):  # no document is that long: a full scan
        data_checks.check_data(config, 1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"[titan_cp] checking {path}")]
    if shown:
        assert len(lines) == len(files["rows"]) and lines[-1].startswith(f"[titan_cp] checking {path}: 40 documents")
    else:
        assert lines == []
