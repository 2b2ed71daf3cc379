"""parallelize_mamba2: the GDN LM's pipeline (CP -> TP -> AC -> compile -> FSDP). Mamba-2 layers have no TP
plan (in_proj packs z | xBC | dt, the gated norm spans all heads): titan_cp.models.common.preflight refuses
parallelism.tensor_parallel_degree > 1 for them, so only CP, FSDP/HSDP and PP apply."""

from __future__ import annotations

from titan_cp.models.gdn.parallelize import parallelize_gdn as parallelize_mamba2

__all__ = ["parallelize_mamba2"]
