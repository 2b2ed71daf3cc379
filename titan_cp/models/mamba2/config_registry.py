"""Mamba-2 ModelSpec and TorchTitan config functions (``[model] name = "mamba2"``, or
``--module titan_cp.models.mamba2 --config mamba2_debug``)::

    torchrun --nproc_per_node=2 train.py --job.config_file train_configs/mamba2_debug_cp2.toml
"""

from __future__ import annotations

from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from titan_cp.models.gdn.config_registry import cpu_config, decoder_model_spec
from titan_cp.models.mamba2.flavors import FLAVORS

DEFAULT_FLAVOR = "mamba2_debug"


def model_spec(flavor: str, **overrides) -> ModelSpec:
    """The ``ModelSpec`` of a Mamba-2 flavor with model-field overrides."""
    from titan_cp.models.mamba2.flavors import model_config
    from titan_cp.models.mamba2.parallelize import parallelize_mamba2
    from titan_cp.models.mamba2.state_dict_adapter import Mamba2StateDictAdapter

    return decoder_model_spec("mamba2", flavor, model_config(flavor, **overrides), parallelize_mamba2,
                              Mamba2StateDictAdapter)


def mamba2_debug() -> Trainer.Config:
    """Tiny Mamba-2 for CPU: torch SSD kernel, 512 tokens, shipped corpus."""
    return config_for_flavor("mamba2_debug")


def mamba2_debug_hybrid() -> Trainer.Config:
    """Tiny 3:1 Mamba-2 + softmax-attention hybrid for CPU."""
    return config_for_flavor("mamba2_debug_hybrid")


def config_for_flavor(flavor: str) -> Trainer.Config:
    """A short CPU run of the Mamba-2 ``flavor`` (the real-size flavors get the same job settings)."""
    return cpu_config(model_spec(flavor))


__all__ = ["DEFAULT_FLAVOR", "FLAVORS", "config_for_flavor", "mamba2_debug", "mamba2_debug_hybrid", "model_spec"]
