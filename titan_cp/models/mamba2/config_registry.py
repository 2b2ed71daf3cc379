"""Mamba-2 ModelSpec and TorchTitan config functions (``[model] name = "mamba2"``, or
``--module titan_cp.models.mamba2 --config mamba2_debug``)::

    torchrun --nproc_per_node=2 train.py --job.config_file train_configs/mamba2_debug_cp2.toml
"""

from __future__ import annotations

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from titan_cp.models.mamba2.flavors import FLAVORS
from titan_cp.train.job_defaults import cpu_training, trainer_config

DEFAULT_FLAVOR = "mamba2_debug"


def model_spec(flavor: str, **overrides) -> ModelSpec:
    """The ``ModelSpec`` of a Mamba-2 flavor with model-field overrides."""
    from torchtitan.distributed.pipeline_parallel import pipeline_llm

    from titan_cp.models.mamba2.flavors import model_config
    from titan_cp.models.mamba2.parallelize import parallelize_mamba2
    from titan_cp.models.mamba2.state_dict_adapter import Mamba2StateDictAdapter

    return ModelSpec(name="mamba2", flavor=flavor, model=model_config(flavor, **overrides),
                     parallelize_fn=parallelize_mamba2, pipelining_fn=pipeline_llm, post_optimizer_build_fn=None,
                     state_dict_adapter=Mamba2StateDictAdapter)


def mamba2_debug() -> Trainer.Config:
    """Tiny Mamba-2 for CPU: torch SSD kernel, 512 tokens, shipped corpus."""
    return config_for_flavor("mamba2_debug")


def mamba2_debug_hybrid() -> Trainer.Config:
    """Tiny 3:1 Mamba-2 + softmax-attention hybrid for CPU."""
    return config_for_flavor("mamba2_debug_hybrid")


def config_for_flavor(flavor: str) -> Trainer.Config:
    """A short CPU run of the Mamba-2 ``flavor`` (the real-size flavors get the same job settings)."""
    config = trainer_config(model_spec(flavor), training=cpu_training(), lr=3e-3, warmup_steps=2,
                            optimizer_impl="foreach", checkpoint_interval=10, log_freq=1)
    config.loss = CrossEntropyLoss.Config(global_vocab_size=config.model_spec.model.vocab_size)
    return config


__all__ = ["DEFAULT_FLAVOR", "FLAVORS", "config_for_flavor", "mamba2_debug", "mamba2_debug_hybrid", "model_spec"]
