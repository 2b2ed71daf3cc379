"""Op-level CP for the linear-attention families over one engine: exact against one rank.

One launch per P (2, 3, 4) checks, for Mamba-2's SSD (scalar transition per head) and
KDA (per-channel decay, K x K transition; its torch chunk kernel):
every exchange (allgather, logscan, alltoall) x every layout it allows (contiguous,
zigzag; logscan needs contiguous) x {one document, packed documents with starts on,
just before and just after segment boundaries} x {float64, float32}, with an initial
state: the outputs and the gradients of q, k, v, g, beta and the initial state (summed
over ranks) equal the one-rank kernel on the whole sequence (float64 1e-10,
float32 1e-5). It also checks the exchange bytes per layer: a Mamba-2 summary is
H (1 + K V) floats per segment, a KDA one H K (K + V), the same for every L.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from titan_cp.cp.comm import all_gather_list, comm_stats
from titan_cp.cp.context import CPContext
from titan_cp.cp.kernel_cp import kernel_over_shards
from titan_cp.cp.layout import num_segments, rank_segments
from titan_cp.ops import kda, mamba2
from titan_cp.testing import rel_err, run_on_ranks

B, H, K, V = 2, 4, 3, 5  # H divisible by P = 2, 4; P = 3 skips alltoall (heads must divide)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
FAMILIES = {"mamba2": (mamba2.get_kernel("torch"), mamba2.get_segment_kernel("torch")),
            "kda": (kda.get_kernel("torch"), kda.get_segment_kernel("torch"))}
SUMMARY_FLOATS = {"mamba2": H * (1 + K * V), "kda": H * K * (K + V)}


def make_inputs(L, dtype, docs, P, layout, family):
    gen = torch.Generator().manual_seed(L * 7 + len(docs))
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, L, H, K), r(B, L, H, K), r(B, L, H, V)
    k = torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(B, L, H, *((K,) if family == "kda" else ()), generator=gen, dtype=torch.float64) * 0.5
    beta = torch.rand(B, L, H, generator=gen, dtype=torch.float64)
    S0 = r(B, H, K, V)
    w = r(B, L, H, V)
    starts = None
    if docs == "packed":
        seg = L // num_segments(P, layout)
        starts = torch.zeros(B, L, dtype=torch.bool)
        bounds = list(range(seg, L, seg))
        starts[0, bounds[::2]] = True  # on a boundary
        starts[0, [b + 1 for b in bounds[1::2]]] = True  # just after
        starts[1, [b - 1 for b in bounds]] = True  # just before
        starts[1, 0] = True
    return [x.to(dtype) for x in (q, k, v, g, beta, S0, w)], starts


def one_case(rank, P, family, exchange, layout, docs, dtype):
    kernel, segment_kernel = FAMILIES[family]
    L = 4 * num_segments(P, layout)
    (q, k, v, g, beta, S0, w), starts = make_inputs(L, dtype, docs, P, layout, family)
    full = [x.clone().requires_grad_() for x in (q, k, v, g, beta, S0)]
    o_ref, _ = kernel(*full[:5], initial_state=full[5], doc_starts=starts)
    ref_grads = torch.autograd.grad((o_ref * w).sum(), full)
    shard = lambda x: rank_segments(x, 1, rank, P, layout)  # noqa: E731
    local = [shard(x).clone().requires_grad_() for x in (q, k, v, g, beta)] + [S0.clone().requires_grad_()]
    cp = CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange)
    o = kernel_over_shards(*local[:5], kernel=kernel, segment_kernel=segment_kernel, cp=cp, name=family,
                           initial_state=local[5], doc_starts=None if starts is None else shard(starts))
    grads = torch.autograd.grad((o * shard(w)).sum(), local)
    dS0 = sum(all_gather_list(grads[5], dist.group.WORLD, P))
    errs = [rel_err(o, shard(o_ref))] + [rel_err(a, shard(b)) for a, b in zip(grads[:5], ref_grads[:5])]
    errs.append(rel_err(dS0, ref_grads[5]))
    return max(errs)


def forward_bytes(rank, P, family, L):
    kernel, segment_kernel = FAMILIES[family]
    (q, k, v, g, beta, _, _), _ = make_inputs(L, torch.float32, "none", P, "contiguous", family)
    shard = lambda x: rank_segments(x, 1, rank, P, "contiguous")  # noqa: E731
    comm_stats.reset()
    kernel_over_shards(*(shard(x) for x in (q, k, v, g, beta)), kernel=kernel, segment_kernel=segment_kernel,
                       cp=CPContext(group=dist.group.WORLD, exchange="allgather"), name="layer")
    return comm_stats.records[("layer", "state_fwd")].bytes_received


def _rank(rank, P):
    errors = {}
    for family, exchange in [(f, e) for f in FAMILIES for e in ("allgather", "logscan", "alltoall")]:
        if exchange == "alltoall" and H % P:
            continue
        for layout in ("contiguous", "zigzag"):
            if exchange == "logscan" and layout != "contiguous":
                continue
            for docs in ("none", "packed"):
                for dtype in (torch.float64, torch.float32):
                    errors[(family, exchange, layout, docs, str(dtype))] = one_case(
                        rank, P, family, exchange, layout, docs, dtype)
    traffic = {(f, L): forward_bytes(rank, P, f, L) for f in FAMILIES for L in (8 * P, 16 * P)}
    return errors, traffic


@pytest.mark.parametrize("P", [2, 3, 4])
def test_families_every_exchange_and_layout_equal_one_rank(P):
    results = run_on_ranks(_rank, P, timeout=600)
    for rank, (errors, traffic) in enumerate(results):
        assert len(errors) == len(FAMILIES) * (5 if H % P == 0 else 3) * 4
        bad = {c: e for c, e in errors.items() if e > TOL[torch.float64 if "float64" in c[-1] else torch.float32]}
        assert not bad, f"P={P} rank {rank}: {bad}"
        for family, floats in SUMMARY_FLOATS.items():  # one segment's payload per batch row, float32
            assert traffic[(family, 8 * P)] == traffic[(family, 16 * P)] == (P - 1) * B * floats * 4, traffic
