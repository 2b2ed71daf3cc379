"""TOML front end: ``--job.config_file X.toml [--section.field value ...]`` -> ``Trainer.Config``.

TorchTitan 0.3.0 dropped TOML (configs are Python functions plus tyro CLI
overrides); titan_cp keeps the TOML workflow on top of them:

1. ``[model] flavor`` picks the registry config function
   (:data:`titan_cp.config_registry.CONFIG_FOR_FLAVOR`, default ``"debug"``);
2. every other table sets fields of that ``Trainer.Config`` (names mirror
   TorchTitan's config: ``[training] seq_len`` is ``config.training.seq_len``);
3. ``--section.field value`` on the command line overrides the file (values are
   TOML literals: ``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``; bare words are
   strings; a flag with no value is ``true``);
4. everything is validated before any process group exists; every problem
   raises :class:`ConfigError` naming the field and the fix.

Sections (``titan_cp/toml_config.py:SECTIONS``)::

    [job]        config_file, dump_folder, hf_assets_path, description
    [model]      flavor, name, kernel, doc_masking and any GDNModel.Config field
                 (n_layers, dim, num_heads, head_dim, vocab_size, ...) as overrides
    [training]   TorchTitan TrainingConfig (local_batch_size, seq_len, steps, ...)
    [parallelism] TorchTitan ParallelismConfig (data_parallel_shard_degree,
                 context_parallel_degree, tensor_parallel_degree, ...) plus
                 titan_cp's cp_exchange ("allgather" | "logscan" | "alltoall")
                 and cp_layout ("contiguous" | "zigzag"); both are stored on
                 the model config, and cp_layout also sets TorchTitan's
                 context_parallel_load_balancer (None | "headtail")
    [optimizer]  name ("AdamW" | "Adam"), lr, betas, eps, weight_decay, implementation
    [lr_scheduler] warmup_steps, decay_ratio, decay_type, min_lr_factor, ...
    [checkpoint] TorchTitan checkpoint fields (enable, interval, folder, load_step, ...)
    [metrics]    log_freq, enable_tensorboard, ..., log_per_rank, jsonl_file
    [activation_checkpoint] mode ("none" | "selective" | "full" | "memory_budget") + its fields
    [dataloader] (alias [data]) dataset ("tiny_corpus" | "synthetic" | a TorchTitan
                 dataset) + that loader's fields (synthetic: kind, vocab_size,
                 mean_doc_len, seed)
    [compile] [comm] [debug] [profiler] [validator]   TorchTitan's, field by field

``None`` for an optional field is written ``"none"``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

try:  # Python 3.11+ ships tomllib; tomli is the same parser (and a declared dependency)
    import tomli
except ImportError:  # pragma: no cover
    import tomllib as tomli  # type: ignore[no-redef]


from titan_cp.errors import ConfigError


JOB_KEYS = ("config_file", "dump_folder", "hf_assets_path", "description")
SECTION_ALIASES = {"data": "dataloader"}
# Trainer.Config sections that map field-by-field onto TorchTitan's dataclasses.
GENERIC_SECTIONS = ("training", "lr_scheduler", "checkpoint", "metrics", "compile", "comm", "debug",
                    "profiler", "validator")
SPECIAL_SECTIONS = ("job", "model", "parallelism", "optimizer", "activation_checkpoint", "dataloader")
SECTIONS = SPECIAL_SECTIONS + GENERIC_SECTIONS
MODEL_SPECIAL_KEYS = ("flavor", "name")
MODEL_HIDDEN_FIELDS = ("param_init", "sharding_config")
PARALLELISM_EXTRA_KEYS = ("cp_exchange", "cp_layout")
OPTIMIZER_KEYS = ("name", "lr", "betas", "eps", "weight_decay", "implementation")
OPTIMIZER_NAMES = ("AdamW", "Adam")
AC_MODES = ("none", "selective", "full", "memory_budget")
# parallelize_gdn uses DTensor TP and the "fsdp" mesh, which exist under this backend only.
SUPPORTED_SPMD_BACKENDS = ("partial_dtensor",)


# --- small helpers ----------------------------------------------------------------------------


def _suggest(word: str, choices: Sequence[str]) -> str:
    choices = [str(c) for c in choices]
    same_case = [c for c in choices if c.lower() == str(word).lower()]
    close = same_case or difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _choice_message(field: str, value: Any, choices: Sequence[Any]) -> str:
    """Like titan_cp.kernels.unknown_choice_message, with case-insensitive matches first."""
    return f"{field} = {value!r} is not one of {sorted(map(str, choices))}.{_suggest(str(value), choices)}"


def _unknown_key(where: str, key: str, choices: Sequence[str], origin: str) -> ConfigError:
    return ConfigError(
        f"{origin}: unknown key '{key}' in [{where}].{_suggest(key, choices)} "
        f"Valid keys of [{where}]: {', '.join(sorted(choices))}."
    )


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("none" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


class _TypeMismatch(Exception):
    pass


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` (from TOML) as type ``tp``, or raise _TypeMismatch."""
    if tp is Any or tp is typing.Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _coerce(value, args[0])
    if origin is typing.ClassVar:
        raise _TypeMismatch
    if origin in (Union, types.UnionType):
        if type(None) in args and isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except _TypeMismatch:
                continue
        raise _TypeMismatch
    if origin is Literal:
        if value in args:
            return value
        raise _TypeMismatch
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        raise _TypeMismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _TypeMismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _TypeMismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _TypeMismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _TypeMismatch
    if origin in (list, Sequence) or tp is list:
        if isinstance(value, str) and args and args[0] is str:
            value = [v for v in value.split(",") if v]  # TorchTitan's "A,B,C" CLI form
        if not isinstance(value, list):
            raise _TypeMismatch
        return [_coerce(v, args[0]) for v in value] if args else list(value)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise _TypeMismatch
        if args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _TypeMismatch
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return tuple(_coerce(v, args[0]) for v in value) if args else tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _TypeMismatch
        return dict(value)
    if isinstance(tp, type) and not _is_dataclass_type(tp) and isinstance(value, tp):
        return value
    raise _TypeMismatch


