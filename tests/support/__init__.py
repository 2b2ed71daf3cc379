"""Helpers shared by the tests: references (FLA, transformers), the Triton interpreter shim, training runs."""
