"""The TOML front end: every bad config fails at start-up with a message naming the field and the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

import tomli

from titan_cp.train.toml_config import (
    ConfigError,
    build_config,
    config_from_args,
    load_toml,
    parse_cli_value,
    split_args,
)

TRAIN_CONFIGS = REPO / "train_configs"


def build(toml_text: str = "", cli: list[str] = (), world_size: int = 1, check_runtime: bool = False):
    values = tomli.loads(toml_text)
    _, overrides = split_args(list(cli))
    return build_config(values, overrides, source="test.toml", world_size=world_size, check_runtime=check_runtime)


# (id, toml, cli, world_size, regexes that must all appear in the message)
BAD_CONFIGS = [
    ("unknown_section", "[trainig]\nsteps = 3\n", [], 1,
     [r"unknown section \[trainig\]", r"Did you mean 'training'"]),
    ("unknown_key", "[training]\nstesp = 3\n", [], 1,
     [r"test.toml \[training\] stesp", r"unknown key 'stesp'", r"Did you mean 'steps'"]),
    ("unknown_key_cli", "", ["--training.seq_lne", "256"], 1,
     [r"command line --training.seq_lne", r"Did you mean 'seq_len'"]),
    ("unknown_model_key", "[model]\nn_layer = 1\n", [], 1,
     [r"unknown key 'n_layer' in \[model\]", r"Did you mean 'n_layers'"]),
    ("unknown_parallelism_key", "[parallelism]\ncontext_parallel_degre = 2\n", [], 2,
     [r"Did you mean 'context_parallel_degree'"]),
    ("wrong_type_int", "[training]\nsteps = \"ten\"\n", [], 1,
     [r"training.steps = 'ten'", r"expected int"]),
    ("wrong_type_quoted_number", "[training]\nseq_len = \"256\"\n", [], 1,
     [r"training.seq_len", r"expected int", r"without quotes"]),
    ("wrong_type_bool", "[metrics]\nenable_tensorboard = 1\n", [], 1,
     [r"metrics.enable_tensorboard = 1", r"expected bool"]),
    ("wrong_type_model_float", "[model]\nexpand_v = \"two\"\n", [], 1,
     [r"model.expand_v", r"expected float"]),
    ("wrong_literal", "[training]\ndtype = \"float16\"\n", [], 1,
     [r"training.dtype = 'float16'", r"bfloat16", r"float32"]),
    ("world_size_mismatch", "[parallelism]\ndata_parallel_shard_degree = 1\ncontext_parallel_degree = 2\n", [], 4,
     [r"WORLD_SIZE = 4", r"2 ranks", r"nproc_per_node=2", r"data_parallel_shard_degree = -1"]),
    ("world_size_rest_not_divisible", "[parallelism]\ncontext_parallel_degree = 2\ntensor_parallel_degree = 2\n",
     [], 6, [r"WORLD_SIZE = 6", r"does not divide 6", r"multiple of 4"]),
    ("world_size_too_small", "[parallelism]\ndata_parallel_shard_degree = 2\ncontext_parallel_degree = 2\n",
     [], 2, [r"4 ranks, but WORLD_SIZE = 2"]),
    ("heads_not_divisible_by_tp", "[parallelism]\ntensor_parallel_degree = 3\n", [], 3,
     [r"model.num_heads = 4", r"tensor_parallel_degree = 3", r"\[1, 2, 4\]"]),
    ("seq_len_not_divisible_by_segments", "[training]\nseq_len = 8\n[parallelism]\ncontext_parallel_degree = 3\n",
     [], 3, [r"training.seq_len = 8", r"3 segments", r"multiple of 3"]),
    ("seq_len_zigzag", ("[training]\nseq_len = 514\n[parallelism]\ncontext_parallel_degree = 2\n"
                       "cp_layout = \"zigzag\"\n"), [], 2,
     [r"training.seq_len = 514", r"4 segments", r"zigzag"]),
    ("seq_len_torchtitan_rule", "[training]\nseq_len = 510\n[parallelism]\ncontext_parallel_degree = 2\n",
     [], 2, [r"training.seq_len = 510", r"divisible by 4"]),
    ("seq_len_sequence_parallel", ("[training]\nseq_len = 36\n[parallelism]\ncontext_parallel_degree = 2\n"
                                  "tensor_parallel_degree = 2\n"), [], 4,
     [r"training.seq_len = 36", r"divisible by 8", r"sequence parallelism"]),
    ("unknown_kernel", "[model]\nkernel = \"trition\"\n", [], 1,
     [r"model.kernel = 'trition'", r"Did you mean 'triton'"]),
    ("unknown_cp_exchange", "[parallelism]\ncp_exchange = \"allgater\"\n", [], 1,
     [r"parallelism.cp_exchange = 'allgater'", r"Did you mean 'allgather'"]),
    ("unknown_cp_layout", "[parallelism]\ncp_layout = \"zig-zag\"\n", [], 1,
     [r"parallelism.cp_layout = 'zig-zag'", r"Did you mean 'zigzag'"]),
    ("layout_vs_load_balancer", ("[parallelism]\ncp_layout = \"contiguous\"\n"
                                "context_parallel_load_balancer = \"headtail\"\n"), [], 1,
     [r"context_parallel_load_balancer = 'headtail'", r"cp_layout = 'contiguous'", r"set only cp_layout"]),
    ("cp_knob_twice", "[model]\ncp_layout = \"zigzag\"\n[parallelism]\ncp_layout = \"contiguous\"\n", [], 1,
     [r"contradicts model.cp_layout"]),
    ("unknown_flavor", "[model]\nflavor = \"debugg\"\n", [], 1,
     [r"model.flavor = 'debugg'", r"Did you mean 'debug'"]),
    ("unknown_dataset", "[dataloader]\ndataset = \"synthetc\"\n", [], 1,
     [r"dataloader.dataset = 'synthetc'", r"Did you mean 'synthetic'"]),
    ("synthetic_unknown_field", "[data]\ndataset = \"synthetic\"\nmean_doc_length = 3\n", [], 1,
     [r"unknown key 'mean_doc_length' in \[dataloader\]", r"Did you mean 'mean_doc_len'"]),
    ("unknown_optimizer", "[optimizer]\nname = \"adamw\"\n", [], 1,
     [r"optimizer.name = 'adamw'", r"Did you mean 'AdamW'"]),
    ("optimizer_betas", "[optimizer]\nbetas = [0.9]\n", [], 1,
     [r"optimizer.betas", r"expected tuple\[float, float\]"]),
    ("ac_mode", "[activation_checkpoint]\nmode = \"ful\"\n", [], 1,
     [r"activation_checkpoint.mode = 'ful'", r"Did you mean 'full'"]),
    ("torchtitan_post_init", "[checkpoint]\ninterval = 0\n", [], 1,
     [r"\[checkpoint\]", r"interval"]),
    ("spmd_backend", "[parallelism]\nspmd_backend = \"spmd_types\"\n", [], 1,
     [r"parallelism.spmd_backend = 'spmd_types' is not supported", r"partial_dtensor"]),
    ("top_level_key", "steps = 3\n", [], 1, [r"top-level key 'steps' must be a table"]),
]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config(case):
    _, toml_text, cli, world_size, patterns = case
    with pytest.raises(ConfigError) as info:
        build(toml_text, cli, world_size=world_size)
    msg = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, msg), f"{pattern!r} not in: {msg}"


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_malformed_toml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nsteps = 3\nseq_len = = 4\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}:3:")) as info:
        load_toml(bad)
    assert "malformed TOML" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="job.config_file.*does not exist"):
        config_from_args(["--job.config_file", str(tmp_path / "nope.toml")], world_size=1)


def test_cli_overrides_file(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text('[training]\nsteps = 20\nseq_len = 512\n[model]\nn_layers = 2\n[optimizer]\nlr = 1e-3\n')
    config = config_from_args(
        ["--job.config_file", str(f), "--training.steps", "3", "--model.n_layers=1",
         "--metrics.enable_tensorboard", "--optimizer.lr", "2e-2", "--job.dump_folder", "/tmp/out",
         "--parallelism.cp_layout", "zigzag", "--data.dataset", "synthetic", "--data.kind", "random"],
        world_size=1, check_runtime=False,
    )
    assert config.training.steps == 3 and config.training.seq_len == 512
    assert config.model_spec.model.n_layers == 1
    assert config.metrics.enable_tensorboard is True
    assert config.optimizer.param_groups[0].optimizer_kwargs["lr"] == 2e-2
    assert config.dump_folder == "/tmp/out"
    assert config.model_spec.model.cp_layout == "zigzag"
    assert config.parallelism.context_parallel_load_balancer == "headtail"
    assert type(config.dataloader).__qualname__ == "SyntheticDataLoader.Config"
    assert config.dataloader.kind == "random"


def test_cli_values_are_toml_literals():
    assert parse_cli_value("3") == 3
    assert parse_cli_value("1e-3") == 1e-3
    assert parse_cli_value("true") is True
    assert parse_cli_value("[1, 2]") == [1, 2]
    assert parse_cli_value("zigzag") == "zigzag"
    assert parse_cli_value('"3"') == "3"


def test_closest_key_suggestion_is_specific():
    with pytest.raises(ConfigError) as info:
        build("[lr_scheduler]\nwarmup_step = 3\n")
    assert "Did you mean 'warmup_steps'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build("[training]\nzzzz = 3\n")
    assert "Did you mean" not in str(info.value) and "Valid keys of [training]" in str(info.value)


def test_layout_maps_to_load_balancer():
    assert build('[parallelism]\ncp_layout = "contiguous"\n').parallelism.context_parallel_load_balancer is None
    assert build('[parallelism]\ncp_layout = "zigzag"\n').parallelism.context_parallel_load_balancer == "headtail"


def test_optional_none_and_activation_checkpoint():
    config = build('[activation_checkpoint]\nmode = "full"\n[debug]\nseed = 7\n')
    assert type(config.activation_checkpoint).__qualname__ == "FullAC.Config"
    assert config.debug.seed == 7
    assert build('[debug]\nseed = "none"\n').debug.seed is None
    assert build('[activation_checkpoint]\nmode = "none"\n').activation_checkpoint is None


def test_dp_shard_rest_resolves():
    from titan_cp.models.common.preflight import resolve_degrees

    config = build("[parallelism]\ncontext_parallel_degree = 2\ntensor_parallel_degree = 2\n", world_size=8)
    assert resolve_degrees(config, 8) == {"dp_replicate": 1, "dp_shard": 2, "cp": 2, "tp": 2, "pp": 1}


def test_triton_kernel_rejected_at_runtime_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match=r"model.kernel = 'triton' cannot run here"):
        build('[model]\nkernel = "triton"\n', check_runtime=True)


def _nproc_of(path: Path) -> int:
    """World size of the torchrun line a config documents (--nnodes x --nproc_per_node)."""
    text = path.read_text()
    m = re.search(r"nproc_per_node=(\d+)", text)
    assert m, f"{path} should document its torchrun --nproc_per_node"
    nodes = re.search(r"nnodes=(\d+)", text)
    return int(m.group(1)) * (int(nodes.group(1)) if nodes else 1)


def train_config_argv(path: Path, tmp_path: Path) -> list[str]:
    """``train.py``'s arguments for a shipped TOML, with stand-ins for the checkpoint files a GPU config names."""
    argv = ["--job.config_file", str(path)]
    model = tomli.loads(path.read_text()).get("model", {})
    if "hf_config" in model:  # the FLA checkpoint is the user's: a stand-in folder with its flavor's shape
        from titan_cp.components.data import TOKENIZER_PATH
        from titan_cp.models.gdn.hf_config import hf_config_from_model
        from titan_cp.models.gdn import model_config

        (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(model_config(model["flavor"]))))
        argv += ["--model.hf_config", str(tmp_path / "config.json"), "--job.hf_assets_path", str(TOKENIZER_PATH),
                 "--checkpoint.initial_load_path", str(tmp_path)]
    if model.get("name") == "qwen3_5" and re.search(r"_cp(8|16)", path.name):  # GPU: the HF checkpoint is the user's
        from titan_cp.components.data import TOKENIZER_PATH
        from titan_cp.models.qwen3_5.config_registry import model_spec

        (tmp_path / "config.json").write_text(json.dumps(model_spec(model["flavor"]).model.hf_config()))
        argv += ["--job.hf_assets_path", str(TOKENIZER_PATH), "--checkpoint.initial_load_path", str(tmp_path)]
    return argv


