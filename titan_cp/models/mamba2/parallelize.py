"""parallelize_mamba2: the GDN LM's pipeline (CP -> TP -> AC -> compile -> FSDP/HSDP; PP by stages).

TP is head-parallel (titan_cp.models.gdn.parallelize.apply_tp; the layout in
titan_cp.models.gdn.mamba2_layer): rank r of t computes heads [r H/t, (r+1) H/t) and the B / C
groups they read; in_proj and conv1d stay replicated (each rank reads its rows, gradients summed
over TP), dt_bias / A_log / D / norm.weight are Shard(0), out_proj rowwise, and the gated norm's
mean of squares is all-reduced over TP. Needs model.num_heads divisible by
parallelism.tensor_parallel_degree (titan_cp.models.common.preflight)."""

from __future__ import annotations

from titan_cp.models.gdn.parallelize import parallelize_gdn as parallelize_mamba2

__all__ = ["parallelize_mamba2"]
