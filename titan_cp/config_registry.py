"""TorchTitan config functions for titan_cp's model flavors.

TorchTitan 0.3.0's native entry point finds these by ``--module titan_cp``
(it imports ``titan_cp.config_registry`` first)::

    torchrun --nproc_per_node=2 -m torchtitan.train --module titan_cp --config gdn_debug \
        --parallelism.context_parallel_degree 2

Each function returns a complete ``Trainer.Config`` for one flavor; the TOML
front end (:mod:`titan_cp.toml_config`, ``train.py``) starts from the same
function (chosen by ``[model] name`` and ``[model] flavor``, see
:data:`MODEL_FAMILIES`) and applies the file on top.

Where a new model family plugs in: add one :class:`ModelFamily` to
:data:`MODEL_FAMILIES` (``[model] name`` -> the family's flavors and a
``config_for_flavor(flavor) -> Trainer.Config``), or call
:func:`register_model_family` from the family's own package. Nothing else in
the TOML front end or ``train.py`` knows model names.

Defaults shared by all flavors (reasons in :mod:`titan_cp.compat`):
``parallelism.spmd_backend = "partial_dtensor"``,
``checkpoint.initial_load_model_only = False`` (TorchTitan's default ``True``
only matters with an ``initial_load_path`` and warns on every run without one;
the TOML front end sets it back to ``True`` when a file gives an initial load
without it; on the native command line pass both),
``training.disable_cuda_graphs = True`` (a replayed graph would skip the
Python-side CP byte counters), ``parallelism.context_parallel_load_balancer =
None`` (TorchTitan then hands CP rank r the contiguous segment r, which is
``cp_layout = "contiguous"``; ``"headtail"`` is exactly ``"zigzag"``, see
:func:`titan_cp.validate.load_balancer_for_layout`), the shipped tokenizer/corpus and
:class:`titan_cp.metrics.TitanCPMetricsProcessor` and
:class:`titan_cp.checkpoint.VerifiedCheckpointManager` (checksum manifests).

Importing this module applies :func:`titan_cp.compat.apply` (so the native
entry point runs on CPU too) and registers the shipped dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from titan_cp import compat
from titan_cp.checkpoint import VerifiedCheckpointManager
from titan_cp.data import TOKENIZER_PATH, VALIDATION_STEPS, register_datasets, tiny_corpus_config, validation_config
from titan_cp.errors import ConfigError, unknown_choice_message
from titan_cp.metrics import TitanCPMetricsProcessor
from titan_cp.run_logging import rank_zero_logging
from titan_cp.validate import load_balancer_for_layout

compat.apply()
rank_zero_logging()
register_datasets()

def model_spec(flavor: str, **overrides) -> ModelSpec:
    """The ``ModelSpec`` of a GDN flavor (``titan_cp.model.FLAVORS``) with model-field overrides."""
    from torchtitan.distributed.pipeline_parallel import pipeline_llm

    from titan_cp.hf.adapter import FLAStateDictAdapter
    from titan_cp.model import model_config
    from titan_cp.parallelize import parallelize_gdn

    return ModelSpec(
        name="gdn",
        flavor=flavor,
        model=model_config(flavor, **overrides),
        parallelize_fn=parallelize_gdn,
        pipelining_fn=pipeline_llm,  # TorchTitan's decoder split + schedules; checks: titan_cp/pipeline.py
        post_optimizer_build_fn=None,
        state_dict_adapter=FLAStateDictAdapter,  # checkpoint.initial_load_in_hf / last_save_in_hf: FLA's format
    )


def _config(
    spec: ModelSpec,
    *,
    training: TrainingConfig,
    lr: float,
    warmup_steps: int,
    optimizer_impl: str,
    checkpoint_interval: int,
    log_freq: int,
    activation_checkpoint=None,
) -> Trainer.Config:
    optimizer = default_adamw(lr=lr)
    optimizer.implementation = optimizer_impl
    layout = getattr(spec.model, "cp_layout", "contiguous")
    config = Trainer.Config(
        model_spec=spec,
        hf_assets_path=str(TOKENIZER_PATH),
        dump_folder="./outputs",
        loss=CrossEntropyLoss.Config(global_vocab_size=spec.model.vocab_size),
        optimizer=optimizer,
        lr_scheduler=LRSchedulersContainer.Config(
            warmup_steps=warmup_steps, decay_ratio=0.8, decay_type="linear", min_lr_factor=0.1
        ),
        training=training,
        dataloader=tiny_corpus_config(),
        metrics=TitanCPMetricsProcessor.Config(log_freq=log_freq),
        parallelism=ParallelismConfig(
            spmd_backend="partial_dtensor",
            context_parallel_load_balancer=load_balancer_for_layout(layout),
        ),
        checkpoint=VerifiedCheckpointManager.Config(
            interval=checkpoint_interval, last_save_model_only=False, initial_load_model_only=False
        ),
        activation_checkpoint=activation_checkpoint,
        compile=CompileConfig(enable=False),
    )
    # --validator.enable: loss on the shipped held-out documents, no network (TorchTitan's default is c4).
    config.validator.enable = False
    config.validator.dataloader = validation_config()
    config.validator.steps = VALIDATION_STEPS
    return config


def _cpu_training(**kw) -> TrainingConfig:
    base = {"local_batch_size": 4, "seq_len": 512, "steps": 20, "disable_cuda_graphs": True, "dtype": "float32",
                "mixed_precision_param": "float32"}
    base.update(kw)
    return TrainingConfig(**base)


def _gpu_training(**kw) -> TrainingConfig:
    # fp32 master weights, bf16 compute through FSDP's MixedPrecisionPolicy
    # (training.mixed_precision_param), fp32 gradient reduction.
    base = {"local_batch_size": 1, "seq_len": 65536, "steps": 10000, "disable_cuda_graphs": True, "dtype": "float32",
                "mixed_precision_param": "bfloat16", "max_norm": 1.0}
    base.update(kw)
    return TrainingConfig(**base)


def _cpu_config(flavor: str) -> Trainer.Config:
    """A short CPU run of ``flavor``: torch kernel, 512 tokens, shipped corpus."""
    return _config(
        model_spec(flavor),
        training=_cpu_training(),
        lr=3e-3,
        warmup_steps=2,
        optimizer_impl="foreach",
        checkpoint_interval=10,
        log_freq=1,
    )


def gdn_debug() -> Trainer.Config:
    """Tiny GDN for CPU (torch kernel, 512 tokens, shipped corpus): the default CPU run."""
    return _cpu_config("debug")


def gdn_debug_hybrid() -> Trainer.Config:
    """Tiny GDN + softmax-attention hybrid for CPU."""
    return _cpu_config("debug_hybrid")


def _gpu_config(flavor: str, lr: float) -> Trainer.Config:
    """A long GPU run of ``flavor``: triton kernel, 64K tokens per sequence, full AC."""
    return _config(
        model_spec(flavor, kernel="triton"),
        training=_gpu_training(steps=20000),
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

    from titan_cp.hf.config import model_fields_from_hf, read_hf_config

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


@dataclass(frozen=True)
class ModelFamily:
    """One ``[model] name``: its flavors and the ``Trainer.Config`` each starts from.

    ``config_for_flavor(flavor)`` is called with a flavor from ``flavors`` only
    (the front end rejects others, naming ``model.flavor``); ``[model]`` keys
    other than ``name``/``flavor`` then set fields of the returned
    ``config.model_spec.model``.
    """

    config_for_flavor: Callable[[str], Trainer.Config]
    flavors: Sequence[str]
    default_flavor: str


def _gdn_flavors() -> tuple[str, ...]:
    from titan_cp.model import FLAVORS

    return FLAVORS


def _qwen3_5_config_for_flavor(flavor: str) -> Trainer.Config:
    from titan_cp.qwen3_5.configs import config_for_flavor as qwen3_5_config_for_flavor

    return qwen3_5_config_for_flavor(flavor)


# TorchTitan's qwen3_5_configs names (kept here so importing the registry does not import FLA).
QWEN3_5_FLAVORS = ("debugmodel", "debugmodel_moe", "0.8B", "2B", "4B", "9B", "27B", "35B-A3B", "122B-A10B",
                   "397B-A17B")

# [model] name -> its family. THE place a new model plugs into the TOML front end.
MODEL_FAMILIES: dict[str, ModelFamily] = {
    "gdn": ModelFamily(config_for_flavor=config_for_flavor, flavors=_gdn_flavors(), default_flavor="debug"),
    "qwen3_5": ModelFamily(config_for_flavor=_qwen3_5_config_for_flavor, flavors=QWEN3_5_FLAVORS,
                           default_flavor="debugmodel"),
}

# Qwen3.5 config functions (``--module titan_cp --config qwen3_5_debug``), imported on first use.
QWEN3_5_CONFIGS = ("qwen3_5_debug", "qwen3_5_2b_128k", "qwen3_5_9b_256k")


def __getattr__(name: str):
    if name in QWEN3_5_CONFIGS:
        from titan_cp.qwen3_5 import configs

        return getattr(configs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_model_family(name: str, family: ModelFamily) -> None:
    """Add (or replace) the family behind ``[model] name = "<name>"``."""
    MODEL_FAMILIES[name] = family


def family_config(name: str, flavor: str | None = None) -> Trainer.Config:
    """The starting ``Trainer.Config`` of ``[model] name`` / ``flavor`` (the family's default flavor if None)."""
    if name not in MODEL_FAMILIES:
        raise ConfigError(unknown_choice_message("model.name", name, MODEL_FAMILIES))
    family = MODEL_FAMILIES[name]
    flavor = family.default_flavor if flavor is None else flavor
    if flavor not in family.flavors:
        raise ConfigError(unknown_choice_message("model.flavor", flavor, family.flavors)
                          + f" (flavors of model.name = {name!r})")
    return family.config_for_flavor(flavor)


__all__ = [
    *QWEN3_5_CONFIGS,
    "CONFIG_FOR_FLAVOR",
    "MODEL_FAMILIES",
    "config_for_flavor",
    "family_config",
    "gdn_1_3b",
    "gdn_1_3b_hybrid",
    "gdn_340m",
    "gdn_debug",
    "gdn_debug_hybrid",
    "gdn_from_hf",
    "model_spec",
    "ModelFamily",
    "register_model_family",
]
