"""TOML front end: ``--job.config_file X.toml [--section.field value ...]`` -> ``Trainer.Config``.

TorchTitan 0.3.0 has no TOML: a job is a config function (``--module M
--config fn``) plus ``--section.field value`` overrides that its tyro-based
``ConfigManager`` parses and type-checks. This module flattens TOML into
exactly that and lets ``ConfigManager`` parse it:

1. ``[model] name`` / ``flavor`` pick the starting config
   (:data:`titan_cp.models.registry.MODEL_FAMILIES`; default ``"gdn"``);
2. keys TorchTitan's command line cannot set change that start: other
   ``[model]`` keys (parsed by tyro on the model's ``Config``), ``[parallelism]
   cp_exchange`` / ``cp_layout`` / ``cp_q_transition`` (model fields; ``cp_layout`` also picks
   ``context_parallel_load_balancer``) and ``[dataloader] dataset`` (the
   loader's config class);
3. every other key becomes a ``ConfigManager`` override: ``[training] steps =
   3`` -> ``--training.steps 3`` (``true`` -> a flag), ``[optimizer] lr`` ->
   ``--optimizer.param_groups.0.optimizer_kwargs.lr``, ``[job] dump_folder``
   -> ``--dump_folder``, ``[activation_checkpoint] mode`` -> its subcommand;
4. ``--section.field value`` on the command line overrides the file (values are
   TOML literals: ``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``; bare words are
   strings; a flag with no value is ``true``; ``"none"`` is None);
5. :func:`titan_cp.models.common.preflight.validate` checks the result.

titan_cp keeps only what TorchTitan's parser does not say well: unknown
sections and keys ("did you mean"), where a value came from, and tyro's
failures as a :class:`ConfigError` naming the field and the expected type.

Sections::

    [job]        config_file, dump_folder, hf_assets_path, description
    [model]      name, flavor, any field of the family's model Config (GDN: n_layers, kernel, ...);
                 gdn / kda / mamba2: hf_config = "path" takes every shape field from an FLA (transformers
                 Mamba-2) checkpoint's config.json (flavor then only picks the training defaults)
    [parallelism] TorchTitan's fields + cp_exchange, cp_layout, cp_q_transition (titan_cp/cp/settings.py)
    [optimizer]  name ("AdamW" | "Adam"), lr, betas, eps, weight_decay, implementation
    [activation_checkpoint] mode ("none" | "selective" | "full" | "memory_budget") + its fields
    [dataloader] (alias [data]) dataset ("tiny_corpus" | "synthetic" | a TorchTitan dataset)
                 + that loader's fields (synthetic: kind, vocab_size, mean_doc_len, seed)
    [training] [lr_scheduler] [checkpoint] [metrics] [validator] ...  any Trainer.Config section
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli

from titan_cp.errors import ConfigError, suggest, unknown_choice_message
from titan_cp.train.model_overrides import MODEL_HIDDEN_FIELDS, check_overrides_read
from titan_cp.train.tyro_args import Setting, fields_of, parse_fields, parse_settings, tokens

SECTION_ALIASES = {"data": "dataloader"}
JOB_KEYS = {"config_file": None, "description": None, "dump_folder": "dump_folder",
            "hf_assets_path": "hf_assets_path"}  # key -> ConfigManager path (None: not passed on)
OPTIMIZER_KEYS = {
    "name": "optimizer.param_groups.0.optimizer_name",
    "lr": "optimizer.param_groups.0.optimizer_kwargs.lr",
    "betas": "optimizer.param_groups.0.optimizer_kwargs.betas",
    "eps": "optimizer.param_groups.0.optimizer_kwargs.eps",
    "weight_decay": "optimizer.param_groups.0.optimizer_kwargs.weight_decay",
    "implementation": "optimizer.implementation",
}
AC_MODES = ("none", "selective", "full", "memory_budget")
MODEL_KEYS = ("name", "flavor", "hf_config")  # [model] keys that pick the config function and shape
CP_KEYS = ("cp_exchange", "cp_layout", "cp_q_transition")  # [parallelism] keys stored on the model config


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
        line, col, msg = getattr(e, "lineno", None), getattr(e, "colno", None), getattr(e, "msg", str(e))
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
    argv, i = list(argv), 0
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
                              f"(e.g. --training.steps 10).")
        overrides.append((section, key, parse_cli_value(raw)))
    return config_file, overrides


def _settings(file_values: dict[str, Any], overrides: Sequence[tuple[str, str, Any]], source: str) -> list[Setting]:
    """File values, then command-line values (later ones win), nested tables as dotted keys."""
    out: list[Setting] = []

    def add(section: str, key: str, value: Any, origin: str) -> None:
        if isinstance(value, dict):  # a nested table, e.g. [validator.dataloader]
            for k, v in value.items():
                add(section, f"{key}.{k}", v, origin)
        else:
            out.append(Setting(SECTION_ALIASES.get(section, section), key, value, origin))

    for section, table in file_values.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: top-level key '{section}' must be a table like "
                              f"[{section}]; put it under a section such as [training].")
        for key, value in table.items():
            add(section, key, value, f"{source} [{section}] {key}")
    for section, key, value in overrides:
        out.append(Setting(SECTION_ALIASES.get(section, section), key, value, f"command line --{section}.{key}"))
    return out


# --- the pieces of TorchTitan's config that a key addresses -----------------------------------


def _check_key(setting: Setting, valid: Sequence[str], obj: Any = None) -> None:
    """``setting.key`` is a valid key of its section (one level into nested dataclasses)."""
    head, _, rest = setting.key.partition(".")
    if head in valid:
        sub = getattr(obj, head, None) if obj is not None else None
        if rest and dataclasses.is_dataclass(sub):
            _check_key(Setting(setting.field.rpartition(".")[0], rest, setting.value, setting.origin),
                       list(fields_of(sub)), sub)
        return
    raise ConfigError(f"{setting.origin}: unknown key '{head}' in [{setting.section}].{suggest(head, valid)} "
                      f"Valid keys of [{setting.section}]: {', '.join(sorted(valid))}.")


def dataloader_config_for(dataset: str):
    """A fresh dataloader config for ``dataset`` (synthetic, the shipped corpus or a TorchTitan dataset)."""
    from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataLoader

    from titan_cp.components.data import SyntheticDataLoader, register_datasets

    register_datasets()
    if dataset == "synthetic":
        return SyntheticDataLoader.Config()
    if dataset.lower() in DATASETS:
        if not str(DATASETS[dataset.lower()].path).startswith(("/", ".")):
            return HuggingFaceTextDataLoader.Config(dataset=dataset)  # a hub dataset: TorchTitan's loader
        from titan_cp.components.data import tiny_corpus_config

        return dataclasses.replace(tiny_corpus_config(), dataset=dataset)
    raise ConfigError(unknown_choice_message("dataloader.dataset", dataset, ["synthetic", *DATASETS]))


def _ac_config(mode: str):
    from torchtitan.distributed.activation_checkpoint import FullAC, MemoryBudgetAC, SelectiveAC

    return {"selective": SelectiveAC.Config, "full": FullAC.Config, "memory_budget": MemoryBudgetAC.Config}[mode]()


def _ac_mode(config) -> str:
    current = config.activation_checkpoint
    return next((m for m in AC_MODES[1:] if current is not None and type(current) is type(_ac_config(m))), "none")


# --- the job ----------------------------------------------------------------------------------

_ACTIVE_JOB: TomlJob | None = None


def toml_job():
    """The config function ``ConfigManager`` runs for the active TOML job (``--config toml_job``)."""
    assert _ACTIVE_JOB is not None, "titan_cp.train.toml_config.toml_job: call TomlJob.activate() first"
    return _ACTIVE_JOB.base_config()


@functools.cache
def config_manager():
    """The process's TorchTitan ``ConfigManager``. Each new one registers its tyro rules on TorchTitan's
    module-level registry again, and every later parse walks all of them (after ~300 builds in one process
    a build took 5-10x longer); ``parse_args`` keeps nothing between calls but ``self.config``, which it
    replaces."""
    from torchtitan.config import ConfigManager

    return ConfigManager()


@dataclass
class TomlJob:
    """A TOML file plus command-line overrides, as TorchTitan's ``ConfigManager`` will see them."""

    settings: list[Setting]
    source: str = "<config>"
    _base: tuple[list[Setting], Any] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def _last(self, section: str, key: str) -> Setting | None:
        return next((s for s in reversed(self.settings) if (s.section, s.key) == (section, key)), None)

    def _of(self, section: str, skip: Sequence[str] = ()) -> list[Setting]:
        return [s for s in self.settings if s.section == section and s.key not in skip]

    def base_config(self):
        """The family's config for ``[model] name/flavor`` with the keys TorchTitan's CLI cannot set: built once
        for the current settings (a build asks for it twice, once through :func:`toml_job`), a fresh copy each call."""
        if self._base is None or self._base[0] != self.settings:
            self._base = (copy.deepcopy(self.settings), self._build_base_config())
        return copy.deepcopy(self._base[1])

    def _build_base_config(self):
        from titan_cp.cp.settings import LAYOUT_TO_LOAD_BALANCER
        from titan_cp.models.registry import family_config

        name, flavor = self._last("model", "name"), self._last("model", "flavor")
        for s in (name, flavor):
            if s is not None and not isinstance(s.value, str):
                raise ConfigError(f"{s.origin}: {s.field} = {s.value!r} must be a string (e.g. \"debug\").")
        try:
            config = family_config(name.value if name else "gdn", flavor.value if flavor else None)
        except ConfigError as e:
            where = flavor if flavor is not None and "model.flavor" in str(e) else name
            raise ConfigError(f"{where.origin}: {e}" if where else str(e)) from e

        hf_config = self._last("model", "hf_config")
        if hf_config is not None:  # every shape field from an FLA / transformers Mamba-2 config.json; [model] keys override
            from titan_cp.models.gdn.hf_config import model_fields_from_hf, read_hf_config

            if config.model_spec.name == "mamba2":  # transformers' Mamba2ForCausalLM
                from titan_cp.models.mamba2.hf_config import model_fields_from_hf
            elif config.model_spec.name not in ("gdn", "kda"):
                raise ConfigError(f"{hf_config.origin}: model.hf_config reads FLA gated_deltanet / kda and transformers "
                                  f"mamba2 checkpoints; use model.name = 'gdn', 'kda' or 'mamba2', not {config.model_spec.name!r}.")
            try:
                shape = model_fields_from_hf(read_hf_config(str(hf_config.value)))
            except ConfigError as e:
                raise ConfigError(f"{hf_config.origin}: {e}") from e
            model = dataclasses.replace(config.model_spec.model, **shape)
            config.model_spec = dataclasses.replace(config.model_spec, model=model)
            config.loss.global_vocab_size = model.vocab_size

        dataset = self._last("dataloader", "dataset")
        if dataset is not None and dataset.value != getattr(config.dataloader, "dataset", None):
            try:
                config.dataloader = dataloader_config_for(str(dataset.value))
            except ConfigError as e:
                raise ConfigError(f"{dataset.origin}: {e}") from e

        model = config.model_spec.model
        model_fields = fields_of(model, MODEL_HIDDEN_FIELDS)
        items = []
        for s in self._of("model", MODEL_KEYS):
            _check_key(s, list(model_fields))
            items.append((s, s.key, tokens(s.key, s.value)))
        for key in CP_KEYS:
            s, in_model = self._last("parallelism", key), self._last("model", key)
            if s is None:
                continue
            if key not in model_fields:
                raise ConfigError(f"{s.origin}: parallelism.{key} does not apply to model.name = "
                                  f"{config.model_spec.name!r} (its model config has no {key}); remove it.")
            if in_model is not None and in_model.value != s.value:
                raise ConfigError(f"{s.origin}: parallelism.{key} = {s.value!r} contradicts model.{key} = "
                                  f"{in_model.value!r}; set it in one place ([parallelism]).")
            items.append((s, key, tokens(key, s.value)))
        if items:
            from torchtitan.config.manager import custom_registry

            model = parse_fields(model, items, self.source, custom_registry)
            check_overrides_read(model, config.model_spec, [s for s, _, _ in items], config.model_spec.name)
            config.model_spec = dataclasses.replace(config.model_spec, model=model)
            if hasattr(config.loss, "global_vocab_size") and hasattr(model, "vocab_size"):
                config.loss.global_vocab_size = model.vocab_size
            layout = getattr(model, "cp_layout", None)
            if layout in LAYOUT_TO_LOAD_BALANCER:
                config.parallelism.context_parallel_load_balancer = LAYOUT_TO_LOAD_BALANCER[layout]
        return config

    def _manager_items(self, base) -> tuple[list[tuple[Setting, str, list[str]]], list[str]]:
        """(setting, ConfigManager path, tokens) for every key ConfigManager parses; AC tokens last."""
        sections = {f for f in fields_of(base) if dataclasses.is_dataclass(getattr(base, f))}
        sections = (sections | {"activation_checkpoint"}) - {"model_spec"}
        items, ac_tokens, ac_mode = [], [], None
        for s in self.settings:
            if s.section == "model" or (s.section, s.key) == ("dataloader", "dataset"):
                continue
            if s.section == "job":
                _check_key(s, list(JOB_KEYS))
                if JOB_KEYS[s.key]:
                    items.append((s, JOB_KEYS[s.key], tokens(JOB_KEYS[s.key], s.value)))
            elif s.section == "optimizer":
                _check_key(s, list(OPTIMIZER_KEYS))
                groups = base.optimizer.param_groups
                if len(groups) != 1 or groups[0].pattern != r".*":
                    raise ConfigError(f"{s.origin}: [optimizer] can only edit a single catch-all param group; "
                                      f"this config has {len(groups)} groups (edit its config function).")
                items.append((s, OPTIMIZER_KEYS[s.key], tokens(OPTIMIZER_KEYS[s.key], s.value)))
            elif s.section == "activation_checkpoint":
                mode = self._last("activation_checkpoint", "mode")
                mode = mode.value if mode is not None else _ac_mode(base)
                if s.key == "mode" and mode not in AC_MODES:
                    raise ConfigError(f"{s.origin}: {unknown_choice_message(s.field, mode, AC_MODES)}")
                if s.key == "mode":
                    ac_mode = mode
                    continue
                if mode == "none":
                    raise ConfigError(f"{s.origin}: {s.field} has no effect with mode = 'none'; "
                                      f"remove it or set mode to one of {list(AC_MODES[1:])}.")
                _check_key(s, ["mode", *fields_of(_ac_config(mode))])
                ac_mode = mode
                ac_tokens += tokens(s.field, s.value)
            elif s.section in sections:
                if s.section == "parallelism" and s.key in CP_KEYS:
                    continue
                obj = getattr(base, s.section)
                extra = CP_KEYS if s.section == "parallelism" else ("dataset",) if s.section == "dataloader" else ()
                _check_key(s, sorted({*fields_of(obj), *extra}), obj)
                value = s.value
                if s.field == "checkpoint.initial_load_path" and isinstance(value, str) and value and "://" not in value:
                    value = os.path.abspath(value)  # TorchTitan wants it absolute; TOML names it from the launch dir
                items.append((s, s.field, tokens(s.field, value)))
            else:
                raise ConfigError(f"{s.origin}: unknown section [{s.section}].{suggest(s.section, sorted(sections))} "
                                  f"Valid sections: {', '.join(['job', 'model', *sorted(sections)])}.")
        given = {s.key for s in self.settings if s.section == "checkpoint"}
        if given & {"initial_load_path", "initial_load_in_hf"} and "initial_load_model_only" not in given:
            # TorchTitan's default: an initial load reads model weights only (the config functions set
            # False so that TorchTitan does not warn about it on every run without an initial load).
            s = Setting("checkpoint", "initial_load_model_only", True, "TorchTitan's default with an initial load")
            items.append((s, s.field, tokens(s.field, True)))
        if ac_mode is not None:  # tyro's subcommand for the AC class, then that class's fields
            ac_tokens.insert(0, f"activation-checkpoint:{ac_mode.replace('_', '-')}")
        return items, ac_tokens

    def manager_args(self) -> list[str]:
        """``ConfigManager.parse_args`` arguments for this job (needs :meth:`activate` in the process)."""
        items, ac_tokens = self._manager_items(self.base_config())
        return ["--module", __name__, "--config", "toml_job", *[t for _, _, ts in items for t in ts], *ac_tokens]

    def activate(self) -> None:
        """Make ``--module titan_cp.train.toml_config --config toml_job`` build this job."""
        global _ACTIVE_JOB
        _ACTIVE_JOB = self

    def build(self, *, world_size: int | None = None, check_runtime: bool = True):
        """The validated ``Trainer.Config``, parsed by TorchTitan's ``ConfigManager``."""
        from titan_cp.models.common.preflight import validate

        base = self.base_config()
        items, ac_tokens = self._manager_items(base)
        self.activate()
        head = ["--module", __name__, "--config", "toml_job"]
        config = parse_settings(lambda args: config_manager().parse_args(head + args), items, base, self.source,
                                ac_tokens)
        degrees = validate(config, world_size=world_size, check_runtime=check_runtime,
                           written_q_transition=self._last("parallelism", "cp_q_transition"))
        if check_runtime:  # the data is the machine's, like the kernels: read where the job runs
            from titan_cp.components.data_checks import check_data

            check_data(config, degrees["dp_replicate"] * degrees["dp_shard"])
        return config


