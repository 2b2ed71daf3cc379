"""CP 2 training (real ``torchrun train.py``) from parquet, arrow, a ``save_to_disk`` folder and JSONL shards.

The shipped corpus is written here as one parquet file, a ``save_to_disk``
folder (and the arrow file inside it) and two JSONL shards (a glob) under a
custom text column; every CP 2 run starts from the same initialisation (same
seed, same layout) and must see the same token ids as the JSONL run, so their
per-step losses agree to fp32 reduction noise. The parquet run's
step-3 checkpoint, resumed, gives the uninterrupted run's losses at steps 4-6
(the dataloader position is restored mid-epoch).
"""

from __future__ import annotations

import json

import datasets
import pytest

from titan_cp.components.data import CORPUS_PATH
from tests.support.train_runs import CKPT_STEP, RESUME_REL_TOL, STEPS, Runner, assert_losses_close, losses_at, needs_torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_train")
    rows = [{"content": json.loads(line)["text"]} for line in CORPUS_PATH.read_text().splitlines() if line.strip()]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(root / "corpus.parquet"))
    ds.save_to_disk(str(root / "disk"))
    arrow = next(p for p in (root / "disk").iterdir() if p.suffix == ".arrow")
    half = len(rows) // 2
    for k, part in enumerate((rows[:half], rows[half:])):
        (root / f"corpus-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    runner = Runner(root)
    common = ["--data.dataset", "tiny_corpus", "--data.text_column", "content"]
    out = {}
    for name, path in (("parquet", root / "corpus.parquet"), ("jsonl_shards", root / "corpus-*.jsonl"),
                       ("arrow", arrow), ("save_to_disk", root / "disk")):
        out[name] = runner.launch(f"cp2_{name}", 2, "cp2", ["--training.local_batch_size", "4"],
                                  [*common, "--data.dataset_path", str(path)])
    # the parquet run's full step-CKPT_STEP checkpoint (model, optimizer, dataloader position) continued
    ckpt = root / "cp2_parquet" / "checkpoint" / f"step-{CKPT_STEP}"
    out["parquet_resumed"] = runner.launch(
        "cp2_parquet_resumed", 2, "cp2", ["--training.local_batch_size", "4", "--checkpoint.initial_load_path",
                                          str(ckpt), "--checkpoint.initial_load_model_only", "false"],
        [*common, "--data.dataset_path", str(root / "corpus.parquet")])
    return out


@needs_torchrun
def test_cp2_from_parquet_equals_cp2_from_jsonl_shards(runs):
    steps = range(1, STEPS + 1)
    parquet, jsonl = losses_at(runs["parquet"], steps), losses_at(runs["jsonl_shards"], steps)
    assert_losses_close(parquet, jsonl, RESUME_REL_TOL, "cp2 parquet vs jsonl shards")
    assert parquet[-1] < parquet[0]  # it trains on the text


@needs_torchrun
@pytest.mark.parametrize("source", ["arrow", "save_to_disk"])
def test_cp2_from_arrow_and_save_to_disk_equals_cp2_from_jsonl_shards(runs, source):
    steps = range(1, STEPS + 1)
    assert_losses_close(losses_at(runs[source], steps), losses_at(runs["jsonl_shards"], steps), RESUME_REL_TOL,
                        f"cp2 {source} vs jsonl shards")


@needs_torchrun
def test_resume_mid_epoch_from_parquet_sees_the_uninterrupted_batches(runs):
    """The dataloader's position is in the checkpoint: steps after the resume read the same rows (a loader
    restarted from the first row would give other losses)."""
    after = range(CKPT_STEP + 1, STEPS + 1)
    assert min(runs["parquet_resumed"]) == CKPT_STEP + 1
    assert_losses_close(losses_at(runs["parquet_resumed"], after), losses_at(runs["parquet"], after), RESUME_REL_TOL,
                        "cp2 parquet resumed at step 3")
