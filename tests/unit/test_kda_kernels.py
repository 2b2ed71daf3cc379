"""KDA's recurrence (titan_cp.ops.kda) against FLA 0.6.0's pure-PyTorch references.

FLA's ``fla/ops/kda/naive.py`` is loaded as a file (its package __init__ pulls
Triton). Both ``naive_recurrent_kda`` and ``naive_chunk_kda`` compute in float32
(they cast with ``.to(torch.float)``), so the bound is 1e-5 with float64 inputs:
outputs, final state and the gradients of q, k, v, g, beta and the initial state.
Document resets (FLA's naive kernels have none) are checked as the restart they mean:
a row with a start at t equals two independent rows.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from titan_cp.ops.kda import recurrent_kda
from titan_cp.testing import rel_err


def _fla_naive():
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("flash-linear-attention is not installed")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "kda" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_kda_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _inputs(B=2, T=32, H=2, K=4, V=6):
    gen = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    k = torch.nn.functional.normalize(r(B, T, H, K), dim=-1)
    g = -torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) * 0.5
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    return [r(B, T, H, K), k, r(B, T, H, V), g, beta, r(B, H, K, V)]


@pytest.mark.parametrize("reference", ["naive_recurrent_kda", "naive_chunk_kda"])
def test_recurrent_equals_fla_naive_with_gradients(reference):
    fla = getattr(_fla_naive(), reference)
    tensors = _inputs()
    w = torch.randn(2, 32, 2, 6, dtype=torch.float64)

    def run(kernel, **kw):
        leaves = [x.clone().requires_grad_() for x in tensors]
        o, S = kernel(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
        loss = (o.double() * w).sum() + (S.double() ** 2).sum()
        return [o.detach(), S.detach(), *torch.autograd.grad(loss, leaves)]

    extra = {"chunk_size": 16} if reference == "naive_chunk_kda" else {}
    names = ["o", "S", "dq", "dk", "dv", "dg", "dbeta", "dS0"]
    for name, got, ref in zip(names, run(recurrent_kda), run(lambda *a, **k: fla(*a, **k, **extra))):
        assert rel_err(got, ref) < 1e-5, name


def test_document_start_is_a_restart():
    q, k, v, g, beta, S0 = _inputs(B=1)
    starts = torch.zeros(1, 32, dtype=torch.bool)
    starts[0, 11] = True
    o, S = recurrent_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True, doc_starts=starts)
    cut = lambda x, a, b: x[:, a:b]  # noqa: E731
    o1, _ = recurrent_kda(*(cut(x, 0, 11) for x in (q, k, v, g, beta)), initial_state=S0)
    o2, S2 = recurrent_kda(*(cut(x, 11, 32) for x in (q, k, v, g, beta)), output_final_state=True)
    assert rel_err(o, torch.cat([o1, o2], 1)) < 1e-12 and rel_err(S, S2) < 1e-12