@pytest.mark.parametrize("path", sorted(TRAIN_CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_train_configs_parse(path, tmp_path):
    config = config_from_args(train_config_argv(path, tmp_path), world_size=_nproc_of(path), check_runtime=False)
    if path.name.startswith("qwen3_5"):  # TorchTitan's Qwen3.5 (docs/qwen3_5.md)
        assert config.model_spec.name == "qwen3_5"
        gpu = bool(re.search(r"_cp(8|16)", path.name))
        assert config.model_spec.model.kernel == ("triton" if gpu else "torch")
        assert config.checkpoint.initial_load_in_hf == config.checkpoint.last_save_in_hf == gpu
        return
    if path.name.startswith("mamba2"):  # transformers' Mamba-2 architecture (docs/families.md)
        assert config.model_spec.name == "mamba2" and set(config.model_spec.model.layer_types()) == {"M"}
        assert config.model_spec.model.hidden_dim == 0 and config.parallelism.context_parallel_degree == 2
        return
    if path.name.startswith("kda"):  # FLA's KDA architecture (docs/families.md)
        assert config.model_spec.name == "kda" and set(config.model_spec.model.layer_types()) == {"K"}
        assert config.model_spec.model.kernel == "torch" and config.parallelism.context_parallel_degree == 2
        return
    assert config.model_spec.name == "gdn"
    if "cp8" in path.name:
        assert config.parallelism.context_parallel_degree == 8
        assert config.training.seq_len == 65536
        assert config.model_spec.model.kernel == "triton"
        assert config.training.mixed_precision_param == "bfloat16"
    else:
        assert config.model_spec.model.kernel == "torch" and config.model_spec.flavor in ("debug", "debug_hybrid")


def test_expected_train_configs_exist():
    names = {p.stem for p in TRAIN_CONFIGS.glob("*.toml")}
    assert {"debug_cpu", "cp2", "tp2", "dp2_cp2", "cp2_tp2", "dp2_cp2_tp2", "gdn_340m_cp8", "gdn_1_3b_cp8"} <= names


def test_native_torchtitan_entry_point():
    """`-m torchtitan.train --module titan_cp --config gdn_debug` finds titan_cp.config_registry."""
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args(
        ["--module", "titan_cp", "--config", "gdn_debug", "--training.steps", "3",
         "--parallelism.context_parallel_degree", "2"]
    )
    assert config.training.steps == 3
    assert config.parallelism.context_parallel_degree == 2
    assert config.model_spec.name == "gdn" and config.model_spec.flavor == "debug"
    assert type(config.metrics).__qualname__ == "TitanCPMetricsProcessor.Config"
    assert config.parallelism.spmd_backend == "partial_dtensor"


def test_registry_functions_cover_flavors():
    from titan_cp.models.gdn import FLAVORS
    from titan_cp.models.gdn.config_registry import config_for_flavor

    for flavor in FLAVORS:
        config = config_for_flavor(flavor)
        assert config.model_spec.flavor == flavor


def test_train_py_reports_config_error_before_launch(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[parallelism]\ncontext_parallel_degree = 2\n")
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", PYTHONPATH=os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--job.config_file", str(bad)],
                          check=False, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "titan_cp config error" in proc.stderr and "WORLD_SIZE = 1" in proc.stderr


def test_compat_apply_is_idempotent_and_patches_cpu_gaps():
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from titan_cp.components import compat

    compat.apply()
    patched = (dist.barrier, dist.set_timeout, FSDPModule.set_gradient_divide_factor)
    compat.apply()
    assert (dist.barrier, dist.set_timeout, FSDPModule.set_gradient_divide_factor) == patched
    assert not hasattr(dist.barrier.__wrapped__, "_titan_cp_compat")  # wrapped once, not twice
    if compat.on_cpu():
        from torchtitan.components import metrics
        from torchtitan.distributed import parallel_dims
        from torchtitan.distributed import utils as dist_utils
        from torchtitan.tools import utils

        assert utils.device_type == dist_utils.device_type == parallel_dims.device_type == "cpu"
        assert utils.device_module is torch.cpu and metrics.device_module is torch.cpu
        stats = metrics.build_device_memory_monitor().get_peak_stats()
        assert 0 < stats.max_reserved_gib < 1024
        assert utils.get_peak_flops("cpu") == compat.CPU_PEAK_FLOPS_PER_THREAD * torch.get_num_threads()


# --- bad input that used to run, or die deep: each fails at start-up, naming the field and a fix that works ----

NUMBER_ROWS = [
    ("steps_zero", "[training]\nsteps = 0\n", r"training.steps = 0 must be >= 1"),
    ("steps_negative", "[training]\nsteps = -1\n", r"training.steps = -1 must be >= 1"),
    ("lr_negative", "[optimizer]\nlr = -1e-3\n", r"optimizer.lr = -0.001 must be a positive number"),
    ("local_batch_size_zero", "[training]\nlocal_batch_size = 0\n", r"training.local_batch_size = 0 must be >= 1"),
    ("model_shape", "[model]\nnum_v_heads = 5\n", r"model.num_v_heads = 5 must be a multiple of model.num_heads = 4"),
    ("layer_pattern", "[model]\nlayer_pattern = \"GX\"\n", r"model.layer_pattern = 'GX' may only contain"),
    ("logscan_zigzag", "[parallelism]\ncontext_parallel_degree = 2\ncp_exchange = \"logscan\"\ncp_layout = \"zigzag\"\n",
     r"parallelism.cp_exchange = 'logscan' needs parallelism.cp_layout = 'contiguous'"),
]


@pytest.mark.parametrize("case", NUMBER_ROWS, ids=[c[0] for c in NUMBER_ROWS])
def test_bad_numbers_and_names_fail_at_start_up(case):
    _, toml_text, pattern = case
    world = 2 if "context_parallel_degree = 2" in toml_text else 1
    with pytest.raises(ConfigError, match=pattern):
        build(toml_text, world_size=world)


def test_missing_dataset_and_tokenizer_paths_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"dataloader.dataset_path = '.*nope.jsonl' does not exist"):
        build(f'[dataloader]\ndataset_path = "{tmp_path / "nope.jsonl"}"\n')
    with pytest.raises(ConfigError, match=r"job.hf_assets_path = '.*no_tokenizer' does not exist.*tokenizer"):
        build(f'[job]\nhf_assets_path = "{tmp_path / "no_tokenizer"}"\n')
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"job.hf_assets_path = '.*empty' holds none of \['tokenizer.json'"):
        build(f'[job]\nhf_assets_path = "{tmp_path / "empty"}"\n')