def _literal_choices(tp: Any) -> tuple | None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _literal_choices(args[0])
    if origin is Literal:
        return args
    if origin in (Union, types.UnionType):
        for a in args:
            c = _literal_choices(a)
            if c:
                return c + (("none",) if type(None) in args else ())
    return None


def _check_value(section: str, key: str, value: Any, tp: Any, origin: str) -> Any:
    try:
        return _coerce(value, tp)
    except _TypeMismatch:
        pass
    choices = _literal_choices(tp)
    if choices and isinstance(value, str):
        raise ConfigError(f"{origin}: {_choice_message(f'{section}.{key}', value, choices)}")
    hint = ""
    if isinstance(value, str) and tp in (int, float, bool):
        hint = f" Write it without quotes, e.g. {key} = {value.strip() or '...'}."
    raise ConfigError(
        f"{origin}: {section}.{key} = {value!r} has type {type(value).__name__}, "
        f"expected {_type_name(tp)}.{hint}"
    )


def _settable_fields(cls: type, hidden: Sequence[str] = ()) -> dict[str, Any]:
    """Init fields of a config dataclass that TOML may set, name -> resolved type."""
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except (NameError, TypeError):  # unresolved forward references: fall back to raw annotations
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or f.name in hidden:
            continue
        tp = hints.get(f.name, f.type)
        if typing.get_origin(tp) is typing.Annotated and any(
            "Suppress" in repr(m) for m in typing.get_args(tp)[1:]
        ):
            continue
        out[f.name] = tp
    return out


def _replace(obj: Any, section: str, changes: dict[str, Any], origin_of) -> Any:
    """``dataclasses.replace`` (re-running __post_init__); errors become ConfigError."""
    if not changes:
        return obj
    try:
        return dataclasses.replace(obj, **changes)
    except (ValueError, TypeError, AssertionError) as e:
        keys = ", ".join(f"{section}.{k}" for k in changes)
        raise ConfigError(f"{origin_of(next(iter(changes)))}: invalid [{section}] ({keys}): {e}") from e


