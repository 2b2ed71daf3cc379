"""Denormal floats flushed to zero while GDN arithmetic runs on a CPU.

Decay products below the smallest normal float (1.2e-38 in float32) are common in
GDN: a CP segment's transition M and q_t M_<=t over a 2K-token shard, exp(G) of
fast-decaying heads, and whatever is multiplied by them (the CP output correction,
the exchange's fold, their backward). x86 arithmetic on denormals is 10-100x
slower: the CP segment summary ran 2.3x slower, the output correction's matmuls
3-5x slower. Flushing changes values below 1e-38 relative to O(1) terms, far under
the float32 rounding of any result. GPUs are unaffected (their kernels flush or
run denormals at full speed).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def flush_denormals():
    """Flush float32/64 denormals to zero on this thread inside the block, then restore the setting."""
    was_on = torch.tensor(1e-39).mul_(1.0).item() == 0.0  # the probe reads 0 when flushing is on
    if was_on or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


__all__ = ["flush_denormals"]
