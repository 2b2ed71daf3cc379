"""One smoke command for CI runners: every shipped train_config that fits, proved on this runner's ranks.

    python -m titan_cp.cli.smoke --nproc 8                 # a GPU runner: NCCL + the triton kernel
    python -m titan_cp.cli.smoke --nproc 2 --device cpu    # gloo + the torch kernel
    python -m titan_cp.cli.smoke --nproc 2 --configs cp2 --steps 4 --checkpoint-step 2

For each fitting config (plan.py) it runs a few steps with torchrun at a short
sequence length and checks (checks.py) that the loss is finite and falls, that
CP = P reproduces the 1-rank run step by step, that a checkpoint saves and
resumes to the same losses, and that per-rank memory and CP bytes reach
TensorBoard. It prints one summary table, writes ``summary.md``,
``junit.xml``, every run's log, metrics and TensorBoard folder under
``--out``, and exits 1 if any check failed.
"""
