"""titan_cp.train."""
