"""The implementation of titan_cp's public names (import them from ``titan_cp``; see its docstring)."""
