"""titan_cp.models.common."""
