"""Bad data / config inputs fail at start-up with a ConfigError naming the field (docs/data.md's table).

Each case is built through the TOML front end (``build_config``: exactly what
``train.py`` runs before any process group); two are also launched as real
``train.py`` processes (rc != 0, field in the output, under a timeout).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from titan_cp.testing import run_on_ranks

from titan_cp.errors import ConfigError
from titan_cp.train.toml_config import build_config
from tests.support.train_runs import REPO, run_env


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _cases(d):
    doc = json.dumps({"text": "the cat sat on the mat " * 40})
    (d / "folder").mkdir()
    (d / "mix").mkdir()
    _write(d / "mix" / "a.jsonl", [doc])
    (d / "mix" / "b.parquet").write_bytes(b"")
    return {  # name -> (overrides, field the message must name)
        "empty file": ([("dataloader", "dataset_path", _write(d / "empty.jsonl", []))], "dataloader.dataset_path"),
        "blank lines only": ([("dataloader", "dataset_path", _write(d / "blank.jsonl", ["", " "]))],
                             "dataloader.dataset_path"),
        "fewer tokens than a batch": ([("dataloader", "dataset_path", _write(d / "short.jsonl", ['{"text": "a cat"}']))],
                                      "training.seq_len"),
        "missing column": ([("dataloader", "dataset_path", _write(d / "ok.jsonl", [doc] * 4)),
                            ("dataloader", "text_column", "content")], "dataloader.text_column"),
        "malformed line": ([("dataloader", "dataset_path", _write(d / "bad.jsonl", [doc, '{"text": "unclosed']))],
                           "bad.jsonl:2"),
        "line not an object": ([("dataloader", "dataset_path", _write(d / "list.jsonl", [doc, "[1, 2]"]))],
                               "list.jsonl:2"),
        "text not a string": ([("dataloader", "dataset_path", _write(d / "num.jsonl", ['{"text": 7}']))],
                              "dataloader.text_column"),
        "path does not exist": ([("dataloader", "dataset_path", str(d / "nope.jsonl"))], "dataloader.dataset_path"),
        "glob matches nothing": ([("dataloader", "dataset_path", str(d / "none-*.parquet"))],
                                 "dataloader.dataset_path"),
        "folder not save_to_disk": ([("dataloader", "dataset_path", str(d / "folder"))], "dataloader.dataset_path"),
        "glob mixes formats": ([("dataloader", "dataset_path", str(d / "mix" / "*"))], "dataloader.dataset_path"),
        "min_doc_tokens above every doc": ([("dataloader", "dataset_path", str(d / "ok.jsonl")),
                                            ("dataloader", "min_doc_tokens", 100_000)], "dataloader.min_doc_tokens"),
        "tokenizer ids past the vocab": ([("model", "vocab_size", 512)], "model.vocab_size"),
        "qwen3_5 model.dim": ([("model", "name", "qwen3_5"), ("model", "dim", 32)], "model.dim"),
        "qwen3_5 model.vocab_size": ([("model", "name", "qwen3_5"), ("model", "vocab_size", 2048)],
                                     "model.vocab_size"),
        "gdn attention field without attention": ([("model", "attn_num_heads", 8)], "model.attn_num_heads"),
        # an override nothing reads, any type, any family (titan_cp.train.config_reads)
        "gdn float field without attention": ([("model", "rope_theta", 5e5)], "model.rope_theta"),
        "gdn kernel with attention layers only": ([("model", "layer_pattern", "A"), ("model", "kernel", "recurrent")],
                                                  "model.kernel"),
        "kda attention field without attention": ([("model", "name", "kda"), ("model", "attn_num_kv_heads", 4)],
                                                  "model.attn_num_kv_heads"),
        "mamba2 model.expand_v": ([("model", "name", "mamba2"), ("model", "expand_v", 1.0)], "model.expand_v"),
        "qwen3_5 moe model.dim": ([("model", "name", "qwen3_5"), ("model", "flavor", "debugmodel_moe"),
                                   ("model", "dim", 32)], "model.dim"),
        # q M exists only under state-passing CP: the setting is refused where it does nothing
        "cp_q_transition keep without CP": ([("parallelism", "cp_q_transition", "keep")],
                                            "parallelism.cp_q_transition"),
        "cp_q_transition written without CP": ([("parallelism", "cp_q_transition", "recompute")],
                                               "parallelism.cp_q_transition"),
        "unknown dataloader key": ([("dataloader", "text_colum", "text")], "dataloader.text_colum"),
        "unknown dataset": ([("dataloader", "dataset", "no_such_set")], "dataloader.dataset"),
    }


def _missed_cases(rank: int, world: int, tmp: Path) -> dict[str, str]:
    """The bad inputs that were accepted or named the wrong field (run in a fresh process, as train.py is)."""
    cases = _cases(tmp)
    assert len(cases) >= 23
    missed = {}
    for name, (overrides, field) in cases.items():
        try:
            build_config({}, [("training", "seq_len", 128), *overrides], world_size=1)  # as train.py: data read
            missed[name] = "accepted"
        except ConfigError as e:
            if field not in str(e):
                missed[name] = str(e)
    return missed


def test_every_bad_input_names_its_field(tmp_path):
    # A fresh interpreter: start-up checks run once per process in real use, and earlier tests in
    # this pytest process leave TorchTitan / dataset registries in states a launch never sees.
    (missed,) = run_on_ranks(_missed_cases, 1, args=(tmp_path,), init_process_group=False, timeout=600)
    assert not missed, missed


@pytest.mark.parametrize("family", ["gdn", "qwen3_5"])
def test_q_transition_only_where_state_passing_cp_runs(family):
    """``parallelism.cp_q_transition``: refused with head-parallel CP (no q M), reaches the model config
    under state-passing CP; a misspelt choice is named with the valid ones."""
    cp2 = [("model", "name", family), ("training", "seq_len", 128), ("parallelism", "context_parallel_degree", 2)]
    build = lambda *extra: build_config({}, [*cp2, *extra], world_size=2, check_runtime=False)  # noqa: E731
    with pytest.raises(ConfigError, match=r"parallelism.cp_q_transition = 'keep' has no effect with "
                                          r"parallelism.cp_exchange = 'alltoall'.*use parallelism.cp_exchange"):
        build(("parallelism", "cp_exchange", "alltoall"), ("parallelism", "cp_q_transition", "keep"))
    with pytest.raises(ConfigError, match=r"parallelism.cp_q_transition = 'kep' is not one of .*Did you mean 'keep'"):
        build(("parallelism", "cp_q_transition", "kep"))
    for q_transition in ("keep", "recompute"):
        assert build(("parallelism", "cp_q_transition", q_transition)).model_spec.model.cp_q_transition == q_transition


@pytest.mark.parametrize("args, field", [
    (["--job.config_file", "train_configs/debug_cpu.toml", "--dataloader.dataset_path", "{empty}"],
     "dataloader.dataset_path"),
    (["--job.config_file", "train_configs/qwen3_5_debug_cp2.toml", "--model.dim", "32"], "model.dim"),
])
def test_train_py_stops_before_any_step(tmp_path, args, field):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cmd = [sys.executable, "train.py", "--job.dump_folder", str(tmp_path / "out"), *[a.format(empty=empty) for a in args]]
    run = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert field in run.stderr + run.stdout
    assert "step:" not in run.stdout + run.stderr
