"""``[model]`` overrides: each one must change the model that is built and run.

A ``[model]`` key sets a field of the family's model ``Config``. A field that
no part of building or running the model reads (:mod:`titan_cp.train.config_reads`)
would leave the run training the unchanged model, so such an override is a
:class:`~titan_cp.errors.ConfigError` naming the fields that are read; so is a
sub-config (e.g. Qwen3.5's per-layer ``layers``) written as one value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from titan_cp.errors import ConfigError
from titan_cp.train.tyro_args import Setting

MODEL_HIDDEN_FIELDS = ("param_init", "sharding_config")  # model fields a [model] key never sets


def check_overrides_read(model, model_spec, settings: Sequence[Setting], family: str) -> None:
    """Every ``[model]`` override must be read by the model it builds (:mod:`titan_cp.train.config_reads`:
    reads recorded during a meta build + run-time reads of the held config); one that nothing reads (e.g.
    Qwen3.5's top-level ``dim``: its layers come from the flavor's sub-configs) is an error, not a no-op."""
    from titan_cp.train.config_reads import used_fields

    used = None
    for s in settings:
        head = s.key.partition(".")[0]
        old = getattr(model, head, None)
        if "." not in s.key and (dataclasses.is_dataclass(old) or (isinstance(old, list) and old
                                                                    and dataclasses.is_dataclass(old[0]))):
            raise ConfigError(f"{s.origin}: {s.field} is a sub-config built by model.flavor; it cannot be set "
                              f"as one value. Pick another model.flavor.")
        used = used_fields(model, model_spec) if used is None else used
        if used is None:  # the overridden config does not build: the start-up checks / the build name why
            return
        if head not in used:
            raise ConfigError(_unread_message(s, model, used, family))


def _unread_message(s: Setting, model, used: set[str], family: str) -> str:
    from titan_cp.models.registry import MODEL_FAMILIES

    flavors = list(MODEL_FAMILIES[family].flavors) if family in MODEL_FAMILIES else []
    values = {f: getattr(model, f) for f in used}
    subs = sorted(f for f, v in values.items() if dataclasses.is_dataclass(v) or (
        isinstance(v, list) and v and dataclasses.is_dataclass(v[0])))
    settable = sorted(f for f in used if f not in subs and f not in MODEL_HIDDEN_FIELDS)
    shape = (f": its shape comes from the flavor's sub-configs ({', '.join(subs)}); pick a model.flavor with "
             f"the shape you want (one of {flavors})" if subs else
             f", or pick a model.flavor / layer_pattern whose layers use it (flavors: {flavors})")
    return (f"{s.origin}: {s.field} = {s.value!r} is not read by model.name = {family!r}: building and running "
            f"this model never uses {s.field}, so the run would train the unchanged model. Remove it{shape}. "
            f"Fields this model reads: {', '.join(settable)}.")