def test_checkpoint_folder_is_checked_writable(tmp_path):
    (tmp_path / "checkpoint").write_text("a file where the checkpoint folder should be")
    with pytest.raises(ConfigError, match=r"checkpoint.folder = 'checkpoint'.*is a file, not a folder"):
        build(f'[job]\ndump_folder = "{tmp_path}"\n[checkpoint]\nenable = true\n')
    if os.geteuid() == 0:  # root writes into read-only folders; /proc refuses new files even to root
        read_only = Path("/proc/titan_cp_outputs")
    else:
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o555)
    with pytest.raises(ConfigError, match=r"checkpoint.folder = 'checkpoint'.*is not writable"):
        build(f'[job]\ndump_folder = "{read_only}"\n[checkpoint]\nenable = true\n')
    assert build(f'[job]\ndump_folder = "{tmp_path / "fresh"}"\n[checkpoint]\nenable = true\n').checkpoint.enable
    assert not (tmp_path / "fresh").exists()  # checking creates nothing


def _fixes(message: str) -> list[str]:
    """The TOML lines a message suggests ("set parallelism.x = v", "e.g. A or B" for seq_len)."""
    fixes = [f"[{s}]\n{k} = {v}\n" for s, k, v in re.findall(r"set (\w+)\.(\w+) = (-?\d+)", message)]
    m = re.search(r"training.seq_len = \d+ .*e\.g\. (\d+)(?: or (\d+))?", message)
    return fixes + ([f"[training]\nseq_len = {v}\n" for v in m.groups() if v] if m else [])


