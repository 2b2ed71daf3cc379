"""Which shipped train_configs a runner with N ranks can smoke-test, and the torchrun commands.

A config fits when its parallel degrees multiply to at most N ranks
(``data_parallel_shard_degree = -1`` takes what cp x tp leave of N) and, on a
CPU runner, its kernel is not the GPU-only ``triton``. Every run is short and
comparable: ``--training.seq_len`` and ``--training.steps`` shortened, fp32
parameters, TorchTitan's synthetic packed documents (the global batch does not
depend on the data-parallel degree), every step logged, TensorBoard on,
checkpoints every ``checkpoint_step`` steps, LR warm-up 2 steps.

Configs that share a model and a global batch share one 1-rank reference
(the CP = 1 run every layout must reproduce) and one seed checkpoint, made on
one rank and loaded by every run of that model: a sharded initialisation is
not bit-identical to a 1-rank one on CPU. A config that loads its own weights
(``checkpoint.initial_load_path``, e.g. an FLA checkpoint) starts every run
from them instead; one whose files are not there is skipped, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tomli

from titan_cp.ops.mamba2 import KERNEL_NAMES as MAMBA2_KERNELS

REPO = Path(__file__).resolve().parents[3]  # the checkout: smoke runs the repository's train_configs/
TRAIN_CONFIGS = REPO / "train_configs"


def require_checkout() -> None:
    """Smoke proves a checkout's ``train_configs/`` through its ``train.py`` (their paths are the repository's)."""
    if not ((REPO / "train.py").is_file() and TRAIN_CONFIGS.is_dir()):
        raise SystemExit(
            f"titan_cp smoke: it runs the shipped train_configs/ and train.py of a titan_cp checkout, and this "
            f"titan_cp is an installed package ({REPO / 'titan_cp'}) without them. Run it from a clone: "
            f"git clone <titan_cp> && cd titan_cp && pip install -e . && python -m titan_cp.cli.smoke --nproc N")


@dataclass(frozen=True)
class Settings:
    nproc: int  # ranks this runner has
    device: str  # "cpu" (gloo, torch kernel) or "cuda" (NCCL, triton kernel)
    out: Path
    seq_len: int = 128
    steps: int = 6
    checkpoint_step: int = 3
    rel_tol: float = 1e-5  # CP = P vs CP = 1 and resumed vs uninterrupted, per step loss
    timeout_s: float = 900.0
    reuse: bool = False  # keep seed checkpoints and reference runs already in ``out``

    @property
    def kernel(self) -> str:
        return "triton" if self.device == "cuda" else "torch"


@dataclass
class ShippedConfig:
    name: str
    path: Path
    values: dict
    dp: int  # data_parallel_shard_degree (-1: fill the world)
    cp: int
    tp: int
    pp: int = 1
    skip: str = ""  # why this runner does not run it
    world: int = 0  # ranks it runs on here
    reference: "Reference | None" = None

    @property
    def layout(self) -> str:
        par = self.values.get("parallelism", {})
        if self.cp == 1:
            return f"dp{self.dp_degree} tp{self.tp}" + (f" pp{self.pp}" if self.pp > 1 else "")
        return (f"dp{self.dp_degree} cp{self.cp} tp{self.tp} " + (f"pp{self.pp} " if self.pp > 1 else "")
                + f"{par.get('cp_layout', 'contiguous')}/{par.get('cp_exchange', 'allgather')}")

    @property
    def model_parallel(self) -> int:
        """Ranks of one data-parallel replica: CP x TP x PP (EP borrows from these, adding none)."""
        return self.cp * self.tp * self.pp

    @property
    def dp_degree(self) -> int:
        return self.world // self.model_parallel

    @property
    def own_initial_weights(self) -> bool:
        """The config loads its weights (``checkpoint.initial_load_path``): every run starts from them."""
        return bool(self.values.get("checkpoint", {}).get("initial_load_path"))

    @property
    def global_batch(self) -> int:
        return self.values.get("training", {}).get("local_batch_size", 8) * self.dp_degree


@dataclass
class Reference:
    """The 1-rank run (and its seed checkpoint) that every layout of one model is compared with."""

    key: str
    config: ShippedConfig  # the config whose model it uses (run with all degrees 1)
    global_batch: int
    members: list[str] = field(default_factory=list)


def discover(config_dir: Path = TRAIN_CONFIGS) -> list[ShippedConfig]:
    """Every ``*.toml`` in ``config_dir`` with its parallel degrees."""
    found = []
    for path in sorted(config_dir.glob("*.toml")):
        with open(path, "rb") as f:
            values = tomli.load(f)
        par = values.get("parallelism", {})
        found.append(ShippedConfig(
            path.stem, path, values, int(par.get("data_parallel_shard_degree", -1)),
            int(par.get("context_parallel_degree", 1)), int(par.get("tensor_parallel_degree", 1)),
            int(par.get("pipeline_parallel_degree", 1)),
        ))
    return found


def plan(configs: list[ShippedConfig], s: Settings, only: list[str] | None = None) -> list[Reference]:
    """Decide what runs (``skip`` says why not) and group the runs by reference."""
    refs: dict[str, Reference] = {}
    for c in configs:
        model_parallel = c.model_parallel
        c.world = s.nproc if c.dp == -1 else c.dp * model_parallel
        kernel = c.values.get("model", {}).get("kernel", "torch")
        if only and c.name not in only:
            c.skip = "not selected (--configs)"
        elif s.device == "cpu" and kernel == "triton":
            c.skip = "GPU config (kernel 'triton'): run on a GPU runner"
        elif c.dp == -1 and s.nproc % model_parallel:
            c.skip = f"cp x tp x pp = {model_parallel} does not divide {s.nproc} ranks"
        elif c.world > s.nproc:
            c.skip = f"needs {c.world} ranks, this runner has {s.nproc}"
        elif missing := _missing_files(c):
            c.skip = f"needs {missing} (the config's header says how to make it)"
        elif s.seq_len % (2 * c.cp):
            c.skip = f"--seq-len {s.seq_len} does not divide into the {2 * c.cp} zigzag segments of CP {c.cp}"
        if c.skip:
            continue
        model = {k: v for k, v in c.values.get("model", {}).items() if k != "kernel"}
        init = c.values.get("checkpoint", {}).get("initial_load_path")
        key = hashlib.sha1(json.dumps([model, c.global_batch, init], sort_keys=True).encode()).hexdigest()[:8]
        ref = refs.setdefault(key, Reference(f"ref_{model.get('flavor', 'model')}_{key}", c, c.global_batch))
        ref.members.append(c.name)
        c.reference = ref
    return list(refs.values())


def _missing_files(c: ShippedConfig) -> str:
    """The first file or folder the config names (relative to the repository) that is not there."""
    named = (c.values.get("job", {}).get("hf_assets_path"), c.values.get("model", {}).get("hf_config"),
             c.values.get("checkpoint", {}).get("initial_load_path"))
    for path in filter(None, named):
        if not (REPO / path).exists():
            return path
    return ""


def _launch(s: Settings, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(REPO / "train.py")]


def kernel_for(s: Settings, config: ShippedConfig) -> str:
    """The runner's kernel (``triton`` on CUDA), unless the config has Mamba-2 layers and the Mamba-2
    ops have no such kernel: then the config's own (a Mamba-2 model on a GPU runner runs torch's SSD)."""
    model = config.values.get("model", {})
    has_mamba2 = model.get("name") == "mamba2" or "M" in model.get("layer_pattern", "")
    if has_mamba2 and s.kernel not in MAMBA2_KERNELS:
        return model.get("kernel", "torch")
    return s.kernel


def common_overrides(s: Settings, config: ShippedConfig, dump: Path) -> list[str]:
    return [
        "--job.config_file", str(config.path),
        "--job.dump_folder", str(dump),
        "--model.kernel", kernel_for(s, config),
        "--training.seq_len", str(s.seq_len),
        "--training.steps", str(s.steps),
        "--training.mixed_precision_param", "float32",
        "--lr_scheduler.warmup_steps", "2",
        "--data.dataset", "synthetic", "--data.kind", "pattern", "--data.mean_doc_len", "40",
        "--metrics.log_freq", "1", "--metrics.enable_tensorboard",
        "--checkpoint.enable", "--checkpoint.interval", str(s.checkpoint_step),
        "--checkpoint.last_save_model_only", "false", "--checkpoint.last_save_in_hf", "false",  # full state
        "--comm.trace_buf_size", "0", "--debug.enable_structured_logging", "false",
    ]


def _single_rank(batch: int) -> list[str]:
    return ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.context_parallel_degree", "1",
            "--parallelism.tensor_parallel_degree", "1", "--parallelism.expert_parallel_degree", "1",
            "--parallelism.pipeline_parallel_degree", "1", "--training.local_batch_size", str(batch)]


def seed_command(s: Settings, ref: Reference) -> list[str]:
    return [*_launch(s, 1), *common_overrides(s, ref.config, s.out / ref.key / "seed"),
            *_single_rank(ref.global_batch), "--checkpoint.create_seed_checkpoint"]


def seed_path(s: Settings, ref: Reference) -> Path:
    return s.out / ref.key / "seed" / "checkpoint" / "step-0"


def reference_command(s: Settings, ref: Reference) -> list[str]:
    return [*_launch(s, 1), *common_overrides(s, ref.config, s.out / ref.key / "run"),
            *_single_rank(ref.global_batch), *_from_seed(s, ref)]


def _from_seed(s: Settings, ref: Reference) -> list[str]:
    if ref.config.own_initial_weights:
        return []
    return ["--checkpoint.initial_load_path", str(seed_path(s, ref)), "--checkpoint.initial_load_model_only", "true"]


def run_command(s: Settings, c: ShippedConfig) -> list[str]:
    dp = ["--parallelism.data_parallel_shard_degree", str(c.dp_degree)] if c.dp == -1 else []
    return [*_launch(s, c.world), *common_overrides(s, c, s.out / c.name / "run"), *dp, *_from_seed(s, c.reference)]


def resume_command(s: Settings, c: ShippedConfig) -> list[str]:
    """The same run continued from its step-``checkpoint_step`` checkpoint (full state)."""
    ckpt = s.out / c.name / "run" / "checkpoint" / f"step-{s.checkpoint_step}"
    dp = ["--parallelism.data_parallel_shard_degree", str(c.dp_degree)] if c.dp == -1 else []
    return [*_launch(s, c.world), *common_overrides(s, c, s.out / c.name / "resume"), *dp,
            "--checkpoint.initial_load_path", str(ckpt), "--checkpoint.initial_load_model_only", "false",
            "--checkpoint.initial_load_in_hf", "false"]
