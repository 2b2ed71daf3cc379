"""Qwen3.5's dtype-following norms (titan_cp.models.qwen3_5.layers): TorchTitan's arithmetic, float64 for float64.

float32 / bf16 outputs are bit-identical to TorchTitan's OffsetRMSNorm /
RMSNormGated (which always upcast to float32); float64 ones equal a float64
formula to rounding, where TorchTitan's are float32-accurate (~1e-7). Every
norm of a titan_cp Qwen3.5 model is swapped, the final norm included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchtitan.models.qwen3_5.model import OffsetRMSNorm, RMSNormGated

from titan_cp.models.qwen3_5.layers import CPOffsetRMSNorm, CPRMSNormGated, dtype_following_norm
from titan_cp.testing import rel_err
from tests.support.qwen35_common import tiny_config


def _pair(torchtitan_cls, dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, generator=gen)
    theirs, ours = torchtitan_cls.Config(dim=8).build(), dtype_following_norm(torchtitan_cls.Config(dim=8)).build()
    for norm in (theirs, ours):
        norm.weight.data.copy_(weight)
        norm.to(dtype)
    x, gate = (torch.randn(3, 5, 8, generator=gen).to(dtype) for _ in range(2))
    return theirs, ours, x, gate


def test_float32_and_bf16_bit_identical_to_torchtitan():
    for dtype in (torch.float32, torch.bfloat16):
        theirs, ours, x, _ = _pair(OffsetRMSNorm, dtype)
        assert isinstance(ours, CPOffsetRMSNorm) and torch.equal(ours(x), theirs(x))
        theirs, ours, x, gate = _pair(RMSNormGated, dtype)
        assert isinstance(ours, CPRMSNormGated) and torch.equal(ours(x, gate), theirs(x, gate))


def test_float64_stays_float64():
    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    theirs, ours, x, _ = _pair(OffsetRMSNorm, torch.float64)
    want = (1 + ours.weight) * rms(x)
    assert rel_err(ours(x), want) < 1e-14 < rel_err(theirs(x), want)
    theirs, ours, x, gate = _pair(RMSNormGated, torch.float64)
    want = ours.weight * rms(x) * F.silu(gate)
    assert rel_err(ours(x, gate), want) < 1e-14 < rel_err(theirs(x, gate), want)


def test_every_norm_of_the_model_is_swapped():
    model = tiny_config().build()
    norms = [m for m in model.modules() if isinstance(m, (OffsetRMSNorm, RMSNormGated))]
    assert norms and all(isinstance(m, (CPOffsetRMSNorm, CPRMSNormGated)) for m in norms)
    assert isinstance(model.norm, CPOffsetRMSNorm)