@pytest.mark.parametrize("seq_len,layout", [(513, "contiguous"), (513, "zigzag"), (514, "contiguous"), (6, "zigzag")])
def test_suggested_seq_len_passes_every_rule(seq_len, layout):
    base = f"[parallelism]\ncontext_parallel_degree = 2\ncp_layout = \"{layout}\"\n"
    with pytest.raises(ConfigError) as info:
        build(base + f"[training]\nseq_len = {seq_len}\n", world_size=2)
    fixes = _fixes(str(info.value))
    assert fixes, str(info.value)
    for fix in fixes:
        build(base + fix, world_size=2)  # every suggested value passes the segments AND TorchTitan's 2 x cp rule


@pytest.mark.parametrize("toml_text,world_size", [
    ("[parallelism]\ndata_parallel_shard_degree = 1\ncontext_parallel_degree = 4\n", 2),  # cp 4 on 2 ranks
    ("[parallelism]\ncontext_parallel_degree = 4\n", 2),
    ("[parallelism]\ncontext_parallel_degree = 2\ntensor_parallel_degree = 2\n", 2),
])
def test_world_size_suggestions_work(toml_text, world_size):
    with pytest.raises(ConfigError) as info:
        build(toml_text, world_size=world_size)
    message = str(info.value)
    nproc = int(re.search(r"--nproc_per_node=(\d+)", message).group(1))
    build(toml_text, world_size=nproc)  # launching that many ranks works
    fixes = _fixes(message)
    assert fixes, f"no config change suggested for {world_size} ranks: {message}"
    for fix in fixes:
        merged = tomli.loads(toml_text)
        for section, table in tomli.loads(fix).items():
            merged.setdefault(section, {}).update(table)
        build_config(merged, source="test.toml", world_size=world_size, check_runtime=False)


