"""Real ``torchrun train.py`` runs of train_configs/qwen3_5_debug_cp2.toml (CP 2 on 2 CPU ranks).

- the loss falls over 6 steps (shipped corpus, TorchTitan's debugmodel with 4 layers);
- a run resumed from its step-3 checkpoint logs the uninterrupted run's losses;
- a checkpoint written by transformers (``save_pretrained`` of a random
  ``Qwen3_5ForCausalLM`` of the same shape, text-only key names) is loaded
  by the trainer (``initial_load_in_hf``) and saved back in HF format at the
  end (``last_save_in_hf``); after one step at lr 1e-12 (AdamW moves each
  weight by ~lr) the saved tensors are the loaded ones to 1e-9, and
  transformers loads them again without missing keys.
Start-up checks (no launch): a checkpoint ``config.json`` that disagrees with
the flavor names the field; vision with CP and MoE with TP are refused, MoE with EP accepted.
The MoE config (train_configs/qwen3_5_moe_debug_cp2_ep2.toml, CP 2 x EP 2): loss falls, resume exact.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from tests.support.qwen35_common import hf_causal_lm_class
from tests.support.train_runs import REPO, assert_losses_close, run_env, needs_torchrun
from titan_cp.errors import ConfigError
from titan_cp.components.metrics import read_metrics_jsonl

STEPS, CKPT_STEP = 6, 3
COMMON = [
    "--training.seq_len", "128", "--training.steps", str(STEPS), "--metrics.log_freq", "1",
    "--comm.trace_buf_size", "0", "--debug.enable_structured_logging", "false",
]


def _torchrun(root, name: str, extra: list[str], config: str = "qwen3_5_debug_cp2.toml") -> dict[int, dict]:
    dump = root / name
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", str(REPO / "train.py"),
           "--job.config_file", str(REPO / "train_configs" / config),
           *COMMON, "--job.dump_folder", str(dump), *extra]
    proc = subprocess.run(cmd, check=False, cwd=root, env=run_env(), capture_output=True, text=True, timeout=900)
    (root / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"run {name} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return read_metrics_jsonl(str(dump / "metrics.jsonl"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("qwen3_5_runs")


@pytest.fixture(scope="module")
def full_run(root):
    return _torchrun(root, "full", ["--checkpoint.enable", "--checkpoint.interval", str(CKPT_STEP),
                                    "--checkpoint.last_save_model_only", "false"])


@needs_torchrun
def test_cp2_loss_falls(full_run):
    losses = [full_run[s]["loss"] for s in range(1, STEPS + 1)]
    assert losses[-1] < losses[0] - 0.5, losses


@needs_torchrun
def test_cp2_resume_reproduces_uninterrupted_run(root, full_run):
    ckpt = root / "full" / "checkpoint" / f"step-{CKPT_STEP}"
    resumed = _torchrun(root, "resumed", ["--checkpoint.enable", "--checkpoint.initial_load_path", str(ckpt),
                                          "--checkpoint.initial_load_model_only", "false"])
    assert min(resumed) == CKPT_STEP + 1, sorted(resumed)
    steps = range(CKPT_STEP + 1, STEPS + 1)
    assert_losses_close([resumed[s]["loss"] for s in steps], [full_run[s]["loss"] for s in steps], 1e-6,
                  "resumed vs uninterrupted")


MOE_CONFIG = "qwen3_5_moe_debug_cp2_ep2.toml"  # debugmodel_moe, CP 2 x EP 2, experts in float32


@pytest.fixture(scope="module")
def moe_run(root):
    return _torchrun(root, "moe_full", ["--checkpoint.enable", "--checkpoint.interval", str(CKPT_STEP),
                                        "--checkpoint.last_save_model_only", "false"], MOE_CONFIG)


@needs_torchrun
def test_moe_cp2_ep2_loss_falls_and_resume_is_exact(root, moe_run):
    """The MoE config (experts over the CP ranks): loss falls; resuming at step 3 (expert bias and the
    optimizer restored) logs the uninterrupted run's losses."""
    losses = [moe_run[s]["loss"] for s in range(1, STEPS + 1)]
    assert losses[-1] < losses[0] - 0.5, losses
    ckpt = root / "moe_full" / "checkpoint" / f"step-{CKPT_STEP}"
    resumed = _torchrun(root, "moe_resumed", ["--checkpoint.enable", "--checkpoint.initial_load_path", str(ckpt),
                                              "--checkpoint.initial_load_model_only", "false"], MOE_CONFIG)
    assert min(resumed) == CKPT_STEP + 1, sorted(resumed)
    steps = range(CKPT_STEP + 1, STEPS + 1)
    assert_losses_close([resumed[s]["loss"] for s in steps], [moe_run[s]["loss"] for s in steps], 1e-6,
                        "MoE CP 2 x EP 2 resumed vs uninterrupted")


def _debug_shape():
    from titan_cp.models.qwen3_5.config_registry import DEBUG_SHAPE, model_spec
    from titan_cp.models.qwen3_5.flavors import shape_of

    return shape_of(model_spec("debugmodel", **DEBUG_SHAPE).model)


