"""titan_cp.ops."""
