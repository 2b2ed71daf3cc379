"""GDN ModelSpec and TorchTitan config functions.

TorchTitan 0.3.0's native entry point finds these by ``--module titan_cp.models.gdn``
(it imports ``titan_cp.models.gdn.config_registry`` first) or ``--module titan_cp``::

    torchrun --nproc_per_node=2 -m torchtitan.train --module titan_cp.models.gdn --config gdn_debug \
        --parallelism.context_parallel_degree 2

Each function returns a complete ``Trainer.Config`` for one flavor
(``titan_cp.models.gdn.flavors``); the TOML front end (``[model] name = "gdn"``)
starts from :func:`config_for_flavor` and applies the file on top. Everything
but the model comes from :func:`titan_cp.train.job_defaults.trainer_config`.
"""

from __future__ import annotations

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from titan_cp.models.gdn.flavors import FLAVORS
from titan_cp.train.job_defaults import cpu_training, gpu_training, trainer_config

DEFAULT_FLAVOR = "debug"


def decoder_model_spec(name: str, flavor: str, model, parallelize_fn, state_dict_adapter) -> ModelSpec:
    """The ``ModelSpec`` of a family built on the GDN LM (GDN, KDA, Mamba-2): TorchTitan's decoder split
    and schedules for PP (checks: titan_cp/models/common/pipeline.py), the family's TP plan and HF adapter."""
    from torchtitan.distributed.pipeline_parallel import pipeline_llm

    return ModelSpec(name=name, flavor=flavor, model=model, parallelize_fn=parallelize_fn,
                     pipelining_fn=pipeline_llm, post_optimizer_build_fn=None,
                     state_dict_adapter=state_dict_adapter)


def model_spec(flavor: str, **overrides) -> ModelSpec:
    """The ``ModelSpec`` of a GDN flavor (``titan_cp.models.gdn.FLAVORS``) with model-field overrides."""
    from titan_cp.models.gdn.state_dict_adapter import FLAStateDictAdapter
    from titan_cp.models.gdn.flavors import model_config
    from titan_cp.models.gdn.parallelize import parallelize_gdn

    # checkpoint.initial_load_in_hf / last_save_in_hf: FLA's format
    return decoder_model_spec("gdn", flavor, model_config(flavor, **overrides), parallelize_gdn, FLAStateDictAdapter)


def cpu_config(spec: ModelSpec) -> Trainer.Config:
    """A short CPU run of ``spec``'s model: 512 tokens, shipped corpus (the debug flavors' job settings)."""
    return trainer_config(
        spec,
        training=cpu_training(),
        lr=3e-3,
        warmup_steps=2,
        optimizer_impl="foreach",
        checkpoint_interval=10,
        log_freq=1,
    )


def gdn_debug() -> Trainer.Config:
    """Tiny GDN for CPU (torch kernel, 512 tokens, shipped corpus): the default CPU run."""
    return cpu_config(model_spec("debug"))


def gdn_debug_hybrid() -> Trainer.Config:
    """Tiny GDN + softmax-attention hybrid for CPU."""
    return cpu_config(model_spec("debug_hybrid"))


def _gpu_config(flavor: str, lr: float) -> Trainer.Config:
    """A long GPU run of ``flavor``: triton kernel, 64K tokens per sequence, full AC."""
    return trainer_config(
        model_spec(flavor, kernel="triton"),
        training=gpu_training(steps=20000),
        lr=lr,
        warmup_steps=1000,
        optimizer_impl="fused",
        checkpoint_interval=1000,
        log_freq=10,
        activation_checkpoint=FullAC.Config(),
    )


def gdn_340m() -> Trainer.Config:
    """FLA's 340M GDN shape, Triton kernel, 64K tokens per sequence (pair with CP 8 on 8 GPUs)."""
    return _gpu_config("340M", lr=3e-4)


def gdn_1_3b() -> Trainer.Config:
    """FLA's 1.3B GDN shape, Triton kernel, 64K tokens per sequence (pair with CP 8 on 8 GPUs)."""
    return _gpu_config("1.3B", lr=2e-4)


def gdn_1_3b_hybrid() -> Trainer.Config:
    """1.3B GDN + softmax-attention hybrid, Triton kernel, 64K tokens per sequence."""
    config = gdn_1_3b()
    config.model_spec = model_spec("1.3B_hybrid", kernel="triton")
    return config


def gdn_from_hf(hf_config: str, flavor: str = "debug") -> Trainer.Config:
    """``flavor``'s training defaults with the model shape of an FLA checkpoint's config.json.

    The config-function form of ``[model] hf_config``, e.g. in your own config module::

        def extend_340m():
            config = gdn_from_hf("path/to/fla-gdn-340m", flavor="340M")
            config.checkpoint.initial_load_path = "path/to/fla-gdn-340m"
            config.checkpoint.initial_load_in_hf = True
            config.checkpoint.initial_load_model_only = True
            return config
    """
    import dataclasses

    from titan_cp.models.gdn.hf_config import model_fields_from_hf, read_hf_config

    config = config_for_flavor(flavor)
    model = dataclasses.replace(config.model_spec.model, **model_fields_from_hf(read_hf_config(hf_config)))
    config.model_spec = dataclasses.replace(config.model_spec, model=model)
    config.loss = CrossEntropyLoss.Config(global_vocab_size=model.vocab_size)
    return config


# [model] flavor -> the config function the TOML front end starts from.
CONFIG_FOR_FLAVOR = {
    "debug": gdn_debug,
    "debug_hybrid": gdn_debug_hybrid,
    "340M": gdn_340m,
    "1.3B": gdn_1_3b,
    "1.3B_hybrid": gdn_1_3b_hybrid,
}


def config_for_flavor(flavor: str) -> Trainer.Config:
    """The GDN config of ``flavor``; flavors without a function get the debug defaults."""
    fn = CONFIG_FOR_FLAVOR.get(flavor)
    if fn is not None:
        return fn()
    config = gdn_debug()
    config.model_spec = model_spec(flavor)
    config.loss = CrossEntropyLoss.Config(global_vocab_size=config.model_spec.model.vocab_size)
    return config


__all__ = ["DEFAULT_FLAVOR", "FLAVORS", "config_for_flavor", "cpu_config", "decoder_model_spec", "gdn_1_3b", "gdn_1_3b_hybrid", "gdn_340m", "gdn_debug",
           "gdn_debug_hybrid", "gdn_from_hf", "model_spec"]
