"""parallelize_kda: the GDN LM's pipeline (CP -> TP -> AC -> compile -> FSDP), whose TP plan has the KDA
layer's entry (titan_cp/models/gdn/parallelize.py: heads split like GDN's; the low-rank f_proj / g_proj
halves D -> V split over V with the output gathered)."""

from __future__ import annotations

from titan_cp.models.gdn.parallelize import apply_tp, parallelize_gdn as parallelize_kda

__all__ = ["apply_tp", "parallelize_kda"]
