"""The ``Trainer.Config`` every titan_cp family starts from, and what a titan_cp process needs first.

Defaults shared by all families and flavors (reasons in :mod:`titan_cp.components.compat`):
``parallelism.spmd_backend = "partial_dtensor"``,
``checkpoint.initial_load_model_only = False`` (TorchTitan's default ``True``
only matters with an ``initial_load_path`` and warns on every run without one;
the TOML front end sets it back to ``True`` when a file gives an initial load
without it; on the native command line pass both),
``training.disable_cuda_graphs = True`` (a replayed graph would skip the
Python-side CP byte counters), ``parallelism.context_parallel_load_balancer``
from the model's ``cp_layout`` (:func:`titan_cp.cp.settings.load_balancer_for_layout`:
``None`` gives CP rank r the contiguous segment r, ``"headtail"`` is exactly ``"zigzag"``),
the shipped tokenizer/corpus, :class:`titan_cp.components.metrics.TitanCPMetricsProcessor`
and :class:`titan_cp.components.checkpoint_integrity.VerifiedCheckpointManager` (checksum manifests).

:func:`prepare_process` applies the CPU workarounds (:func:`titan_cp.components.compat.apply`),
rank-0 logging and registers the shipped datasets; :func:`trainer_config` calls it, so
building any titan_cp config (TorchTitan's native ``--module ... --config ...`` or the TOML
front end) prepares the process, and importing a config module does nothing.
"""

from __future__ import annotations

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from titan_cp.components import compat
from titan_cp.components.checkpoint_integrity import VerifiedCheckpointManager
from titan_cp.components.data import TOKENIZER_PATH, VALIDATION_STEPS, register_datasets, tiny_corpus_config, validation_config
from titan_cp.components.metrics import TitanCPMetricsProcessor
from titan_cp.components.run_logging import rank_zero_logging
from titan_cp.cp.settings import load_balancer_for_layout


def prepare_process() -> None:
    """CPU workarounds, rank-0 logging, the shipped datasets: once per process, idempotent."""
    compat.apply()
    rank_zero_logging()
    register_datasets()


def trainer_config(
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
    prepare_process()
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


def cpu_training(**kw) -> TrainingConfig:
    base = {"local_batch_size": 4, "seq_len": 512, "steps": 20, "disable_cuda_graphs": True, "dtype": "float32",
                "mixed_precision_param": "float32"}
    base.update(kw)
    return TrainingConfig(**base)


def gpu_training(**kw) -> TrainingConfig:
    # fp32 master weights, bf16 compute through FSDP's MixedPrecisionPolicy
    # (training.mixed_precision_param), fp32 gradient reduction.
    base = {"local_batch_size": 1, "seq_len": 65536, "steps": 10000, "disable_cuda_graphs": True, "dtype": "float32",
                "mixed_precision_param": "bfloat16", "max_norm": 1.0}
    base.update(kw)
    return TrainingConfig(**base)
