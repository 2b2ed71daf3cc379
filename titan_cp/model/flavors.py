"""Model flavors: the shapes in ``configs/<flavor>.toml``, turned into ``GDNModel.Config``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tomli

from titan_cp.errors import unknown_choice_message

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
FLAVORS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))


def model_config(flavor: str, **overrides):
    """``GDNModel.Config`` of ``flavor`` with field ``overrides`` (e.g. n_layers=1, kernel="recurrent")."""
    from titan_cp.model.model import GDNModel

    if flavor not in FLAVORS:
        raise ValueError(unknown_choice_message("model.flavor", flavor, FLAVORS))
    with open(CONFIG_DIR / f"{flavor}.toml", "rb") as f:
        values = tomli.load(f)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(GDNModel.Config) if not f.name.startswith("_")}
    for key in values:
        if key not in known:
            raise ValueError(unknown_choice_message(f"model.{key} (a model field)", key, known))
    return GDNModel.Config(**values)