def _apply_dataclass_section(obj: Any, section: str, values: dict[str, Any], origin_of,
                             extra_keys: Sequence[str] = ()) -> Any:
    fields = _settable_fields(type(obj))
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key in extra_keys:
            continue
        if key not in fields:
            raise _unknown_key(section, key, list(fields) + list(extra_keys), origin_of(key))
        tp = fields[key]
        current = getattr(obj, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            # a nested table, e.g. [validator.dataloader]
            changes[key] = _apply_dataclass_section(current, f"{section}.{key}", value,
                                                    lambda k, _o=origin_of, _k=key: _o(f"{_k}.{k}"))
            continue
        changes[key] = _check_value(section, key, value, tp, origin_of(key))
    return _replace(obj, section, changes, origin_of)


# --- reading TOML and the command line --------------------------------------------------------


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file; malformed TOML raises ConfigError with file:line:column."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"job.config_file: '{path}' does not exist; pass an existing TOML file "
                          f"(e.g. train_configs/debug_cpu.toml).") from e
    try:
        return tomli.loads(text)
    except tomli.TOMLDecodeError as e:
        line = getattr(e, "lineno", None)
        col = getattr(e, "colno", None)
        msg = getattr(e, "msg", str(e))
        loc = f"{path}:{line}:{col}" if line is not None else str(path)
        raise ConfigError(f"{loc}: malformed TOML: {msg}. Fix the syntax at that line.") from e


def parse_cli_value(raw: str) -> Any:
    """A command-line value as a TOML literal (3, 1e-3, true, "x", [1, 2]); else the raw string."""
    try:
        return tomli.loads(f"v = {raw}")["v"]
    except tomli.TOMLDecodeError:
        return raw


def split_args(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str, Any]]]:
    """``argv`` -> (config_file, [(section, key, value), ...]) in command-line order."""
    config_file = None
    overrides: list[tuple[str, str, Any]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument '{arg}'; overrides look like "
                              f"--section.field value (e.g. --training.steps 10).")
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw = argv[i + 1]
                i += 1
            else:
                raw = "true"  # a bare flag, e.g. --metrics.enable_tensorboard
        i += 1
        if name in ("job.config_file", "config_file"):
            config_file = raw
            continue
        section, dot, key = name.partition(".")
        if not dot or not key:
            raise ConfigError(f"command line: '--{name}' is not of the form --section.field "
                              f"(sections: {', '.join(SECTIONS)}).")
        overrides.append((section, key, parse_cli_value(raw)))
    return config_file, overrides


# --- building Trainer.Config ------------------------------------------------------------------


def _merge(file_values: dict[str, Any], overrides: list[tuple[str, str, Any]], source: str):
    """Merge file and CLI values; returns (values, origin_of(section, key) -> str)."""
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}
    for section, table in file_values.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: top-level key '{section}' must be a table like "
                              f"[{section}]; put it under one of: {', '.join(SECTIONS)}.")
        canonical = SECTION_ALIASES.get(section, section)
        for key, value in table.items():
            merged.setdefault(canonical, {})[key] = value
            origins[(canonical, key)] = f"{source} [{section}] {key}"
    for section, key, value in overrides:
        canonical = SECTION_ALIASES.get(section, section)
        head, _, rest = key.partition(".")
        if rest:  # --validator.dataloader.dataset x -> nested table
            merged.setdefault(canonical, {}).setdefault(head, {})[rest] = value
        else:
            merged.setdefault(canonical, {})[key] = value
        origins[(canonical, head)] = f"command line --{section}.{key}"
    for section, table in merged.items():
        if section not in SECTIONS:
            first = next(iter(table), "")
            where = origins.get((section, first), source)
            raise ConfigError(f"{where}: unknown section [{section}].{_suggest(section, SECTIONS)} "
                              f"Valid sections: {', '.join(SECTIONS)}.")

    def origin_for(section: str):
        return lambda key: origins.get((section, key.split(".")[0]), f"[{section}] {key}")

    return merged, origin_for