def job_from_args(argv: Sequence[str] | None = None) -> TomlJob:
    """``train.py``'s arguments (``--job.config_file X.toml`` + ``--section.field value``) as a job."""
    config_file, overrides = split_args(sys.argv[1:] if argv is None else list(argv))
    file_values = load_toml(config_file) if config_file else {}
    source = config_file or "<defaults>"
    return TomlJob(_settings(file_values, overrides, source), source)


def build_config(file_values: dict[str, Any] | None = None, overrides: Sequence[tuple[str, str, Any]] = (), *,
                 source: str = "<config>", world_size: int | None = None, check_runtime: bool = True):
    """Validated ``Trainer.Config`` from parsed TOML values and ``(section, key, value)`` overrides."""
    job = TomlJob(_settings(file_values or {}, overrides, source), source)
    return job.build(world_size=world_size, check_runtime=check_runtime)


def config_from_args(argv: Sequence[str] | None = None, *, world_size: int | None = None,
                     check_runtime: bool = True):
    """``train.py``'s parser: ``--job.config_file X.toml`` + ``--section.field value`` overrides."""
    return job_from_args(argv).build(world_size=world_size, check_runtime=check_runtime)


__all__ = [
    "ConfigError",
    "TomlJob",
    "build_config",
    "config_from_args",
    "dataloader_config_for",
    "job_from_args",
    "load_toml",
    "parse_cli_value",
    "split_args",
    "toml_job",
]
