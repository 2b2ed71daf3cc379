"""Multi-rank tests: CPU processes on gloo, every layout against one rank; real train.py runs."""