def _apply_model(config, values: dict[str, Any], parallel_values: dict[str, Any], origin_of, p_origin_of):
    from titan_cp.model.model import GDNModel

    fields = _settable_fields(GDNModel.Config, hidden=MODEL_HIDDEN_FIELDS)
    valid = list(fields) + list(MODEL_SPECIAL_KEYS)
    overrides: dict[str, Any] = {}
    for key, value in values.items():
        if key in MODEL_SPECIAL_KEYS:
            continue
        if key not in fields:
            raise _unknown_key("model", key, valid, origin_of(key))
        overrides[key] = _check_value("model", key, value, fields[key], origin_of(key))
    for key in PARALLELISM_EXTRA_KEYS:  # [parallelism] cp_exchange / cp_layout live on the model config
        if key in parallel_values:
            value = _check_value("parallelism", key, parallel_values[key], str, p_origin_of(key))
            if key in overrides and overrides[key] != value:
                raise ConfigError(f"{p_origin_of(key)}: parallelism.{key} = {value!r} contradicts "
                                  f"model.{key} = {overrides[key]!r}; set it in one place ([parallelism]).")
            overrides[key] = value
    if overrides:
        spec = config.model_spec
        try:  # keep what the flavor's config function chose (e.g. kernel = "triton"), change the rest
            model = dataclasses.replace(spec.model, **overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"[model]: {e}") from e
        config.model_spec = dataclasses.replace(spec, model=model)
        if hasattr(config.loss, "global_vocab_size"):
            config.loss.global_vocab_size = model.vocab_size


def _apply_optimizer(config, values: dict[str, Any], origin_of):
    from torchtitan.components.optimizer import OptimizersContainer

    for key in values:
        if key not in OPTIMIZER_KEYS:
            raise _unknown_key("optimizer", key, OPTIMIZER_KEYS, origin_of(key))
    if not values:
        return
    groups = config.optimizer.param_groups
    if len(groups) != 1 or groups[0].pattern != r".*":
        raise ConfigError(f"{origin_of(next(iter(values)))}: [optimizer] can only edit a single catch-all "
                          f"param group; this flavor has {len(groups)} groups (edit the config function).")
    group = groups[0]
    kwargs = dict(group.optimizer_kwargs)
    name = group.optimizer_name
    types_ = {"lr": float, "eps": float, "weight_decay": float, "betas": tuple[float, float]}
    for key, value in values.items():
        if key == "name":
            name = _check_value("optimizer", key, value, str, origin_of(key))
            if name not in OPTIMIZER_NAMES:
                raise ConfigError(f"{origin_of(key)}: {_choice_message('optimizer.name', name, OPTIMIZER_NAMES)}")
        elif key in types_:
            kwargs[key] = _check_value("optimizer", key, value, types_[key], origin_of(key))
    impl_tp = _settable_fields(OptimizersContainer.Config)["implementation"]
    changes = {}
    if "implementation" in values:
        changes["implementation"] = _check_value("optimizer", "implementation", values["implementation"],
                                                 impl_tp, origin_of("implementation"))
    new_group = dataclasses.replace(group, optimizer_name=name, optimizer_kwargs=kwargs)
    changes["param_groups"] = [new_group]
    config.optimizer = _replace(config.optimizer, "optimizer", changes, origin_of)


def _ac_class(mode: str):
    from torchtitan.distributed.activation_checkpoint import (
        FullAC,
        MemoryBudgetAC,
        SelectiveAC,
    )

    return {"selective": SelectiveAC.Config, "full": FullAC.Config, "memory_budget": MemoryBudgetAC.Config}[mode]


def _apply_activation_checkpoint(config, values: dict[str, Any], origin_of):
    if not values:
        return
    current = config.activation_checkpoint
    if "mode" in values:
        mode = _check_value("activation_checkpoint", "mode", values["mode"], Literal[AC_MODES], origin_of("mode"))
    else:
        mode = "none" if current is None else next(
            (m for m in AC_MODES[1:] if type(current) is _ac_class(m)), "selective")
    rest = {k: v for k, v in values.items() if k != "mode"}
    if mode == "none":
        if rest:
            key = next(iter(rest))
            raise ConfigError(f"{origin_of(key)}: activation_checkpoint.{key} has no effect with mode = 'none'; "
                              f"remove it or set mode to one of {list(AC_MODES[1:])}.")
        config.activation_checkpoint = None
        return
    cls = _ac_class(mode)
    obj = current if type(current) is cls else cls()
    allowed = list(_settable_fields(cls)) + ["mode"]
    for key in rest:
        if key not in allowed:
            raise _unknown_key("activation_checkpoint", key, allowed, origin_of(key))
    config.activation_checkpoint = _apply_dataclass_section(obj, "activation_checkpoint", rest, origin_of)


