"""titan_cp.components."""
