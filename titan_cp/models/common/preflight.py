"""The one home of titan_cp's start-up checks: a ``Trainer.Config`` in, a :class:`ConfigError` out.

:func:`validate` runs twice per job, both times before any weights exist:

- from the TOML front end (``train.py``, :mod:`titan_cp.train.toml_config`) before
  any process group exists, with ``WORLD_SIZE`` = the ranks about to start;
- from ``GDNModel.Config.update_from_config`` inside TorchTitan's trainer
  (TorchTitan's place for model checks), so the native entry point
  ``-m torchtitan.train --module titan_cp --config gdn_debug`` gets the same
  checks.

Every message names the field (``section.field``) and a fix that passes
every rule here (e.g. a suggested ``seq_len`` satisfies the CP segments and
TorchTitan's 2 x cp sharding at once). Modules deeper down (``CPSettings``,
``get_kernel``) raise with the same field names (``titan_cp.errors``); the CP
layout/exchange rule is :class:`titan_cp.cp.settings.CPSettings`', called from here.

Rules, in order: parallel degrees multiply to the world size; model names
(kernel, cp_exchange, cp_layout, cp_q_transition and their combination); the load balancer
matches the layout; heads divisible by TP (and TP x CP for ``alltoall``); ``cp_q_transition``
only where state-passing CP runs;
``seq_len`` divisible by the CP segments and TorchTitan's pieces; training
and optimizer numbers (steps, batch, lr, betas); paths (tokenizer, dataset,
a writable checkpoint folder); the model builds on the meta device (its
layers' own shape rules); a model family's own ``check_job(config)`` (e.g.
Qwen3.5's heads and HF ``config.json``); with ``check_runtime`` that the
kernel runs here.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from titan_cp.cp.layout import num_segments
from titan_cp.cp.settings import CPSettings, load_balancer_for_layout
from titan_cp.errors import ConfigError, unknown_choice_message
from titan_cp.ops.gated_delta_rule import KERNEL_NAMES

# parallelize_gdn uses DTensor TP and the "fsdp" mesh, which exist under this backend only.
SUPPORTED_SPMD_BACKENDS = ("partial_dtensor",)
OPTIMIZER_NAMES = ("AdamW", "Adam")  # TorchTitan's factories that take lr / betas / eps / weight_decay
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt")  # what TorchTitan's HF tokenizer loads


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- names -------------------------------------------------------------------------------------


def check_cp_choices(layout: str, exchange: str, q_transition: str = "recompute") -> None:
    """``parallelism.cp_layout`` / ``cp_exchange`` / ``cp_q_transition`` are known and work together
    (e.g. no logscan + zigzag)."""
    CPSettings(layout=layout, exchange=exchange, q_transition=q_transition)


def check_q_transition_used(model, cp: int, written=None) -> None:
    """``parallelism.cp_q_transition`` does something in this run (state-passing CP, degree > 1).

    Refused where it does nothing (CP degree 1, ``alltoall``): ``keep`` always (it is never the
    default), any value when ``written`` (the TOML front end's setting of the key, whose origin
    the message names).
    """
    value = getattr(model, "cp_q_transition", None)
    if value is None or (value == "recompute" and written is None):
        return
    settings = CPSettings(layout=getattr(model, "cp_layout", "contiguous"),
                          exchange=getattr(model, "cp_exchange", "allgather"), q_transition=value)
    problem = settings.unused_q_transition(cp)
    if problem:
        raise ConfigError((f"{written.origin}: " if written is not None else "") + problem)


def _check_names(config) -> None:
    model = config.model_spec.model
    kernel = getattr(model, "kernel", None)
    if kernel is not None and kernel not in KERNEL_NAMES:
        raise ConfigError(unknown_choice_message("model.kernel", kernel, KERNEL_NAMES))
    layout = getattr(model, "cp_layout", None)
    if layout is not None:
        check_cp_choices(layout, getattr(model, "cp_exchange", "allgather"),
                         getattr(model, "cp_q_transition", "recompute"))
        balancer = config.parallelism.context_parallel_load_balancer
        wanted = load_balancer_for_layout(layout)
        if balancer != wanted:
            raise ConfigError(
                f"parallelism.context_parallel_load_balancer = {balancer!r} does not match "
                f"parallelism.cp_layout = {layout!r} (which needs {wanted!r}); set only cp_layout."
            )
    backend = config.parallelism.spmd_backend
    if backend not in SUPPORTED_SPMD_BACKENDS:
        raise ConfigError(
            f"parallelism.spmd_backend = {backend!r} is not supported by titan_cp: "
            f"parallelize_gdn shards with DTensor on the meshes of the 'partial_dtensor' backend "
            f"(e.g. the 'fsdp' = dp_shard x cp mesh). Set parallelism.spmd_backend = \"partial_dtensor\"."
        )


# --- degrees, heads, sequence length -----------------------------------------------------------

_DEGREE_FIELDS = {
    "dp_replicate": "data_parallel_replicate_degree",
    "dp_shard": "data_parallel_shard_degree",
    "cp": "context_parallel_degree",
    "tp": "tensor_parallel_degree",
    "pp": "pipeline_parallel_degree",
}


def _layout_text(degrees: dict[str, int]) -> str:
    return " x ".join(f"{k} {v}" for k, v in degrees.items() if k != "pp" or v > 1)


def _fill(degrees: dict[str, int], world_size: int) -> dict[str, int] | None:
    """``degrees`` with dp_shard = -1 resolved, if they fill ``world_size`` exactly; else None."""
    others = math.prod(v for k, v in degrees.items() if k != "dp_shard")
    dp_shard = degrees["dp_shard"]
    if dp_shard == -1:
        if world_size % others:
            return None
        dp_shard = world_size // others
    return {**degrees, "dp_shard": dp_shard} if dp_shard * others == world_size else None


def _degree_fixes(config, degrees: dict[str, int], world_size: int) -> list[str]:
    """One-field changes that fill ``world_size`` and pass the head and seq_len rules too."""
    fixes = []
    for key, field in _DEGREE_FIELDS.items():
        if key != "dp_shard" and degrees[key] == 1:
            continue  # do not switch on a parallelism the config does not use
        options = [-1, *range(world_size, 0, -1)] if key == "dp_shard" else range(world_size, 0, -1)
        for value in options:
            trial = _fill({**degrees, key: value}, world_size)
            if value == degrees[key] or trial is None:
                continue
            try:
                _check_heads(config.model_spec.model, trial["tp"], trial["cp"])
                _check_seq_len(config, trial["cp"], trial["tp"])
            except ConfigError:
                continue
            fixes.append(f"set parallelism.{field} = {value}")
            break
    return fixes


def resolve_degrees(config, world_size: int) -> dict[str, int]:
    """Parallel degrees with ``data_parallel_shard_degree = -1`` resolved; ConfigError if impossible."""
    p = config.parallelism
    degrees = {k: getattr(p, f) for k, f in _DEGREE_FIELDS.items()}
    for key, v in degrees.items():
        if v < 1 and not (key == "dp_shard" and v == -1):
            hint = "use -1 (the remaining ranks) or >= 1" if key == "dp_shard" else "1 disables that parallelism"
            raise ConfigError(f"parallelism.{_DEGREE_FIELDS[key]} = {v} must be >= 1 ({hint}).")
    filled = _fill(degrees, world_size)
    if filled is not None:
        return filled
    others = math.prod(v for k, v in degrees.items() if k != "dp_shard")
    total = others if degrees["dp_shard"] == -1 else others * degrees["dp_shard"]
    fixes = [f"launch {total} ranks (--nproc_per_node={total})"] + _degree_fixes(config, degrees, world_size)
    if degrees["dp_shard"] == -1:
        problem = (f"cannot fill WORLD_SIZE = {world_size}: the product of the other degrees, {others}, "
                   f"does not divide {world_size}; launch a multiple of {others} ranks")
    else:
        problem = f"= {total} ranks, but WORLD_SIZE = {world_size}; the degrees must multiply to the number of ranks"
    raise ConfigError(f"parallelism: {_layout_text(degrees)} {problem}. Fix: {' or '.join(fixes)}.")


def _head_fields(model) -> dict[str, int]:
    """Head counts TP shards: GDN heads always, attention heads only if the model has attention layers."""
    out = {}
    if hasattr(model, "num_heads"):
        out["num_heads"] = model.num_heads
        out["num_v_heads"] = getattr(model, "num_v_heads", None) or model.num_heads
    layer_types = model.layer_types() if hasattr(model, "layer_types") else []
    if "A" in layer_types:
        out["attn_num_heads"] = model.attn_num_heads
        out["attn_num_kv_heads"] = model.attn_num_kv_heads
    return out


def _check_heads(model, tp: int, cp: int) -> None:
    exchange = getattr(model, "cp_exchange", None)
    for field, heads in _head_fields(model).items():
        if heads % tp:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ConfigError(
                f"model.{field} = {heads} is not divisible by parallelism.tensor_parallel_degree = {tp}: "
                f"TP shards heads. Use a TP degree in {divisors} or change model.{field}."
            )
        if exchange == "alltoall" and cp > 1 and not field.startswith("attn_") and heads % (tp * cp):
            raise ConfigError(
                f"model.{field} = {heads} is not divisible by TP x CP = {tp} x {cp}, which "
                "parallelism.cp_exchange = 'alltoall' needs (it moves whole heads between CP ranks); "
                "use cp_exchange = 'allgather' or 'logscan'."
            )


def _check_seq_len(config, cp: int, tp: int) -> None:
    """seq_len is a multiple of titan_cp's CP segments and of TorchTitan's CP (x SP) pieces."""
    if cp <= 1:
        return
    seq_len = config.training.seq_len
    layout = getattr(config.model_spec.model, "cp_layout", "contiguous")
    segments = num_segments(cp, layout)
    sp = tp if config.parallelism.enable_sequence_parallel and tp > 1 else 1
    pieces = 2 * cp * sp
    step = math.lcm(segments, pieces)
    if seq_len > 0 and seq_len % step == 0:
        return
    rules = [f"{segments} (titan_cp cuts it into the {segments} segments of CP degree {cp} with layout '{layout}')",
             f"{pieces} (TorchTitan shards it for CP in 2 x cp = {2 * cp} pieces"
             + (f", times tp = {tp} for sequence parallelism)" if sp > 1 else ")")]
    lower, upper = (seq_len // step) * step, (seq_len // step + 1) * step
    examples = f"{lower} or {upper}" if lower > 0 else f"{upper}"
    raise ConfigError(
        f"training.seq_len = {seq_len} is not divisible by {step}: it must be a multiple of "
        + " and of ".join(rules)
        + f". Use a multiple of {step}, e.g. {examples}, or change parallelism.context_parallel_degree."
    )


# --- numbers and paths -------------------------------------------------------------------------


def _check_training(config) -> None:
    t = config.training
    for field, value in (("steps", t.steps), ("local_batch_size", t.local_batch_size), ("seq_len", t.seq_len)):
        if value < 1:
            example = {"steps": 20, "local_batch_size": 1, "seq_len": 512}[field]
            raise ConfigError(f"training.{field} = {value} must be >= 1 (e.g. training.{field} = {example}).")
    groups = getattr(config.optimizer, "param_groups", [])
    for group in groups:
        if group.optimizer_name not in OPTIMIZER_NAMES:
            raise ConfigError(unknown_choice_message("optimizer.name", group.optimizer_name, OPTIMIZER_NAMES))
        kwargs = group.optimizer_kwargs
        lr = kwargs.get("lr")
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"optimizer.lr = {lr!r} must be a positive number (e.g. optimizer.lr = 3e-4).")
        betas = kwargs.get("betas")
        if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
            raise ConfigError(f"optimizer.betas = {list(betas)!r}: expected tuple[float, float], two numbers "
                              f"in [0, 1) (e.g. optimizer.betas = [0.9, 0.95]).")


def _writable_dir_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written, or None if it can."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"'{probe}' is a file, not a folder"
    try:  # a real write: os.access says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return f"'{probe}' is not writable ({e.strerror})"
    return None


def _check_paths(config) -> None:
    assets = Path(config.hf_assets_path)
    if not any((assets / name).is_file() for name in TOKENIZER_FILES):
        what = "does not exist" if not assets.exists() else f"holds none of {list(TOKENIZER_FILES)}"
        raise ConfigError(
            f"job.hf_assets_path = '{assets}' {what}: TorchTitan loads the tokenizer from there. Point it "
            f"at a tokenizer folder, e.g. the shipped {Path(__file__).resolve().parents[2] / 'assets' / 'tokenizer'}."
        )
    dataset_path = getattr(config.dataloader, "dataset_path", None)
    dataset = getattr(config.dataloader, "dataset", None)
    if dataset_path is None and dataset is not None:
        from torchtitan.hf_datasets.text_datasets import DATASETS

        local = DATASETS.get(str(dataset).lower())
        if local is not None and str(local.path).startswith(("/", ".")):
            dataset_path = local.path  # a registered local dataset (e.g. the shipped corpus)
    is_glob = dataset_path is not None and any(c in str(dataset_path) for c in "*?[")  # shards: data_checks
    if dataset_path is not None and not is_glob and not Path(dataset_path).exists():
        raise ConfigError(
            f"dataloader.dataset_path = '{dataset_path}' does not exist (dataset {dataset!r}). Point it at "
            f"the dataset's file or folder, or remove it to use the dataset's default location."
        )
    if config.checkpoint.enable:
        folder = Path(config.dump_folder) / config.checkpoint.folder
        problem = _writable_dir_problem(folder)
        if problem:
            raise ConfigError(
                f"checkpoint.folder = '{config.checkpoint.folder}' (under job.dump_folder = "
                f"'{config.dump_folder}'): {problem}, so the first save would fail after all the steps "
                f"before it. Set job.dump_folder or checkpoint.folder to a writable folder."
            )


def _check_model_builds(model) -> None:
    """The model config builds (on the meta device: no memory, no weights); its layers name the field."""
    import torch

    try:
        with torch.device("meta"):
            model.build()
    except ValueError as e:
        raise ConfigError(str(e)) from e


# --- all of it ---------------------------------------------------------------------------------


def validate(config, *, world_size: int | None = None, check_runtime: bool = True,
             written_q_transition=None) -> dict[str, int]:
    """Every start-up check (no process group needed); returns the resolved parallel degrees.

    ``written_q_transition``: the front end's setting of ``parallelism.cp_q_transition`` (TOML), if the
    user wrote it (:func:`check_q_transition_used` then refuses it where unused at any value, naming it)."""
    _check_training(config)
    _check_model_builds(config.model_spec.model)
    degrees = resolve_degrees(config, world_size_from_env() if world_size is None else world_size)
    _check_names(config)
    _check_heads(config.model_spec.model, degrees["tp"], degrees["cp"])
    check_q_transition_used(config.model_spec.model, degrees["cp"], written_q_transition)
    family_check = getattr(config.model_spec.model, "check_job", None)  # a model family's own rules
    if family_check is not None:
        family_check(config)
    _check_seq_len(config, degrees["cp"], degrees["tp"])
    _check_paths(config)
    if hasattr(config.model_spec.model, "layers"):  # a decoder (GDN LM, Qwen3.5): its pipeline split
        from titan_cp.models.common.pipeline import check_pipeline_parallel

        check_pipeline_parallel(config.model_spec.model, config.parallelism, config.training.local_batch_size)
    kernel = getattr(config.model_spec.model, "kernel", None)
    if check_runtime and kernel is not None:
        from titan_cp.ops.gated_delta_rule import get_kernel

        try:
            get_kernel(kernel)
        except Exception as e:  # e.g. triton without a GPU
            raise ConfigError(f"model.kernel = '{kernel}' cannot run here: {e}. "
                              f"Use model.kernel = 'torch' on CPU.") from e
    return degrees


__all__ = [
    "check_cp_choices",
    "check_q_transition_used",
    "resolve_degrees",
    "validate",
    "world_size_from_env",
]