def dataloader_config_for(dataset: str):
    """A fresh dataloader config for ``dataset`` (synthetic, the shipped corpus or a TorchTitan dataset)."""
    from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataLoader

    from titan_cp.data import SyntheticDataLoader, register_datasets

    register_datasets()
    if dataset == "synthetic":
        return SyntheticDataLoader.Config()
    if dataset.lower() in DATASETS:
        return HuggingFaceTextDataLoader.Config(dataset=dataset)
    raise ValueError(f"dataloader.dataset = {dataset!r} is not one of "
                     f"{['synthetic', *sorted(DATASETS)]}.{_suggest(dataset, ['synthetic', *DATASETS])}")


def _apply_dataloader(config, values: dict[str, Any], origin_of):
    if not values:
        return
    obj = config.dataloader
    if "dataset" in values:
        dataset = _check_value("dataloader", "dataset", values["dataset"], str, origin_of("dataset"))
        if dataset != getattr(obj, "dataset", None):
            try:
                obj = dataloader_config_for(dataset)
            except ValueError as e:
                raise ConfigError(f"{origin_of('dataset')}: {e}") from e
    rest = {k: v for k, v in values.items() if k != "dataset"}
    config.dataloader = _apply_dataclass_section(obj, "dataloader", rest, origin_of)


def _apply_job(config, values: dict[str, Any], origin_of):
    for key, value in values.items():
        if key not in JOB_KEYS:
            raise _unknown_key("job", key, JOB_KEYS, origin_of(key))
        value = _check_value("job", key, value, str, origin_of(key))
        if key in ("dump_folder", "hf_assets_path"):
            setattr(config, key, value)


def build_config(
    file_values: dict[str, Any] | None = None,
    overrides: Sequence[tuple[str, str, Any]] = (),
    *,
    source: str = "<config>",
    world_size: int | None = None,
    check_runtime: bool = True,
):
    """Trainer.Config from parsed TOML values and CLI overrides; validated (see :func:`validate`)."""
    from titan_cp.config_registry import family_config, load_balancer_for_layout

    merged, origin_for = _merge(file_values or {}, list(overrides), source)
    model_values = merged.get("model", {})
    name = _check_value("model", "name", model_values.get("name", "gdn"), str, origin_for("model")("name"))
    flavor = model_values.get("flavor")
    if flavor is not None:
        flavor = _check_value("model", "flavor", flavor, str, origin_for("model")("flavor"))
    try:
        config = family_config(name, flavor)
    except ConfigError as e:
        raise ConfigError(f"{origin_for('model')('flavor' if 'flavor' in str(e).split('=')[0] else 'name')}: {e}") from e

    _apply_job(config, merged.get("job", {}), origin_for("job"))
    parallel_values = merged.get("parallelism", {})
    _apply_model(config, model_values, parallel_values, origin_for("model"), origin_for("parallelism"))
    config.parallelism = _apply_dataclass_section(
        config.parallelism, "parallelism", parallel_values, origin_for("parallelism"),
        extra_keys=PARALLELISM_EXTRA_KEYS,
    )
    layout = getattr(config.model_spec.model, "cp_layout", "contiguous")
    try:
        wanted_lb = load_balancer_for_layout(layout)
    except ValueError as e:
        raise ConfigError(f"{origin_for('parallelism')('cp_layout')}: {e}") from e
    if (
        "context_parallel_load_balancer" in parallel_values
        and config.parallelism.context_parallel_load_balancer != wanted_lb
    ):
        raise ConfigError(
            f"{origin_for('parallelism')('context_parallel_load_balancer')}: "
            f"parallelism.context_parallel_load_balancer = "
            f"{config.parallelism.context_parallel_load_balancer!r} does not match "
            f"parallelism.cp_layout = {layout!r} (which needs {wanted_lb!r}); set only cp_layout."
        )
    config.parallelism.context_parallel_load_balancer = wanted_lb
    _apply_optimizer(config, merged.get("optimizer", {}), origin_for("optimizer"))
    _apply_activation_checkpoint(config, merged.get("activation_checkpoint", {}), origin_for("activation_checkpoint"))
    _apply_dataloader(config, merged.get("dataloader", {}), origin_for("dataloader"))
    for section in GENERIC_SECTIONS:
        if section in merged:
            obj = getattr(config, section)
            setattr(config, section, _apply_dataclass_section(obj, section, merged[section], origin_for(section)))
    try:  # re-run Trainer.Config.__post_init__ (TorchTitan's own cross-field checks)
        config = dataclasses.replace(config)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"{source}: {e}") from e
    validate(config, world_size=world_size, check_runtime=check_runtime)
    return config


