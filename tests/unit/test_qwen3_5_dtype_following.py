"""Qwen3.5's dtype-following norms and RoPE (titan_cp.models.qwen3_5.layers): TorchTitan's arithmetic, float64 for float64.

float32 / bf16 outputs are bit-identical to TorchTitan's OffsetRMSNorm /
RMSNormGated / MRoPE (which always upcast to float32); float64 ones equal a
float64 formula to rounding, where TorchTitan's are float32-accurate (~1e-7).
Every norm and RoPE of a titan_cp Qwen3.5 model is swapped, the final norm included.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torchtitan.models.qwen3_5.model import OffsetRMSNorm, RMSNormGated
from torchtitan.models.qwen3_5.rope import MRoPE

from titan_cp.models.qwen3_5.layers import CPMRoPE, CPOffsetRMSNorm, CPRMSNormGated, dtype_following
from titan_cp.testing import rel_err
from tests.support.qwen35_common import tiny_config


def _pair(torchtitan_cls, dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, generator=gen)
    theirs, ours = torchtitan_cls.Config(dim=8).build(), dtype_following(torchtitan_cls.Config(dim=8)).build()
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


def test_rope_bit_identical_in_float32_and_float64_accurate():
    model = tiny_config().build()
    model.init_weights()
    ours = next(m for m in model.modules() if isinstance(m, CPMRoPE))
    theirs = MRoPE.Config(**{f.name: getattr(ours.config, f.name) for f in fields(ours.config)}).build()
    theirs.cache = ours.cache
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 4, 8, generator=gen), torch.randn(2, 6, 2, 8, generator=gen)
    positions = torch.arange(6).expand(2, 6)
    assert all(torch.equal(a, b) for a, b in zip(ours(q, k, positions), theirs(q, k, positions)))
    ours.cache, theirs.cache = ours.cache.double(), ours.cache.double()
    q, k = q.double() + 1e-9 * torch.randn(q.shape, generator=gen, dtype=torch.float64), k.double()  # not fp32 values
    cache = ours.cache[positions][:, :, None]  # [B, T, 1, 2 R]: cos | sin
    want = q * cache[..., :8] + torch.cat([-q[..., 4:], q[..., :4]], -1) * cache[..., 8:]
    assert rel_err(ours(q, k, positions)[0], want) < 1e-14 < rel_err(theirs(q, k, positions)[0], want)


def test_every_norm_and_rope_of_the_model_is_swapped():
    model = tiny_config().build()
    twins = {OffsetRMSNorm: CPOffsetRMSNorm, RMSNormGated: CPRMSNormGated, MRoPE: CPMRoPE}
    swapped = [isinstance(m, twins[base]) for m in model.modules() for base in twins if isinstance(m, base)]
    assert len(swapped) > 10 and all(swapped)
    assert isinstance(model.norm, CPOffsetRMSNorm)
