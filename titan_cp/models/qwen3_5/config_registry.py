"""Qwen3.5 ModelSpec and TorchTitan config functions (``--module titan_cp.models.qwen3_5 --config qwen3_5_debug``).

    torchrun --nproc_per_node=2 -m torchtitan.train --module titan_cp.models.qwen3_5 --config qwen3_5_debug \\
        --parallelism.context_parallel_degree 2

or TOML (``[model] name = "qwen3_5"``, ``flavor = ...``; train_configs/qwen3_5_*.toml).
Everything but the model comes from titan_cp's shared defaults
(:func:`titan_cp.config_registry._config`): partial_dtensor, the CP load
balancer of the layout, titan_cp's metrics and verified checkpoints.

GPU fine-tuning configs start from a Hugging Face checkpoint directory
(``hf_assets_path`` = ``checkpoint.initial_load_path`` = where ``hf download
Qwen/Qwen3.5-2B --local-dir /models/Qwen3.5-2B`` put it: tokenizer,
config.json and weights; TorchTitan wants an absolute path) and save HF
safetensors at the end (``checkpoint.last_save_in_hf``).
"""

from __future__ import annotations

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.distributed.activation_checkpoint import FullAC
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from titan_cp.cp.settings import load_balancer_for_layout
from titan_cp.models.qwen3_5.flavors import FLAVORS
from titan_cp.train.job_defaults import cpu_training, gpu_training, trainer_config

# The shipped tokenizer has 1016 tokens: the CPU debug model uses a 1024-token vocabulary
# and 4 layers (3 Gated DeltaNet + 1 gated attention) of TorchTitan's debugmodel.
DEBUG_SHAPE = {"vocab_size": 1024, "n_layers": 4}


def model_spec(flavor: str = "debugmodel", *, kernel: str = "torch", cp_layout: str = "contiguous",
               cp_exchange: str = "allgather", with_vision: bool = False, **shape) -> ModelSpec:
    """TorchTitan's Qwen3.5 ``flavor`` (with :class:`~titan_cp.models.qwen3_5.flavors.TextShape` overrides) on titan_cp."""
    from torchtitan.components.optimizer import register_moe_load_balancing_hook
    from torchtitan.distributed.pipeline_parallel import pipeline_vlm

    from titan_cp.models.common.pipeline import with_exact_moe_counts
    from titan_cp.models.qwen3_5.state_dict_adapter import Qwen35CPStateDictAdapter
    from titan_cp.models.qwen3_5.flavors import torchtitan_config
    from titan_cp.models.qwen3_5.model import titan_cp_config
    from titan_cp.models.qwen3_5.parallelize import parallelize_qwen3_5_cp

    model = titan_cp_config(torchtitan_config(flavor, **shape), kernel=kernel, cp_layout=cp_layout,
                            cp_exchange=cp_exchange, with_vision=with_vision)
    return ModelSpec(
        name="qwen3_5",
        flavor=flavor,
        model=model,
        parallelize_fn=parallelize_qwen3_5_cp,
        pipelining_fn=with_exact_moe_counts(pipeline_vlm),  # TorchTitan's (as its Qwen3.5 spec): models/common/pipeline.py
        post_optimizer_build_fn=register_moe_load_balancing_hook,
        state_dict_adapter=Qwen35CPStateDictAdapter,
    )


def qwen3_5_debug() -> Trainer.Config:
    """TorchTitan's Qwen3.5 debugmodel (4 layers, vocab 1024) on CPU: torch kernel, 512 tokens, shipped corpus."""
    return trainer_config(model_spec("debugmodel", **DEBUG_SHAPE), training=cpu_training(), lr=3e-3, warmup_steps=2,
                   optimizer_impl="foreach", checkpoint_interval=10, log_freq=1)


def qwen3_5_moe_debug() -> Trainer.Config:
    """TorchTitan's debugmodel_moe (4 layers, vocab 1024; 8 experts top-2 + shared) on CPU, as qwen3_5_debug."""
    return trainer_config(model_spec("debugmodel_moe", **DEBUG_SHAPE), training=cpu_training(), lr=3e-3,
                          warmup_steps=2, optimizer_impl="foreach", checkpoint_interval=10, log_freq=1)


def _finetune(flavor: str, *, seq_len: int, cp: int, tp: int, lr: float = 1e-5) -> Trainer.Config:
    """Long-context fine-tuning of an HF Qwen3.5 checkpoint on GPUs: triton kernel, zigzag CP, full AC."""
    spec = model_spec(flavor, kernel="triton", cp_layout="zigzag")
    config = trainer_config(spec, training=gpu_training(seq_len=seq_len, steps=2000), lr=lr, warmup_steps=50,
                     optimizer_impl="fused", checkpoint_interval=500, log_freq=10,
                     activation_checkpoint=FullAC.Config())
    hf_dir = f"/models/Qwen3.5-{flavor}"
    config.hf_assets_path = hf_dir
    config.checkpoint.initial_load_path = hf_dir
    config.checkpoint.initial_load_in_hf = True
    config.checkpoint.initial_load_model_only = True
    config.checkpoint.last_save_in_hf = True
    config.checkpoint.last_save_model_only = True
    config.parallelism.context_parallel_degree = cp
    config.parallelism.tensor_parallel_degree = tp
    config.parallelism.context_parallel_load_balancer = load_balancer_for_layout("zigzag")
    return config


def qwen3_5_2b_128k() -> Trainer.Config:
    """Fine-tune Qwen3.5-2B at 128K tokens per sequence with CP 8 (8 GPUs)."""
    return _finetune("2B", seq_len=131072, cp=8, tp=1)


def qwen3_5_9b_256k() -> Trainer.Config:
    """Fine-tune Qwen3.5-9B at 256K tokens per sequence with CP 8 x TP 2 (16 GPUs)."""
    return _finetune("9B", seq_len=262144, cp=8, tp=2)


DEFAULT_FLAVOR = "debugmodel"


def config_for_flavor(flavor: str) -> Trainer.Config:
    """The starting config of ``[model] name = "qwen3_5"``, ``flavor``."""
    named = {"debugmodel": qwen3_5_debug, "debugmodel_moe": qwen3_5_moe_debug, "2B": qwen3_5_2b_128k, "9B": qwen3_5_9b_256k}
    if flavor in named:
        return named[flavor]()
    config = qwen3_5_2b_128k()
    config.model_spec = model_spec(flavor, kernel="triton", cp_layout="zigzag")
    config.loss = CrossEntropyLoss.Config(global_vocab_size=config.model_spec.model.vocab_size)
    config.hf_assets_path = config.checkpoint.initial_load_path = f"/models/Qwen3.5-{flavor}"
    return config


__all__ = ["DEFAULT_FLAVOR", "FLAVORS", "config_for_flavor", "model_spec", "qwen3_5_2b_128k", "qwen3_5_9b_256k",
           "qwen3_5_debug", "qwen3_5_moe_debug"]
