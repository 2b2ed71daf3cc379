"""Mamba-2's SSD kernels against independent references.

- chunk (several chunk sizes, padding) vs the step-by-step recurrence: outputs, final
  state and the gradients of q, k, v, g, beta and the initial state, with packed
  documents (float64 1e-10);
- the whole mixer (titan_cp.ops.mamba2.mixing, both kernels) vs transformers 5.6.2's
  ``Mamba2Mixer.torch_forward`` with the same weights: outputs, the input's gradient
  and every parameter's gradient (float64 weights and inputs; transformers runs the scan in
  float32 (``.float()`` in torch_forward), so the bound is 1e-6). transformers' prefill path takes no
  initial state, so the initial-state gradient is checked against the recurrence above.
"""

from __future__ import annotations

import pytest
import torch

from titan_cp.ops.mamba2 import chunk_ssd, recurrent_ssd
from titan_cp.ops.mamba2.mixing import mamba2_mixer
from titan_cp.testing import rel_err


def _inputs(B=2, T=37, H=3, K=4, V=5):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [7, 8, 16]] = True
    starts[1, [0, 15, 31]] = True
    return [r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), g, beta, r(B, H, K, V)], starts


@pytest.mark.parametrize("chunk_size", [8, 16, 64])
@pytest.mark.parametrize("docs", [False, True])
def test_chunk_equals_recurrent_with_gradients(chunk_size, docs):
    tensors, starts = _inputs()
    starts = starts if docs else None
    w = torch.randn(2, 37, 3, 5, dtype=torch.float64)

    def run(kernel, **kw):
        leaves = [x.clone().requires_grad_() for x in tensors]
        o, S = kernel(*leaves[:5], initial_state=leaves[5], output_final_state=True, doc_starts=starts, **kw)
        loss = (o * w).sum() + (S * S).sum()
        return [o.detach(), S.detach(), *torch.autograd.grad(loss, leaves)]

    for got, ref in zip(run(chunk_ssd, chunk_size=chunk_size), run(recurrent_ssd)):
        assert rel_err(got, ref) < 1e-10


def _tiny_mixer():
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    config = Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, state_size=6, n_groups=2, expand=2,
                          conv_kernel=4, chunk_size=8, time_step_limit=(0.0, float("inf")), use_conv_bias=True)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(config, layer_idx=0).double()
    with torch.no_grad():  # not the init: every parameter random, so every gradient is tested
        for p in mixer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        mixer.A_log.copy_(torch.rand_like(mixer.A_log) - 1)
    return mixer


@pytest.mark.parametrize("kernel", ["torch", "recurrent"])
def test_mixer_equals_transformers_torch_forward(kernel):
    mixer = _tiny_mixer()
    h = torch.randn(2, 21, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 21, 16, dtype=torch.float64)

    def grads(out):
        params = [h, *mixer.parameters()]
        return [out.detach(), *torch.autograd.grad((out * w).sum(), params)]

    ref = grads(mixer.torch_forward(h))
    got = grads(mamba2_mixer(mixer, h, kernel=kernel))
    for name, a, b in zip(["out", "h", *(n for n, _ in mixer.named_parameters())], got, ref):
        assert rel_err(a, b) < 1e-6, name
