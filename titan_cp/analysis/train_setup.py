"""What a memory estimate is asked about: the parallel layout (:class:`Parallelism`) and the training setup
(:class:`TrainSetup`: sequence, batch, dtypes, optimizer, activation checkpointing, kernel and CP choices)."""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


def dtype_bytes(name: str | int) -> int:
    if isinstance(name, int):
        return name
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"dtype = '{name}' is not one of {sorted(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class Parallelism:
    dp: int = 1  # FSDP shard degree (dp_shard)
    tp: int = 1
    cp: int = 1
    sequence_parallel: bool = True  # TorchTitan's default with TP
    fsdp_over_cp: bool = True  # False: CP ranks hold full parameter replicas (no FSDP over cp)
    replicate: int = 1  # HSDP replicas (dp_replicate): parameters are not sharded over them
    ep: int = 1  # expert parallel (MoE): borrows ranks from dp x cp x tp (TorchTitan's efsdp = dp cp tp / ep)
    pp: int = 1  # pipeline stages (layers split evenly)

    @property
    def fsdp(self) -> int:
        """TorchTitan shards parameters over dp_shard x cp (dp_shard alone with ``fsdp_over_cp=False``)."""
        return self.dp * self.cp if self.fsdp_over_cp else self.dp


@dataclass(frozen=True)
class TrainSetup:
    seq_len: int
    batch: int = 1  # local batch (rows) per DP rank; CP ranks share rows
    param_dtype: str = "fp32"  # storage dtype of (sharded) params
    act_dtype: str = "bf16"  # compute dtype: activations, FSDP all-gathered params
    grad_dtype: str | None = None  # None: param_dtype
    reduce_dtype: str = "fp32"  # FSDP gradient reduce dtype
    optimizer_states: int = 2  # AdamW exp_avg, exp_avg_sq
    optimizer_dtype: str = "fp32"
    master_weights: bool = False  # extra fp32 copy of params (only if param_dtype is 16-bit)
    ac: str = "none"  # "none" | "full"
    chunk_size: int = 64  # GDN kernel chunk C
    kernel_saved_per_head_token: float = 64.0  # kernel_internal c (FLA: A matrix, C per head per token)
    kernel_saves_states: bool = False  # chunk states [T/C, Hv, K, V] fp32 kept for backward
    kernel_workspace_states: float = 2.0  # chunk-state tensors alive in the kernel backward (h, dh)
    cp_extra: bool = True  # state-passing CP terms when cp > 1 (q M, the exchange's buffers)
    cp_recomputes_kernel: bool = True  # the CP segment kernel reruns the plain kernel in the backward
    # (titan_cp.ops.gated_delta_rule.transition.RecomputingSegmentKernel: triton, recurrent); torch's binds its states
    cp_exchange: str = "allgather"  # state exchange (its buffers kept for backward): allgather | logscan | alltoall
    cp_layout: str = "contiguous"  # contiguous (1 segment per rank) | zigzag (2)
    cp_q_transition: str = "recompute"  # recompute (q M rerun in the backward) | keep (q M saved: Hv K fp32 / token)
    loss_chunks: int = 8  # TorchTitan ChunkedLossWrapper.num_chunks (1 = full logits)
    loss_bytes_per_logit: float = 12.0  # logits (act) + fp32 log-softmax + fp32 grad + act grad
    microbatches: int = 1  # pipeline microbatches the local batch is split into (1F1B keeps min(pp, this) in flight)
    workspace_fraction: float = 0.5  # activation gradients alive in one layer's backward
    attention_score_tensors: float = 4.6  # hybrids: fp32 [Hq, T_loc, T_loc] score-sized tensors in an attention
    # block's backward (the explicit block ops materialise them; fitted on CPU, P 1-8, 8K tokens)
    attention_workspace: float = 1.0  # Qwen3.5: activation gradients alive in the last attention layer's
    # backward, x that layer's saved bytes


# What one ring block pair's backward holds, per block-op path of titan_cp.cp.block_attention. The
# defaults above are the explicit masked softmax (every device but CPU: what a GPU run holds today);
# on CPU the block ops run torch's fused flash-attention kernel, which holds no score tensor.
# Fitted on the Qwen3.5 debug tables of docs/max_context.md (CPU ranks, 2K and 4K tokens).
FUSED_CPU_BLOCK_ATTENTION = {"attention_score_tensors": 0.0, "attention_workspace": 0.65}


def block_attention_terms(device_type: str) -> dict[str, float]:
    """The :class:`TrainSetup` fields of the block attention that runs on ``device_type`` ("cpu", "cuda")."""
    return dict(FUSED_CPU_BLOCK_ATTENTION) if device_type == "cpu" else {}


AC_MODES = ("none", "full")


def keeps_q_transition(setup: TrainSetup, par: Parallelism) -> bool:
    """State-passing CP with ``cp_q_transition = "keep"``: every GDN layer saves q M [T, Hv, K] fp32.

    Only the ranks with a predecessor hold it (all but contiguous rank 0, whose one segment starts
    the sequence); the estimate is the worst rank's."""
    return par.cp > 1 and setup.cp_extra and setup.cp_exchange != "alltoall" and setup.cp_q_transition == "keep"


__all__ = ["AC_MODES", "DTYPE_BYTES", "FUSED_CPU_BLOCK_ATTENTION", "Parallelism", "TrainSetup", "block_attention_terms",
           "dtype_bytes", "keeps_q_transition"]
