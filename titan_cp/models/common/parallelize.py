"""What every titan_cp decoder's ``parallelize_fn`` does: CP -> TP -> AC -> compile -> FSDP/HSDP on one DeviceMesh.

The mesh comes from TorchTitan's ParallelDims: ``tp`` (tensor parallel),
``cp`` (context parallel) and ``fsdp`` (= dp_shard x cp: CP ranks hold the
same weights, so FSDP shards over them too and reduces their gradients);
with ``dp_replicate`` > 1, HSDP over ``["dp_replicate", "fsdp"]``
(:func:`apply_fsdp`). Under pipeline parallelism TorchTitan calls this once
per stage (``titan_cp.models.common.pipeline``); a stage may lack
``tok_embeddings``, ``norm`` or ``lm_head``.

Under CP every sequence-mixing layer gets a
:class:`~titan_cp.cp.context.CPContext` on the ``cp`` mesh dim
(:func:`apply_cp`): linear-attention layers pass chunk states
(cp/state_passing.py) or go head-parallel (cp/head_parallel.py); attention
layers run ring attention. TorchTitan's own SDPA context parallelism is never
applied. A sequence-mixing module titan_cp does not know makes the run refuse
to start (never silently without CP). Each family supplies only its TP plan
(``apply_tp_fn``), e.g. ``titan_cp.models.gdn.parallelize.apply_tp``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import distribute_tensor

from titan_cp.cp.context import CPContext

# Module types that mix tokens along the sequence; titan_cp's own mixers say so with `mixes_sequence`.
_FOREIGN_SEQUENCE_MIXERS: tuple[type, ...] = (nn.Conv1d, nn.MultiheadAttention, nn.RNNBase)


def _foreign_mixer_types() -> tuple[type, ...]:
    types = _FOREIGN_SEQUENCE_MIXERS
    try:  # TorchTitan's attention modules (their CP is SDPA-only and not applied here)
        from torchtitan.models.common.attention import BaseAttention

        types = types + (BaseAttention,)
    except ImportError:
        pass
    return types


def apply_cp(model: nn.Module, cp: CPContext | None) -> None:
    """Give every sequence-mixing layer the CP context; refuse layers that cannot use it."""
    model.cp = cp
    unaware = []
    foreign = _foreign_mixer_types()
    for name, module in model.named_modules():
        if getattr(module, "mixes_sequence", False):
            module.cp = cp
        elif cp is not None and cp.size > 1 and isinstance(module, foreign):
            unaware.append(f"'{name}' ({type(module).__name__})")
    if unaware:
        raise ValueError(
            f"parallelism.context_parallel_degree = {cp.size} but these layers mix tokens along the "
            f"sequence and are not CP-aware: {', '.join(unaware)}. They would silently see only this "
            "rank's shard. Use titan_cp's GatedDeltaNet / Attention layers, or set "
            "context_parallel_degree = 1."
        )


def shard_param(module: nn.Module, name: str, mesh: DeviceMesh, placement) -> None:
    param = getattr(module, name)
    module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [placement])))
    for attr in ("_no_weight_decay",):
        if hasattr(param, attr):
            setattr(getattr(module, name), attr, getattr(param, attr))


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block; sequence mixing (kernels + CP communication) runs eagerly.

    ``mix_sequence`` and ``ring_attention`` are ``torch.compiler.disable``-d, so
    a block compiles into token-local graphs around them instead of failing.
    """
    for layer_id, block in model.layers.named_children():
        model.layers.register_module(layer_id, torch.compile(block, backend=backend, fullgraph=False))


def fsdp_mesh(parallel_dims) -> DeviceMesh:
    """The data-parallel mesh FSDP shards over: ``fsdp`` (= dp_shard x cp), or HSDP's
    ``["dp_replicate", "fsdp"]`` (replicas all-reduce, shards reduce-scatter), as TorchTitan's llama3/qwen3_5."""
    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    return parallel_dims.get_mesh(names)


def apply_fsdp(model: nn.Module, *, parallel_dims, training, parallelism) -> None:
    """FSDP2 (HSDP when dp_replicate > 1) over :func:`fsdp_mesh` with TorchTitan's decoder wrapping.

    Always applied, as TorchTitan does: with a mesh of size 1 it only installs
    the mixed-precision policy. Under expert parallel the routed experts shard
    over ``efsdp`` (= dp_shard x cp x tp / ep; HSDP adds ``dp_replicate``), as
    TorchTitan's ``parallelize_qwen3_5``. Works on a pipeline stage (``tok_embeddings``,
    ``norm``, ``lm_head`` may be None). On gloo (CPU) FSDP's PREMUL_SUM reduce
    becomes a plain SUM (:mod:`titan_cp.components.compat` item 5).
    """
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

    apply_fsdp_to_decoder(
        model,
        fsdp_mesh(parallel_dims),
        param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        pp_enabled=parallel_dims.pp_enabled,
        cpu_offload=training.enable_cpu_offload,
        reshard_after_forward_policy=parallelism.fsdp_reshard_after_forward,
        enable_symm_mem=getattr(parallelism, "enable_fsdp_symm_mem", False),
        **_expert_fsdp(parallel_dims),
    )


def _expert_fsdp(parallel_dims) -> dict:
    if not parallel_dims.ep_enabled:
        return {}
    names = ["dp_replicate", "efsdp"] if parallel_dims.dp_replicate_enabled else ["efsdp"]
    return {"ep_degree": parallel_dims.ep, "edp_mesh": parallel_dims.get_optional_mesh(names)}


def parallelize_decoder(
    model: nn.Module,
    *,
    apply_tp_fn,
    parallel_dims,
    training,
    parallelism,
    compile_config,
    ac_config,
    dump_folder: str,
):
    """CP -> TP (``apply_tp_fn(model, tp_mesh)``) -> AC -> compile -> FSDP/HSDP, for any titan_cp decoder.

    The model config carries ``cp_layout`` / ``cp_exchange`` / ``cp_q_transition``; its sequence
    mixers carry ``mixes_sequence`` (:func:`apply_cp`).
    """
    cp = None
    if parallel_dims.cp_enabled:
        cp = CPContext(
            group=parallel_dims.get_mesh("cp").get_group(),
            layout=model.config.cp_layout,
            exchange=model.config.cp_exchange,
            q_transition=model.config.cp_q_transition,
        )
    apply_cp(model, cp)
    if parallel_dims.tp_enabled:
        apply_tp_fn(model, parallel_dims.get_mesh("tp"))
    if ac_config is not None:
        ac_config.build(dump_folder=dump_folder).apply(model)
    if compile_config is not None and compile_config.enable and "model" in compile_config.components:
        apply_compile(model, compile_config.backend)
    apply_fsdp(model, parallel_dims=parallel_dims, training=training, parallelism=parallelism)
    return model
