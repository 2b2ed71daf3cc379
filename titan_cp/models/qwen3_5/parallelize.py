"""parallelize_qwen3_5_cp: CP + TP (with or without SP) + AC + compile + FSDP/HSDP for Qwen35CPModel.

TP places every parameter where TorchTitan's ``qwen3_5/sharding.py`` does
(heads sharded, nothing else), with torch's classic TP styles:

    tok_embeddings            vocab-sharded (TorchTitan's Embedding: masked local lookup, then an
                              all-reduce over TP)        lm_head  colwise, logits gathered
    GatedDeltaNet  in_proj_q/k/v/z/a/b colwise (H/t key heads, Hv/t value heads)
                   conv_q/k/v.weight, A_log, dt_bias  Shard(0)   out_proj rowwise
                   norm (RMSNormGated, per head)  weight Replicate, runs on Shard(2) heads
    attention      wq (query + gate per head), wk, wv colwise   wo rowwise
                   q_norm / k_norm weight Replicate, run on Shard(2) heads
    feed_forward   w1 / w3 colwise, w2 rowwise
    MoE, no EP     experts TP-sharded on their hidden dim (titan_cp.models.qwen3_5.moe.apply_expert_tp)
    MoE, EP        TorchTitan's TP x EP: experts sharded over ``ep`` only (whole experts, not
                   TP-sharded), the CP shard's tokens split over TP inside the block (apply_moe_tp_ep)
    block / final norms  weight Replicate

``parallelism.enable_sequence_parallel`` (TorchTitan's field, default on) picks
the residual stream's layout over TP. Off: replicated [B, T, D] (T = this CP
rank's shard), rowwise outputs all-reduced. On (TorchTitan's SP): Shard(1),
each TP rank holds [B, T/tp, D]; the norms run on their piece, every sequence
mixer and FFN / MoE all-gathers the CP shard on entry (so CP state passing and
the conv halo see the whole shard) and reduce-scatters its output; the
replicated embeddings are split before layer 0, as TorchTitan's Qwen3.5 does.
On a later pipeline stage the incoming pieces [B, T/tp, D] are all-gathered on
entry (the stage derives its tokens' sequence positions from the CP shard) and
split again before the stage's first layer.

Norms take their piece as a ``Shard(1)`` / ``Shard(2)`` DTensor, so the
gradient of their shared weight is summed over TP by DTensor itself.
CP, AC, compile and FSDP / HSDP are titan_cp's shared
:func:`~titan_cp.models.gdn.parallelize.parallelize_decoder` (every sequence mixer gets
a CPContext; FSDP shards over ``fsdp`` = dp_shard x cp, HSDP adds
``dp_replicate``, as TorchTitan's ``parallelize_qwen3_5``).
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from titan_cp.models.common.parallelize import fsdp_mesh, parallelize_decoder, shard_param
from titan_cp.models.qwen3_5.moe import _replicated_linear, apply_ep, apply_expert_tp


def _norm_on(placement, n_inputs: int = 1) -> PrepareModuleInputOutput:
    """Run a norm on DTensor inputs of ``placement`` and hand back local tensors."""
    layouts = (placement,) * n_inputs
    return PrepareModuleInputOutput(
        input_layouts=layouts, desired_input_layouts=layouts,
        output_layouts=placement, desired_output_layouts=placement, use_local_output=True,
    )


def _replicated_norm(norm: nn.Module, tp_mesh: DeviceMesh, placement, n_inputs: int = 1) -> None:
    shard_param(norm, "weight", tp_mesh, Replicate())
    parallelize_module(norm, tp_mesh, _norm_on(placement, n_inputs))


def _gather_input(n_inputs: int = 1) -> PrepareModuleInput:
    """SP: the sequence-sharded input [B, T/tp, D] is all-gathered over TP (backward: reduce-scatter)."""
    return PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * (n_inputs - 1),
                              desired_input_layouts=(Replicate(),) + (None,) * (n_inputs - 1),
                              use_local_output=True)


def apply_moe_tp_ep(moe: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """TorchTitan 0.3.0's MoE block under TP x EP (its ``moe_sharding.py`` with EP on), beside CP.

    The block's tokens are this CP rank's shard [B, T, D]; inside the block each
    TP rank keeps its piece [B, T/tp, D] (SP: the residual stream already is that
    piece; no SP: the replicated input is split, the output all-gathered back)::

        router      gate weight Replicate, on this rank's T/tp tokens (its gradient summed over TP)
        routed      whole experts, Shard(0) over ``ep`` (apply_ep); the tokens go to their
                    experts' owners by the all-to-all over ``ep`` (which spans TP ranks), so
                    every token meets the one-rank arithmetic
        shared      all-gathers the T/tp pieces, w1 / w3 colwise, w2 rowwise reduce-scattered
                    back to T/tp; its sigmoid gate replicated, its output cut to T/tp

    Each TP rank counts only the tokens it routed; TorchTitan's load-balancing hook
    sums ``tokens_per_expert_E`` over ``tp`` (it does so exactly when EP and TP are
    both on) and then over ``loss`` (dp x cp), which gives one rank's counts.
    """
    if not sequence_parallel:  # replicated [B, T, D] -> [B, T/tp, D] in; the output all-gathered back
        parallelize_module(moe, tp_mesh, PrepareModuleInputOutput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_input=True,
            output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),), use_local_output=True))
    _replicated_norm(moe.router.gate, tp_mesh, Shard(1))  # a replicated weight on sequence pieces, like a norm
    shared = moe.shared_experts
    if shared is not None:
        parallelize_module(shared, tp_mesh, _gather_input())
        parallelize_module(shared, tp_mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(),
                                             "w2": RowwiseParallel(output_layouts=Shard(1))})
        if getattr(shared, "gate", None) is not None:
            _replicated_linear(shared.gate, tp_mesh, Shard(1))


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = False,
             expert_parallel: bool = False) -> None:
    """The TP layout of the module docstring (``sequence_parallel``: the SP column; ``expert_parallel``:
    MoE blocks take TorchTitan's TP x EP layout, :func:`apply_moe_tp_ep`). Works on a pipeline stage."""
    seq = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout over TP
    embeddings = model.tok_embeddings
    if embeddings is not None:
        shard_param(embeddings, "weight", tp_mesh, Shard(0))
        embeddings.tp_group = tp_mesh.get_group()  # its vocab-parallel forward
        parallelize_module(embeddings, tp_mesh, PrepareModuleOutput(
            output_layouts=Partial(), desired_output_layouts=Replicate(), use_local_output=True))
    if model.lm_head is not None:
        parallelize_module(model, tp_mesh, {"lm_head": ColwiseParallel(input_layouts=seq,
                                                                       output_layouts=Replicate())})
    if sequence_parallel and embeddings is None:  # a later pipeline stage: the previous stage's pieces gathered
        parallelize_module(model, tp_mesh, _gather_input())  # (the stage's sequence facts read the CP shard)
    first_layer = next(iter(model.layers), None)
    for layer_id, block in model.layers.items():
        if sequence_parallel and layer_id == first_layer:  # replicated stream -> this rank's sequence piece
            parallelize_module(block, tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(), None), desired_input_layouts=(Shard(1), None), use_local_output=True))
        mixer = block.attn
        if block.full_attn:
            plan = {name: ColwiseParallel() for name in ("wq", "wk", "wv")}
            plan["wo"] = RowwiseParallel(output_layouts=seq)
            for norm in (mixer.q_norm, mixer.k_norm):
                _replicated_norm(norm, tp_mesh, Shard(2))
        else:
            names = ("in_proj_q", "in_proj_k", "in_proj_v", "in_proj_z", "in_proj_a", "in_proj_b")
            plan = {name: ColwiseParallel() for name in names} | {"out_proj": RowwiseParallel(output_layouts=seq)}
            for conv in (mixer.conv_q, mixer.conv_k, mixer.conv_v):
                shard_param(conv, "weight", tp_mesh, Shard(0))
            for name in ("A_log", "dt_bias"):
                shard_param(mixer, name, tp_mesh, Shard(0))
            _replicated_norm(mixer.norm, tp_mesh, Shard(2), n_inputs=2)
        parallelize_module(mixer, tp_mesh, plan)
        if sequence_parallel:  # the sequence mixer (CP state passing, conv halo) sees the whole CP shard
            parallelize_module(mixer, tp_mesh, _gather_input(n_inputs=2))
        if block.moe_enabled and expert_parallel:
            apply_moe_tp_ep(block.moe, tp_mesh, sequence_parallel=sequence_parallel)
        elif block.moe_enabled:
            apply_expert_tp(block.moe, tp_mesh, sequence_parallel=sequence_parallel)
        else:
            parallelize_module(block.feed_forward, tp_mesh, {
                "w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel(output_layouts=seq)})
            if sequence_parallel:
                parallelize_module(block.feed_forward, tp_mesh, _gather_input())
        for norm in (block.attention_norm, block.ffn_norm):
            _replicated_norm(norm, tp_mesh, seq)
    if model.norm is not None:
        _replicated_norm(model.norm, tp_mesh, seq)


def parallelize_qwen3_5_cp(model: nn.Module, *, parallel_dims, training, parallelism, **kwargs):
    """TorchTitan's ``parallelize_fn`` for Qwen35CPModel (see the module docstring)."""
    if model.vision_encoder is not None:  # with_vision (CP 1 only): its own FSDP unit, as TorchTitan's
        from torchtitan.config import TORCH_DTYPE_MAP
        from torchtitan.distributed.fsdp import apply_fsdp_to_vision_encoder

        apply_fsdp_to_vision_encoder(
            model.vision_encoder, fsdp_mesh(parallel_dims),
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
            reshard_after_forward_policy=parallelism.fsdp_reshard_after_forward,
            pp_enabled=parallel_dims.pp_enabled,
        )
    if parallel_dims.ep_enabled:  # TorchTitan's expert parallel (titan_cp.models.qwen3_5.moe)
        apply_ep(model, parallel_dims.get_mesh("ep"))
    # TorchTitan's parallelism.enable_sequence_parallel (its default: on); configs built without it: off
    sequence_parallel = getattr(parallelism, "enable_sequence_parallel", False)
    tp_fn = partial(apply_tp, sequence_parallel=sequence_parallel, expert_parallel=parallel_dims.ep_enabled)
    return parallelize_decoder(model, apply_tp_fn=tp_fn,
                               parallel_dims=parallel_dims, training=training,
                               parallelism=parallelism, **kwargs)
