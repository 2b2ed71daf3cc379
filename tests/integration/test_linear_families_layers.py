"""A whole Mamba-2 mixer (transformers' parameterisation) under CP equals one rank.

transformers' ``Mamba2Mixer`` weights (random, float64) run through
titan_cp.cp.kernel_cp.mamba2_mixer_over_shards on P = 2 and 3 ranks: the conv over
x | B | C through the halo (segments shorter than W-1 included), the SSD through every
exchange x layout (alltoall where heads divide P), with and without packed documents
whose starts sit on and next to segment boundaries. Outputs, the input's gradient and
every parameter's gradient (summed over ranks) equal the one-rank mixer
(titan_cp.ops.mamba2.mixing, itself equal to transformers' torch_forward in
tests/unit/test_mamba2_kernels.py) to 1e-10. transformers' gated RMSNorm computes in
float32 whatever its input, which rounds 1e-16 differences up to 1e-7, so here the mixer's
norm is the same formula in the input's dtype (:class:`Float64GatedNorm`, token-local).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from titan_cp.cp.comm import all_gather_list
from titan_cp.cp.context import CPContext
from titan_cp.cp.kernel_cp import mamba2_mixer_over_shards
from titan_cp.cp.layout import num_segments, rank_segments
from titan_cp.ops.mamba2.mixing import mamba2_mixer
from titan_cp.testing import rel_err, run_on_ranks
from tests.unit.test_mamba2_kernels import _tiny_mixer


class Float64GatedNorm(torch.nn.Module):
    """transformers' MambaRMSNormGated without its float32 cast: w * RMSNorm(y * silu(z))."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.variance_epsilon

    def forward(self, y, gate):
        y = y * torch.nn.functional.silu(gate)
        return self.weight * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)


def _case(rank, P, mixer, exchange, layout, seg_len, docs):
    L = seg_len * num_segments(P, layout)
    gen = torch.Generator().manual_seed(L)
    h = torch.randn(2, L, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(2, L, 16, generator=gen, dtype=torch.float64)
    starts = None
    if docs:
        starts = torch.zeros(2, L, dtype=torch.bool)
        bounds = list(range(seg_len, L, seg_len))
        starts[0, bounds[::2]] = True
        starts[1, [b + 1 for b in bounds[1::2]] + [b - 1 for b in bounds[::2]]] = True
    params = list(mixer.parameters())
    h_full = h.clone().requires_grad_()
    ref = torch.autograd.grad((mamba2_mixer(mixer, h_full, doc_starts_BT=starts) * w).sum(), [h_full, *params])
    shard = lambda x: rank_segments(x, 1, rank, P, layout)  # noqa: E731
    h_local = shard(h).requires_grad_()
    cp = CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange)
    out = mamba2_mixer_over_shards(mixer, h_local, cp=cp, doc_starts_BT=None if starts is None else shard(starts))
    got = torch.autograd.grad((out * shard(w)).sum(), [h_local, *params])
    errs = [rel_err(got[0], shard(ref[0]))]
    errs += [rel_err(sum(all_gather_list(g, dist.group.WORLD, P)), r) for g, r in zip(got[1:], ref[1:])]
    return max(errs)


def _rank(rank, P):
    mixer = _tiny_mixer()  # the same weights on every rank (seeded)
    mixer.norm = Float64GatedNorm(mixer.norm)
    errors = {}
    for exchange in ("allgather", "logscan", "alltoall"):
        if exchange == "alltoall" and mixer.num_heads % P:
            continue
        for layout in ("contiguous", "zigzag"):
            if exchange == "logscan" and layout != "contiguous":
                continue
            for seg_len, docs in ((6, True), (2, False)):  # 2 < W - 1: the halo spans two segments
                errors[(exchange, layout, seg_len, docs)] = _case(rank, P, mixer, exchange, layout, seg_len, docs)
    return errors


@pytest.mark.parametrize("P", [2, 3])
def test_mamba2_mixer_under_cp_equals_one_rank(P):
    for rank, errors in enumerate(run_on_ranks(_rank, P, timeout=600)):
        assert len(errors) == (10 if 4 % P == 0 else 6)
        bad = {c: e for c, e in errors.items() if e > 1e-10}
        assert not bad, f"P={P} rank {rank}: {bad}"