@needs_torchrun
def test_transformers_checkpoint_in_and_hf_checkpoint_out(root):
    from safetensors.torch import load_file
    from transformers import Qwen3_5TextConfig

    from titan_cp.models.qwen3_5.flavors import hf_text_config

    hf_dir = root / "hf_in"
    torch.manual_seed(0)
    hf_cls = hf_causal_lm_class()
    hf_cls(Qwen3_5TextConfig(**hf_text_config(_debug_shape()))).save_pretrained(hf_dir)
    for f in (REPO / "titan_cp" / "assets" / "tokenizer").iterdir():
        shutil.copy(f, hf_dir / f.name)
    records = _torchrun(root, "hf", [
        "--job.hf_assets_path", str(hf_dir), "--training.steps", "1", "--optimizer.lr", "1e-12",
        "--checkpoint.enable", "--checkpoint.initial_load_path", str(hf_dir),
        "--checkpoint.initial_load_in_hf", "true", "--checkpoint.initial_load_model_only", "true",
        "--checkpoint.last_save_in_hf", "true", "--checkpoint.last_save_model_only", "true",
    ])
    assert 1 in records
    saved_dir = root / "hf" / "checkpoint" / "step-1"
    saved = {}
    for f in saved_dir.glob("*.safetensors"):
        saved.update(load_file(f))
    original = load_file(hf_dir / "model.safetensors")
    assert set(saved) == set(original)
    for key, value in original.items():
        assert (saved[key] - value).abs().max() < 1e-9, key
    assert json.loads((saved_dir / "config.json").read_text())["model_type"] == "qwen3_5_text"  # train.py wrote it
    _, info = hf_cls.from_pretrained(saved_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info


def test_checkpoint_config_json_must_match_the_flavor(tmp_path):
    from titan_cp.models.qwen3_5.config_registry import DEBUG_SHAPE, model_spec
    from titan_cp.models.qwen3_5.flavors import hf_text_config
    from titan_cp.models.qwen3_5.preflight import check_hf_checkpoint

    model = model_spec("debugmodel", **DEBUG_SHAPE).model
    hf = hf_text_config(_debug_shape())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5", "text_config": hf}))
    check_hf_checkpoint(model, str(tmp_path))  # matches: no error
    for field, value in (("hidden_size", 512), ("linear_num_value_heads", 8)):
        (tmp_path / "config.json").write_text(json.dumps(hf | {field: value}))
        with pytest.raises(ConfigError, match=f"{field}: checkpoint {value}"):
            check_hf_checkpoint(model, str(tmp_path))


def test_start_up_accepts_the_tested_layouts_and_refuses_the_rest():
    from torchtitan.config import ParallelismConfig

    from titan_cp.models.qwen3_5.config_registry import model_spec
    from titan_cp.models.qwen3_5.preflight import check_layout, check_moe

    parallelism = ParallelismConfig(context_parallel_degree=2)
    vision = model_spec("debugmodel", with_vision=True).model
    with pytest.raises(ConfigError, match="text only"):
        check_layout(vision, parallelism)
    from titan_cp.models.common.pipeline import check_pipeline_parallel

    dense = model_spec("debugmodel", n_layers=4).model  # PP: the GDN LM's checks (test_qwen3_5_pp.py runs it)
    check_layout(dense, ParallelismConfig(pipeline_parallel_degree=2))
    check_pipeline_parallel(dense, ParallelismConfig(pipeline_parallel_degree=2), local_batch_size=2)
    with pytest.raises(ConfigError, match="parallelism.pipeline_parallel_schedule"):
        check_pipeline_parallel(dense, ParallelismConfig(pipeline_parallel_degree=2,
                                                         pipeline_parallel_schedule="ZBVZeroBubble"), 2)
    moe = model_spec("debugmodel_moe").model
    check_moe(moe, parallelism)  # token-local: CP composes (tests/integration/test_qwen3_5_cp.py)
    check_moe(moe, ParallelismConfig(context_parallel_degree=2, expert_parallel_degree=2))  # test_qwen3_5_moe_ep.py
    check_moe(moe, ParallelismConfig(context_parallel_degree=2, tensor_parallel_degree=2))  # test_qwen3_5_tp.py
    check_moe(moe, ParallelismConfig(context_parallel_degree=2, tensor_parallel_degree=2,
                                     expert_parallel_degree=2))  # TP x EP: test_qwen3_5_tp.py
    with pytest.raises(ConfigError, match=r"expert_parallel_degree = 8 does not divide data_parallel_shard_degree "
                                          r"x context_parallel_degree x tensor_parallel_degree = 1 x 2 x 2"):
        check_moe(moe, ParallelismConfig(data_parallel_shard_degree=1, context_parallel_degree=2,
                                         tensor_parallel_degree=2, expert_parallel_degree=8))
    with pytest.raises(ConfigError, match="parallelism.expert_parallel_degree = 3 does not divide"):
        check_moe(moe, ParallelismConfig(expert_parallel_degree=3))
    check_moe(moe, ParallelismConfig(context_parallel_degree=2, pipeline_parallel_degree=2,
                                     expert_parallel_degree=2))  # PP x CP x EP: test_qwen3_5_pp.py
