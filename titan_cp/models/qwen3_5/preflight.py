"""Qwen3.5's own start-up checks; titan_cp.models.common.preflight runs them with the shared ones.

The shared rules (degrees, kernel / exchange / layout names, load balancer,
seq_len, paths) live in :mod:`titan_cp.models.common.preflight`; it calls
``Qwen35CPModel.Config.check_job`` (:func:`check_job` here) for what only
this model knows: its head counts, text only under CP, MoE (EP, expert TP, TP x EP; no PP yet), SP and the
HF checkpoint's ``config.json``. Every message names the field and a fix.
"""

from __future__ import annotations

import json
import os

from titan_cp.errors import ConfigError, unknown_choice_message


def check_layout(model, parallelism) -> None:
    """Heads divisible by TP (GDN heads by TP x CP for alltoall); text only under CP.

    Pipeline parallel (TorchTitan's ``pipeline_vlm``) is checked with the GDN LM's rules in
    :func:`titan_cp.models.common.pipeline.check_pipeline_parallel` (schedule, stage split, microbatches).
    """
    from titan_cp.models.qwen3_5.flavors import shape_of

    tp, cp = parallelism.tensor_parallel_degree, parallelism.context_parallel_degree
    shape = shape_of(model)
    heads = {"linear_num_key_heads": shape.n_key_heads, "linear_num_value_heads": shape.n_value_heads,
             "num_attention_heads": shape.n_heads, "num_key_value_heads": shape.n_kv_heads}
    for name, count in heads.items():
        if count % tp:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree = {tp} does not divide the model's {name} = {count}; "
                f"TP shards heads, so pick a TP degree that divides {count}."
            )
        if model.cp_exchange == "alltoall" and cp > 1 and name.startswith("linear") and count % (tp * cp):
            raise ConfigError(
                f"parallelism.cp_exchange = 'alltoall' needs TP x CP = {tp * cp} to divide {name} = {count}; "
                "use cp_exchange = 'allgather' or 'logscan'."
            )
    if cp > 1 and model.with_vision:
        raise ConfigError(
            f"parallelism.context_parallel_degree = {cp} with model.with_vision = true: Qwen3.5 under CP "
            "is text only (vision tokens would need scattering before the sequence is sharded). "
            "Set model.with_vision = false, or context_parallel_degree = 1."
        )


def check_moe(model, parallelism) -> None:
    """MoE flavors: expert parallel (TorchTitan's, beside CP and TP: EP borrows dp_shard x cp x tp ranks) or,
    without EP, TP-sharded experts."""
    from titan_cp.models.qwen3_5.moe import EXPERT_COMPUTE

    if model.expert_compute not in EXPERT_COMPUTE:
        raise ConfigError(unknown_choice_message("model.expert_compute", model.expert_compute, EXPERT_COMPUTE))
    moe = [layer.moe for layer in model.layers if getattr(layer, "moe", None) is not None]
    if not moe:
        return
    tp, ep = parallelism.tensor_parallel_degree, parallelism.expert_parallel_degree
    dp_shard, cp = parallelism.data_parallel_shard_degree, parallelism.context_parallel_degree
    if ep > 1 and dp_shard > 0 and (dp_shard * cp * tp) % ep:
        raise ConfigError(
            f"parallelism.expert_parallel_degree = {ep} does not divide data_parallel_shard_degree x "
            f"context_parallel_degree x tensor_parallel_degree = {dp_shard} x {cp} x {tp}: TorchTitan's EP "
            "borrows its ranks from those (efsdp = dp_shard x cp x tp / ep). Pick an EP degree that divides "
            f"{dp_shard * cp * tp}."
        )
    num_experts = moe[0].num_experts
    if ep > 1 and num_experts % ep:
        raise ConfigError(
            f"parallelism.expert_parallel_degree = {ep} does not divide the flavor's {num_experts} routed "
            "experts; pick a degree that divides it."
        )


def check_hf_checkpoint(model, path: str) -> None:
    """The checkpoint's ``config.json`` (if any) must describe the flavor's shape; else name the field."""
    from titan_cp.models.qwen3_5.flavors import shape_differences, shape_of

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return
    with open(config_path) as f:
        hf_config = json.load(f)
    diffs = shape_differences(shape_of(model), hf_config)
    if diffs:
        raise ConfigError(
            f"checkpoint.initial_load_path = {path!r} does not match model.flavor: "
            + "; ".join(diffs)
            + ". Pick the flavor of this checkpoint (or the shape overrides that match it)."
        )


def check_sequence_parallel(parallelism, seq_len: int) -> None:
    """TP with ``enable_sequence_parallel`` splits each rank's sequence over TP: it must divide evenly.

    (Under CP, :mod:`titan_cp.models.common.preflight` checks seq_len against 2 x cp x tp.)
    """
    tp, cp = parallelism.tensor_parallel_degree, parallelism.context_parallel_degree
    if tp > 1 and cp <= 1 and parallelism.enable_sequence_parallel and seq_len % tp:
        raise ConfigError(
            f"training.seq_len = {seq_len} is not divisible by parallelism.tensor_parallel_degree = {tp}: "
            "sequence parallelism splits the sequence over TP. Use a multiple of "
            f"{tp} (e.g. {(seq_len // tp + 1) * tp}) or set parallelism.enable_sequence_parallel = false."
        )


def check_moe_tokens_split(model, parallelism, seq_len: int) -> None:
    """TP x EP splits each CP rank's seq_len / cp tokens over TP inside every MoE block: it must divide evenly."""
    tp, ep, cp = (parallelism.tensor_parallel_degree, parallelism.expert_parallel_degree,
                  parallelism.context_parallel_degree)
    has_moe = any(getattr(layer, "moe", None) is not None for layer in model.layers)
    step = cp * tp
    if has_moe and tp > 1 and ep > 1 and seq_len % step:
        raise ConfigError(
            f"training.seq_len = {seq_len} is not divisible by parallelism.context_parallel_degree x "
            f"tensor_parallel_degree = {cp} x {tp}: under TP x EP each TP rank routes 1/{tp} of its CP rank's "
            f"tokens (TorchTitan's MoE layout). Use a multiple of {step} (e.g. {(seq_len // step + 1) * step}) "
            "or set expert_parallel_degree = 1 (experts TP-sharded, every TP rank routes all tokens)."
        )


def check_job(model, config) -> None:
    """Everything above against a TorchTitan ``Trainer.Config`` (no process group needed)."""
    check_layout(model, config.parallelism)
    check_sequence_parallel(config.parallelism, config.training.seq_len)
    check_moe(model, config.parallelism)
    check_moe_tokens_split(model, config.parallelism, config.training.seq_len)
    checkpoint = config.checkpoint
    if checkpoint.initial_load_path and checkpoint.initial_load_in_hf:
        check_hf_checkpoint(model, checkpoint.initial_load_path)
