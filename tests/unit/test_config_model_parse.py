"""``[model]`` keys parsed by tyro over only the fields they set equal a tyro parse of the whole model config.

:func:`titan_cp.train.tyro_args.parse_fields` (the front end's parse) is
checked against the parse it replaces: ``tyro.cli`` over the model's whole
``Config`` class, every nested (per-layer) sub-config included. For every
shipped TOML that runs on CPU, and for a Qwen3.5 flagship, the two give the
same ``Trainer.Config``, field by field; for bad ``[model]`` values they
give the same ConfigError message.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types

import pytest
import tyro

import titan_cp.train.toml_config as toml_config
from titan_cp.errors import ConfigError
from titan_cp.train.toml_config import build_config, config_from_args
from titan_cp.train.tyro_args import parse_settings
from tests.unit.test_config import TRAIN_CONFIGS, _nproc_of, train_config_argv

FLAGSHIP = "qwen3_5_9b_256k_cp8_tp2.toml"  # the Qwen3.5 flagship with the fewest layers' worth of tyro work
TOMLS = [p for p in sorted(TRAIN_CONFIGS.glob("*.toml"))
         if not re.search(r"_cp(8|16)", p.name) or p.name == FLAGSHIP]


def whole_model_parse(model, items, source, registry, calls):
    """The reference: tyro over the model's whole ``Config`` class (the parse ``parse_fields`` replaces)."""
    calls.append(len(items))
    return parse_settings(lambda args: tyro.cli(type(model), args=args, default=model, registry=registry),
                          items, model, source)


def differences(a, b, path: str = "config") -> list[str]:
    """Where ``a`` and ``b`` differ: dataclasses field by field (every field, ``compare=False`` ones too),
    ``functools.partial`` by function and arguments, functions by code and closure (a config function
    may make its closures anew per call), everything else by ``==``."""
    if type(a) is not type(b):
        return [f"{path}: {type(a).__qualname__} vs {type(b).__qualname__}"]
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return [d for f in dataclasses.fields(a) for d in differences(getattr(a, f.name), getattr(b, f.name),
                                                                      f"{path}.{f.name}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} vs {list(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}[{k!r}]")]
    if isinstance(a, functools.partial):
        return differences((a.func, a.args, a.keywords), (b.func, b.args, b.keywords), path)
    if isinstance(a, types.FunctionType):
        cells = lambda f: [c.cell_contents for c in f.__closure__ or ()]  # noqa: E731
        if a.__code__ is not b.__code__:
            return [f"{path}: {a.__qualname__} vs {b.__qualname__}"]
        return differences(cells(a), cells(b), f"{path}.<closure>")
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def test_differences_sees_a_changed_nested_field():
    config, other = (build_config({"model": {"name": "qwen3_5"}}, source="test.toml", world_size=1,
                                  check_runtime=False) for _ in range(2))
    assert differences(config, other) == []  # two builds: new closures and partials, equal
    w2 = other.model_spec.model.layers[1].feed_forward.w2
    w2.in_features += 1
    w2.param_init = {**w2.param_init, "weight": functools.partial(w2.param_init["weight"], std=0.5)}
    path = "config.model_spec.model.layers[1].feed_forward.w2"
    assert [d.partition(":")[0] for d in differences(config, other)] == [
        f"{path}.param_init['weight'][2]['std']", f"{path}.in_features"]


@pytest.mark.parametrize("path", TOMLS, ids=lambda p: p.name)
def test_narrowed_model_parse_equals_whole_parse(path, tmp_path, monkeypatch):
    argv, world = train_config_argv(path, tmp_path), _nproc_of(path)
    config = config_from_args(argv, world_size=world, check_runtime=False)
    calls: list[int] = []
    monkeypatch.setattr(toml_config, "parse_fields", functools.partial(whole_model_parse, calls=calls))
    reference = config_from_args(argv, world_size=world, check_runtime=False)
    assert calls, f"{path.name} sets no [model] field: the comparison would not exercise the model parse"
    assert differences(config, reference) == []


# Bad [model] values, each refused by tyro (type, choice, quoted number) or by a check after it.
BAD_MODEL_VALUES = {
    "float_as_word": {"model": {"expand_v": "two"}},
    "unknown_kernel": {"model": {"kernel": "trition"}},
    "quoted_int": {"model": {"n_layers": "2"}},
    "float_for_int": {"model": {"n_layers": 2.5}},
    "qwen3_5_unknown_kernel": {"model": {"name": "qwen3_5", "kernel": "trition"}},
    "qwen3_5_word_for_int": {"model": {"name": "qwen3_5", "vocab_size": "big"}},
    "qwen3_5_sub_config_as_value": {"model": {"name": "qwen3_5", "layers": 3}},
    "mamba2_unread_field": {"model": {"name": "mamba2", "expand_v": 1.0}},
    "unknown_exchange": {"parallelism": {"cp_exchange": "ring"}},
}


@pytest.mark.parametrize("values", BAD_MODEL_VALUES.values(), ids=BAD_MODEL_VALUES.keys())
def test_bad_model_values_get_the_whole_parse_message(values, monkeypatch):
    def message() -> str:
        with pytest.raises(ConfigError) as e:
            build_config(values, source="test.toml", world_size=1, check_runtime=False)
        return str(e.value)

    narrowed = message()
    calls: list[int] = []
    monkeypatch.setattr(toml_config, "parse_fields", functools.partial(whole_model_parse, calls=calls))
    assert narrowed == message()
    assert calls


@pytest.mark.parametrize("values, message", [
    ({"model": {"doc_masking": 1}}, "test.toml [model] doc_masking: model.doc_masking = 1 is rejected "
                                    "(expected bool): Unrecognized options: 1"),
    ({"model": {"n_layers": [1, 2]}}, "test.toml [model] n_layers: model.n_layers = [1, 2] is rejected "
                                      "(expected int): Unrecognized options: 2"),
])
def test_a_flag_given_extra_values_is_named_with_its_type(values, message):
    """A value tyro reads as a flag plus stray words (a non-bool for a bool, a list for an int). A parse of
    the whole model class reported tyro failing to build its own parser (a ``dict[str, SpmdLayout]`` field
    without a default) instead; over the set fields only, the message is tyro's and names the type."""
    with pytest.raises(ConfigError) as e:
        build_config(values, source="test.toml", world_size=1, check_runtime=False)
    assert str(e.value) == message
