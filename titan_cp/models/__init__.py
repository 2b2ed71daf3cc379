"""titan_cp.models."""
