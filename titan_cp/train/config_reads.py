"""Which fields of a model ``Config`` does the model use? (The rule behind "an override nothing reads is an error".)

A ``[model]`` override (TOML or ``--model.<field>``) is a field of the family's
``config.model_spec.model``. It does something only if the model reads it, at
one of two times:

1. **build** (``config.build()``, the constructor): recorded, not guessed. For
   the duration of one build on the meta device the config's class gets a
   ``__getattribute__`` that notes every dataclass field read, except reads made
   by the dataclass machinery itself (``dataclasses.replace`` / ``__eq__`` /
   ``__repr__`` / pickling copy every field; TorchTitan's ``build()`` starts
   with ``replace(self)``), so a field counts only where model code reads it.
   This covers every field type (int, float, bool, str, sub-configs) and every
   family with no per-family table: Qwen3.5's top-level ``dim`` is never read
   (its layers are built from the flavor's sub-configs), a GDN model without
   attention layers never reads ``attn_num_heads``, a family with a hard-coded
   epsilon never reads ``norm_eps``.
2. **run time** (forward, ``parallelize_fn``, ``init_states``): these read the
   config the built model holds (``self.config.doc_masking``,
   ``model.config.cp_layout``, ``self.config.init_seed``). They cannot run at
   start-up (no process group, no data), so they are found in the source: a
   field ``f`` is used at run time when the built model holds its config and
   ``.config.f`` (or ``.model_config.f``) appears in titan_cp's code or in the
   files defining the built model's module classes or its spec's functions.
   That errs towards "used" (a name read on some other config also counts), so
   it can miss an unused override but never refuses one that is used.

Cost: one meta build with recording (no parameter memory), done once per job
that has ``[model]`` overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import sys
from pathlib import Path

_RUNTIME_READ = re.compile(r"\.(?:model_)?config\.([A-Za-z_]\w*)")
_COPYING_CODE = {dataclasses.__file__, "<string>"}  # dataclasses.py and its generated __eq__/__repr__/__init__


def build_reads(model_config):
    """``(fields read while building, the built model)`` for ``model_config``, built on the meta device."""
    import torch

    cls = type(model_config)
    names = {f.name for f in dataclasses.fields(cls)}
    reads: set[str] = set()
    original = cls.__getattribute__

    def recording(self, name):
        if name in names and sys._getframe(1).f_code.co_filename not in _COPYING_CODE:
            reads.add(name)
        return original(self, name)

    cls.__getattribute__ = recording
    try:
        with torch.device("meta"):
            model = model_config.build()
    finally:
        if "__getattribute__" in cls.__dict__ and cls.__dict__["__getattribute__"] is recording:
            del cls.__getattribute__  # back to the inherited one
        else:
            cls.__getattribute__ = original
    return reads, model


@functools.lru_cache(maxsize=None)
def _runtime_reads_in(path: str) -> frozenset[str]:
    try:
        return frozenset(_RUNTIME_READ.findall(Path(path).read_text()))
    except OSError:
        return frozenset()


def _titan_cp_files() -> list[str]:
    import titan_cp

    return [str(p) for p in Path(titan_cp.__file__).parent.rglob("*.py")]


def _source(obj) -> str | None:
    try:
        return inspect.getsourcefile(obj) if obj is not None else None
    except TypeError:  # a builtin
        return None


def runtime_reads(model, model_spec=None) -> set[str]:
    """Field names read through a held config at run time (the module docstring's rule 2)."""
    held = any(dataclasses.is_dataclass(v) and not isinstance(v, type)
               for m in model.modules() for v in vars(m).values())
    if not held:
        return set()
    files = set(_titan_cp_files())
    files |= {_source(klass) for m in model.modules() for klass in type(m).__mro__}
    files |= {_source(getattr(model_spec, fn, None)) for fn in ("parallelize_fn", "pipelining_fn",
                                                                "post_optimizer_build_fn")}
    files.discard(None)
    return set().union(*(_runtime_reads_in(f) for f in files))


def used_fields(model_config, model_spec=None) -> set[str] | None:
    """The fields of ``model_config`` the model reads (build or run time); None when it does not build."""
    try:
        reads, model = build_reads(model_config)
    except Exception:  # noqa: BLE001 - a config that does not build is named by the start-up checks / build itself
        return None
    names = {f.name for f in dataclasses.fields(model_config)}
    return reads | (runtime_reads(model, model_spec) & names)


__all__ = ["build_reads", "runtime_reads", "used_fields"]
