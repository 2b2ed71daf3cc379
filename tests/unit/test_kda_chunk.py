"""KDA's torch chunk kernel (titan_cp.ops.kda.chunk) against the recurrence and FLA's naive_chunk_kda.

- vs titan_cp's step-by-step recurrence (itself equal to FLA's naive kernels,
  tests/unit/test_kda_kernels.py): outputs, final state and the gradients of q, k, v,
  g, beta and the initial state, for chunk sizes that divide T and that leave padding,
  with packed documents whose starts sit on, just after and inside chunk edges (float64 1e-10);
- vs FLA 0.6.0's ``naive_chunk_kda`` loaded as a file (float32 inside, so 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from titan_cp.ops.kda import recurrent_kda
from titan_cp.ops.kda.chunk import chunk_kda
from titan_cp.testing import rel_err
from tests.unit.test_kda_kernels import _fla_naive, _inputs


def _starts(B=2, T=32):
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [8, 9, 13]] = True  # on a chunk edge (C = 8), just after, inside
    starts[1, [0, 15, 16, 31]] = True
    return starts


def _run(kernel, tensors, starts, **kw):
    w = torch.randn(*tensors[2].shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in tensors]
    o, S = kernel(*leaves[:5], initial_state=leaves[5], output_final_state=True, doc_starts=starts, **kw)
    loss = (o.double() * w).sum() + (S.double() ** 2).sum()
    return [o.detach(), S.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("chunk_size", [8, 5, 64])
@pytest.mark.parametrize("docs", [False, True])
def test_chunk_equals_recurrent_with_gradients(chunk_size, docs):
    tensors = _inputs()
    starts = _starts() if docs else None
    names = ["o", "S", "dq", "dk", "dv", "dg", "dbeta", "dS0"]
    got = _run(chunk_kda, tensors, starts, chunk_size=chunk_size)
    for name, a, b in zip(names, got, _run(recurrent_kda, tensors, starts)):
        assert rel_err(a, b) < 1e-10, name


def test_chunk_equals_fla_naive_chunk():
    fla = _fla_naive().naive_chunk_kda
    tensors = _inputs()
    got = _run(chunk_kda, tensors, None, chunk_size=16)
    ref = _run(lambda *a, doc_starts=None, **kw: fla(*a, **kw, chunk_size=16), tensors, None)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-5
