"""KDA ModelSpec and TorchTitan config functions (``[model] name = "kda"``, or
``--module titan_cp.models.kda --config kda_debug``)::

    torchrun --nproc_per_node=2 train.py --job.config_file train_configs/kda_debug_cp2.toml
"""

from __future__ import annotations

from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from titan_cp.models.gdn.config_registry import cpu_config, decoder_model_spec
from titan_cp.models.kda.flavors import FLAVORS

DEFAULT_FLAVOR = "kda_debug"


def model_spec(flavor: str, **overrides) -> ModelSpec:
    """The ``ModelSpec`` of a KDA flavor with model-field overrides."""
    from titan_cp.models.kda.flavors import model_config
    from titan_cp.models.kda.parallelize import parallelize_kda
    from titan_cp.models.kda.state_dict_adapter import KDAStateDictAdapter

    return decoder_model_spec("kda", flavor, model_config(flavor, **overrides), parallelize_kda,
                              KDAStateDictAdapter)


def kda_debug() -> Trainer.Config:
    """Tiny KDA for CPU: torch kernel, 512 tokens, shipped corpus."""
    return config_for_flavor("kda_debug")


def kda_debug_hybrid() -> Trainer.Config:
    """Tiny 3:1 KDA + softmax-attention hybrid for CPU."""
    return config_for_flavor("kda_debug_hybrid")


def config_for_flavor(flavor: str) -> Trainer.Config:
    """A short CPU run of the KDA ``flavor`` (both flavors are CPU-sized)."""
    return cpu_config(model_spec(flavor))


__all__ = ["DEFAULT_FLAVOR", "FLAVORS", "config_for_flavor", "kda_debug", "kda_debug_hybrid", "model_spec"]
