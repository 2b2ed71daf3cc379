"""Single-process tests: kernels vs references, configs, checkpoints, structure (fast)."""