# --- validation -------------------------------------------------------------------------------


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_degrees(parallelism, world_size: int) -> dict[str, int]:
    """Parallel degrees with ``data_parallel_shard_degree = -1`` resolved; ConfigError if impossible."""
    p = parallelism
    named = {
        "parallelism.data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "parallelism.context_parallel_degree": p.context_parallel_degree,
        "parallelism.tensor_parallel_degree": p.tensor_parallel_degree,
        "parallelism.pipeline_parallel_degree": p.pipeline_parallel_degree,
    }
    for field, v in named.items():
        if v < 1:
            raise ConfigError(f"{field} = {v} must be >= 1 (1 disables that parallelism).")
    others = 1
    for v in named.values():
        others *= v
    dp_shard = p.data_parallel_shard_degree
    layout = (f"dp_replicate {p.data_parallel_replicate_degree} x dp_shard {dp_shard} x "
              f"cp {p.context_parallel_degree} x tp {p.tensor_parallel_degree}"
              + (f" x pp {p.pipeline_parallel_degree}" if p.pipeline_parallel_degree > 1 else ""))
    if dp_shard == -1:
        if world_size % others:
            raise ConfigError(
                f"parallelism: {layout} cannot fill WORLD_SIZE = {world_size}: "
                f"dp_replicate x cp x tp{' x pp' if p.pipeline_parallel_degree > 1 else ''} = {others} "
                f"does not divide {world_size}. Launch a multiple of {others} ranks "
                f"(torchrun --nproc_per_node) or lower those degrees."
            )
        dp_shard = world_size // others
    elif dp_shard < 1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree = {dp_shard}; use -1 (the remaining ranks) or >= 1.")
    if dp_shard * others != world_size:
        raise ConfigError(
            f"parallelism: {layout} = {dp_shard * others} ranks, but WORLD_SIZE = {world_size}. "
            f"The degrees must multiply to the number of ranks: launch "
            f"torchrun --nproc_per_node={dp_shard * others}, or set "
            f"parallelism.data_parallel_shard_degree = -1 to use the remaining ranks."
        )
    return {
        "dp_replicate": p.data_parallel_replicate_degree,
        "dp_shard": dp_shard,
        "cp": p.context_parallel_degree,
        "tp": p.tensor_parallel_degree,
        "pp": p.pipeline_parallel_degree,
    }


def _head_fields(model) -> dict[str, int]:
    """Head counts TP must divide: GDN heads always, attention heads only if the model has attention layers."""
    has_attention = "A" in (getattr(model, "layer_pattern", "") or "")
    out = {}
    for f in dataclasses.fields(model):
        v = getattr(model, f.name)
        if "heads" not in f.name or not isinstance(v, int) or isinstance(v, bool):
            continue
        if f.name.startswith("attn_") and not has_attention:
            continue
        out[f.name] = v
    return out