def test_native_entry_point_validates_in_update_from_config(monkeypatch):
    """`-m torchtitan.train --module titan_cp` runs the same checks where TorchTitan calls the model config."""
    from torchtitan.config import ConfigManager

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = ConfigManager().parse_args(["--module", "titan_cp", "--config", "gdn_debug",
                                         "--parallelism.context_parallel_degree", "2", "--training.seq_len", "510"])
    with pytest.raises(ConfigError, match=r"training.seq_len = 510 is not divisible by 4"):
        config.model_spec.model.update_from_config(config=config)


def _launch_train_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python train.py ARGS` as a user runs it (no torchrun variables in the environment)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], check=False, capture_output=True,
                          text=True, env=env, timeout=600, cwd=cwd)


def test_launcher_reports_one_clean_line(tmp_path):
    """`python train.py --nproc_per_node=2` with a bad config: exit 2, one line, no traceback, no stray warning."""
    proc = _launch_train_py(["--nproc_per_node=2", "--job.config_file", str(TRAIN_CONFIGS / "cp2.toml"),
                             "--parallelism.context_parallel_degree", "4"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert output.count("titan_cp config error") == 1, output[-2000:]
    assert "set parallelism.context_parallel_degree = 2" in output
    for noise in ("Traceback", "ChildFailedError", "initial_load_model_only"):
        assert noise not in output, output[-2000:]


def test_launcher_trains(tmp_path):
    """The README's form, `python train.py --nproc_per_node=N`, starts the ranks and trains (1 rank, 2 tiny steps)."""
    proc = _launch_train_py(["--nproc_per_node=1", "--job.config_file", str(TRAIN_CONFIGS / "debug_cpu.toml"),
                             "--training.steps", "2", "--training.seq_len", "64", "--model.n_layers", "1",
                             "--job.dump_folder", str(tmp_path / "out"), "--metrics.enable_tensorboard", "false"],
                            tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert re.search(r"step:\s*2\b", output), output[-4000:]
    assert "initial_load_model_only" not in output
