"""An FLA checkpoint written by FLA's own ``save_pretrained`` trains under titan_cp with CP 2.

One ``torchrun`` launch of ``train_configs/fla_tiny_cp2.toml`` (2 steps, short rows) on the tiny
checkpoint of ``tools/make_tiny_fla_checkpoint.py`` checks:

- the model shape comes from ``[model] hf_config`` (no flavor describes it: 2 key heads, 4 value
  heads, SwiGLU 96, vocab 1024) and the weights from ``checkpoint.initial_load_in_hf``;
- the first-step loss equals FLA's own ``GatedDeltaNetForCausalLM`` loss on the same batch (FLA's
  kernels under the Triton interpreter, the packed documents as FLA ``cu_seqlens``);
- ``checkpoint.last_save_in_hf`` writes a complete FLA folder (config.json + safetensors) whose
  weights are the trained ones, and ``python -m titan_cp.cli.evaluate`` on it reproduces the
  validator's loss (``--validator.enable``, shipped held-out documents) logged at that step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer

from titan_cp.components.data import CORPUS_PATH, VALIDATION_STEPS
from titan_cp.cli.evaluate import main as evaluate_main
from titan_cp.cli.evaluate import packed_rows
from titan_cp.models.gdn.hf_folder import load_hf_state_dict, load_model
from titan_cp.components.metrics import read_metrics_jsonl

REPO = Path(__file__).resolve().parents[2]
from tests.support.fla_reference import skip_reason  # noqa: E402
from tests.unit.test_hf import run_fla  # noqa: E402

SEQ_LEN, BATCH, STEPS = 128, 2, 2


@pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
def test_fla_save_pretrained_trains_under_cp2(tmp_path):
    from tools.make_tiny_fla_checkpoint import make

    fla_dir = make(tmp_path / "fla_tiny")
    tokenizer = HuggingFaceTokenizer(tokenizer_path=str(fla_dir))
    rows = list(packed_rows(str(CORPUS_PATH), tokenizer, SEQ_LEN, BATCH))  # the trainer's first batch
    batch = {name: torch.stack([r[i] for r in rows]) for i, name in enumerate(("tokens", "positions", "labels"))}
    assert int((batch["positions"] == 0).sum()) > BATCH  # documents start inside the rows
    torch.save(batch, tmp_path / "batch.pt")
    run_fla("loss", str(fla_dir), str(tmp_path / "batch.pt"), str(tmp_path / "fla_loss.pt"))
    fla_loss = torch.load(tmp_path / "fla_loss.pt").item()

    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    dump = tmp_path / "run"
    proc = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
         "--job.config_file", str(REPO / "train_configs" / "fla_tiny_cp2.toml"),
         "--job.dump_folder", str(dump), "--job.hf_assets_path", str(fla_dir),
         "--model.hf_config", str(fla_dir / "config.json"), "--checkpoint.initial_load_path", str(fla_dir),
         "--training.steps", str(STEPS), "--training.seq_len", str(SEQ_LEN), "--validator.freq", str(STEPS),
         "--comm.trace_buf_size", "0"],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    first_loss = read_metrics_jsonl(str(dump / "metrics.jsonl"))[1]["loss"]
    print(f"first-step loss: titan_cp CP 2 {first_loss:.7f}, FLA {fla_loss:.7f}")
    assert abs(first_loss - fla_loss) <= 1e-5 * fla_loss

    saved = dump / "checkpoint" / f"step-{STEPS}"
    assert json.loads((saved / "config.json").read_text())["model_type"] == "gated_deltanet"
    trained, initial = load_hf_state_dict(saved), load_hf_state_dict(fla_dir)
    assert trained.keys() == initial.keys()
    assert all(trained[k].shape == initial[k].shape for k in initial)
    assert sum(not torch.equal(trained[k], initial[k]) for k in initial) == len(initial)  # every tensor trained
    model, _ = load_model(dump / "checkpoint")
    assert model.config.num_v_heads == 4 and model.config.hidden_dim == 96

    logged = re.findall(r"validate step:\s+(\d+)\s+\S*loss:\s+([\d.]+)", proc.stdout + proc.stderr)
    validation = {int(step): float(loss) for step, loss in logged}
    assert STEPS in validation, (proc.stdout + proc.stderr)[-3000:]
    assert evaluate_main(["--checkpoint", str(dump / "checkpoint"), "--seq_len", str(SEQ_LEN),
                          "--max_rows", str(VALIDATION_STEPS * BATCH), "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["loss"]
    print(f"validation loss at step {STEPS}: validator {validation[STEPS]:.4f}, titan_cp.cli.evaluate {evaluated:.6f}")
    assert abs(evaluated - validation[STEPS]) <= 6e-5  # the validator logs 4 decimals