def validate(config, *, world_size: int | None = None, check_runtime: bool = True) -> dict[str, int]:
    """Start-up checks (no process group needed); returns the resolved degrees.

    World size (``WORLD_SIZE`` unless given), TP-divisible heads, CP-divisible
    ``seq_len`` (titan_cp segments and TorchTitan's own 2 x CP [x TP with SP]
    rule), known kernel / exchange / layout and, with ``check_runtime``, that
    the kernel can run here (e.g. ``triton`` needs a GPU).
    """
    from titan_cp.cp.layout import LAYOUTS, check_divisible
    from titan_cp.kernels import KERNEL_NAMES, get_kernel, unknown_choice_message

    ws = world_size_from_env() if world_size is None else world_size
    degrees = resolve_degrees(config.parallelism, ws)
    model = config.model_spec.model
    kernel = getattr(model, "kernel", None)
    if kernel is not None and kernel not in KERNEL_NAMES:
        raise ConfigError(unknown_choice_message("model.kernel", kernel, KERNEL_NAMES))
    exchange = getattr(model, "cp_exchange", None)
    if exchange is not None:
        from titan_cp.cp.context import EXCHANGES

        if exchange not in EXCHANGES:
            raise ConfigError(unknown_choice_message("parallelism.cp_exchange", exchange, EXCHANGES))
    layout = getattr(model, "cp_layout", "contiguous")
    if layout not in LAYOUTS:
        raise ConfigError(unknown_choice_message("parallelism.cp_layout", layout, LAYOUTS))

    if config.parallelism.spmd_backend not in SUPPORTED_SPMD_BACKENDS:
        raise ConfigError(
            f"parallelism.spmd_backend = {config.parallelism.spmd_backend!r} is not supported by titan_cp: "
            f"parallelize_gdn shards with DTensor on the meshes of the 'partial_dtensor' backend "
            f"(e.g. the 'fsdp' = dp_shard x cp mesh). Set parallelism.spmd_backend = \"partial_dtensor\"."
        )
    tp, cp = degrees["tp"], degrees["cp"]
    for field, heads in _head_fields(model).items():
        if heads % tp:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ConfigError(
                f"model.{field} = {heads} is not divisible by parallelism.tensor_parallel_degree = {tp}: "
                f"TP shards heads. Use a TP degree in {divisors} or change model.{field}."
            )
    seq_len = config.training.seq_len
    if cp > 1:
        try:
            check_divisible(seq_len, cp, layout)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        sp = tp if config.parallelism.enable_sequence_parallel else 1
        divisor = 2 * cp * sp
        if seq_len % divisor:
            raise ConfigError(
                f"training.seq_len = {seq_len} must be divisible by {divisor} "
                f"(TorchTitan shards sequences for CP in 2 x cp = {2 * cp} pieces"
                + (f", times tp = {tp} for sequence parallelism" if sp > 1 else "")
                + f"). Use a multiple of {divisor}, e.g. {(seq_len // divisor + 1) * divisor}."
            )
    try:  # the model's own layout rules (e.g. alltoall needs heads % (tp x cp))
        from titan_cp.model.model import check_parallel_layout
    except ImportError:
        check_parallel_layout = None
    if check_parallel_layout is not None:
        try:
            check_parallel_layout(model, config.parallelism, seq_len)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if check_runtime and kernel is not None:
        try:
            get_kernel(kernel)
        except Exception as e:  # e.g. triton without a GPU
            raise ConfigError(f"model.kernel = '{kernel}' cannot run here: {e}. "
                              f"Use model.kernel = 'torch' on CPU.") from e
    return degrees


def config_from_args(argv: Sequence[str] | None = None, *, world_size: int | None = None,
                     check_runtime: bool = True):
    """``train.py``'s parser: ``--job.config_file X.toml`` + ``--section.field value`` overrides."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file, overrides = split_args(argv)
    file_values = load_toml(config_file) if config_file else {}
    source = config_file or "<defaults>"
    return build_config(file_values, overrides, source=source, world_size=world_size,
                        check_runtime=check_runtime)


__all__ = [
    "SECTIONS",
    "ConfigError",
    "build_config",
    "config_from_args",
    "dataloader_config_for",
    "load_toml",
    "parse_cli_value",
    "resolve_degrees",
    "split_args",
    "validate",
]
