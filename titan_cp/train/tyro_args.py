"""Talking to tyro, TorchTitan's command-line parser: config values as tokens, its failures as ConfigErrors.

A :class:`Setting` is one ``section.key = value`` with where it came from.
:func:`tokens` writes it the way tyro reads it (``--training.steps 3``,
booleans as ``--flag`` / ``--section.no-flag``, lists as several values,
string lists as ``A,B``, ``"none"`` as ``None``). :func:`parse_settings` runs
a tyro parse over many settings; when tyro refuses (it prints a box and
exits), it finds the first setting that fails on its own and raises a
:class:`ConfigError` naming that field, where it came from, the expected
type and tyro's reason. tyro accepts a quoted number for an int field (the
command line has no types); a TOML string there is reported too.
:func:`parse_fields` does the same over only the fields the settings name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from titan_cp.errors import ConfigError


@dataclass
class Setting:
    """One ``section.key = value`` from the TOML file or the command line."""

    section: str
    key: str  # dotted below the section for nested tables, e.g. "dataloader.dataset" in [validator]
    value: Any
    origin: str  # "x.toml [training] steps" or "command line --training.steps"

    @property
    def field(self) -> str:
        return f"{self.section}.{self.key}"


def fields_of(obj: Any, hidden: Sequence[str] = ()) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj) if f.init and not f.name.startswith("_") and f.name not in hidden}


def lookup(obj: Any, path: str) -> Any:
    """``obj.a.b`` for ``path = "a.b"`` (list indices and dict keys too)."""
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj[part]
        elif isinstance(obj, list):
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def expected_type(root: Any, path: str) -> str:
    """The annotation of the field at ``path`` (for messages), or the type of its current value."""
    head, _, last = path.rpartition(".")
    try:
        parent = lookup(root, head) if head else root
        if dataclasses.is_dataclass(parent):
            tp = fields_of(parent)[last].type
            return tp if isinstance(tp, str) else tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")
        return type(lookup(root, path)).__name__
    except (AttributeError, KeyError, IndexError, ValueError):
        return "another type"


def _literal(value: Any) -> str:
    return "None" if isinstance(value, str) and value.lower() in ("none", "null") else str(value)


def tokens(path: str, value: Any) -> list[str]:
    """``--path value`` as tyro reads it: booleans as flags, lists as several values (str lists as A,B)."""
    if isinstance(value, bool):
        head, dot, last = path.rpartition(".")
        return [f"--{path}"] if value else [f"--{head}{dot}no-{last}"]
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            return [f"--{path}", ",".join(value)]
        return [f"--{path}", *map(_literal, value)]
    return [f"--{path}", _literal(value)]


def _tyro_reason(output: str) -> str:
    """The message of a tyro error box, without its title and help text."""
    lines = [ln.strip(" │╭╮╰╯") for ln in output.splitlines()]
    lines = [ln for ln in lines if ln.strip() and ln.strip("─- ")]
    body = []
    for ln in lines[1:]:  # lines[0] is the title ("Value error", "Invalid choice", ...)
        if ln.startswith(("Argument helptext", "For full helptext", "Perhaps you meant", "Available subcommands")):
            break
        body.append(ln.strip())
    return " ".join(body) or output.strip()


def _run_tyro(parse: Callable[[list[str]], Any], tokens: list[str]) -> tuple[Any, str | None]:
    """``parse(tokens)`` -> (result, None), or (None, tyro's reason) when tyro rejects them."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
            return parse(tokens), None
    except SystemExit:
        return None, _tyro_reason(out.getvalue())


def parse_settings(parse: Callable[[list[str]], Any], items: list[tuple[Setting, str, list[str]]], root: Any, source: str, tail: Sequence[str] = ()):
    """``parse`` all items' tokens (+ ``tail``); on failure name the first item that fails on its own."""
    result, reason = _run_tyro(parse, [t for _, _, tokens in items for t in tokens] + list(tail))
    if reason is None:
        for setting, path, _ in items:  # a quoted number is a string in TOML: say so
            value = lookup(result, path)
            if (isinstance(setting.value, str) and isinstance(value, (int, float)) and not isinstance(value, bool)
                    and _literal(setting.value) != "None"):
                raise ConfigError(
                    f"{setting.origin}: {setting.field} = {setting.value!r} has type str, expected "
                    f"{expected_type(root, path)}. Write it without quotes, e.g. "
                    f"{setting.key} = {setting.value.strip() or '...'}.")
        return result
    for setting, path, tokens in items:
        _, alone = _run_tyro(parse, tokens + list(tail))
        if alone is not None:  # a parse error of this flag (not a cross-field check) gets the expected type
            expected = f" (expected {expected_type(root, path)})" if "--" in alone or "Unrecognized" in alone else ""
            raise ConfigError(f"{setting.origin}: {setting.field} = {setting.value!r} is rejected{expected}: {alone}")
    raise ConfigError(f"{source}: TorchTitan's config parser rejects these settings together: {reason}")


@functools.cache
def _narrowed(cls: type, names: tuple[str, ...]) -> type:
    """A dataclass with only the fields ``names`` of ``cls``, typed as there (``Annotated`` tyro markers kept)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return dataclasses.make_dataclass(cls.__name__, [(name, hints[name]) for name in names])


def parse_fields(obj: Any, items: list[tuple[Setting, str, list[str]]], source: str, registry: Any):
    """:func:`parse_settings` for the dataclass ``obj``, with tyro over only the top-level fields the items set.

    tyro builds its parser over every field of the class it is given, nested configs included: for a
    Qwen3.5 model (a list of per-layer sub-configs) that takes seconds, for a flagship tens of seconds.
    Here tyro parses a dataclass holding just the fields the items name (``kernel`` for ``--kernel``,
    ``attn`` for ``--attn.n_heads``), with the annotations of ``type(obj)`` and ``obj``'s values as
    defaults, so each flag is type-checked and refused exactly as in a parse of the whole class; the
    parsed fields then replace ``obj``'s (``dataclasses.replace``: its ``__init__`` / ``__post_init__``
    run as they would at the end of a whole parse). Every other field keeps ``obj``'s value.
    """
    import tyro

    names = tuple(dict.fromkeys(path.partition(".")[0] for _, path, _ in items))
    narrowed = _narrowed(type(obj), names)
    default = narrowed(**{name: getattr(obj, name) for name in names})

    def parse(args: list[str]):
        parsed = tyro.cli(narrowed, args=args, default=default, registry=registry)
        return dataclasses.replace(obj, **{name: getattr(parsed, name) for name in names})

    return parse_settings(parse, items, obj, source)
