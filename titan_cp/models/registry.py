"""``[model] name`` -> the model family behind it: THE place a new family plugs into the TOML front end.

A family is a folder ``titan_cp/models/<name>/`` whose ``config_registry``
module defines ``FLAVORS``, ``DEFAULT_FLAVOR`` and
``config_for_flavor(flavor) -> Trainer.Config`` (the same module TorchTitan's
``--module titan_cp.models.<name>`` reads). The module is imported only when
its family is asked for, so a GDN run never imports TorchTitan's Qwen3.5 (or
FLA). ``[model]`` keys other than ``name`` / ``flavor`` then set fields of the
returned ``config.model_spec.model``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from titan_cp.errors import ConfigError, unknown_choice_message


@dataclass(frozen=True)
class ModelFamily:
    """One ``[model] name``: the module with its flavors and config functions."""

    config_module: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(self.config_module)

    @property
    def flavors(self) -> tuple[str, ...]:
        return tuple(self.module.FLAVORS)

    @property
    def default_flavor(self) -> str:
        return self.module.DEFAULT_FLAVOR

    def config_for_flavor(self, flavor: str):
        return self.module.config_for_flavor(flavor)


MODEL_FAMILIES: dict[str, ModelFamily] = {
    "gdn": ModelFamily("titan_cp.models.gdn.config_registry"),
    "kda": ModelFamily("titan_cp.models.kda.config_registry"),
    "mamba2": ModelFamily("titan_cp.models.mamba2.config_registry"),
    "qwen3_5": ModelFamily("titan_cp.models.qwen3_5.config_registry"),
}


def register_model_family(name: str, family: ModelFamily) -> None:
    """Add (or replace) the family behind ``[model] name = "<name>"`` (e.g. from your own package)."""
    MODEL_FAMILIES[name] = family


def family_config(name: str, flavor: str | None = None):
    """The starting ``Trainer.Config`` of ``[model] name`` / ``flavor`` (the family's default flavor if None)."""
    if name not in MODEL_FAMILIES:
        raise ConfigError(unknown_choice_message("model.name", name, MODEL_FAMILIES))
    family = MODEL_FAMILIES[name]
    flavor = family.default_flavor if flavor is None else flavor
    if flavor not in family.flavors:
        raise ConfigError(unknown_choice_message("model.flavor", flavor, family.flavors)
                          + f" (flavors of model.name = {name!r})")
    return family.config_for_flavor(flavor)
