"""The three exchange strategies at P = 2, 5, 8: exact against one rank, and their traffic laws.

From the counters (titan_cp.cp.comm), bytes received per rank per layer in the
forward: allgather = (P-1) summaries, logscan = ceil(log2 P) summaries (at the
last rank), alltoall grows linearly with L. A summary is B*H*K*(K+V) floats.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from titan_cp.testing import run_on_ranks
from tests.integration.test_cp import FP32_REL, layer_errors, make_layer
from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import rank_segments
from titan_cp.cp.comm import comm_stats
from titan_cp.models.common.sequence import SequenceInfo


def received_per_layer(rank, P, exchange, T, heads):
    layer = make_layer("torch", heads)
    layer.cp = CPContext(group=dist.group.WORLD, exchange=exchange)
    x = rank_segments(torch.randn(1, T, 24), 1, rank, P, "contiguous").requires_grad_()
    comm_stats.reset()
    layer(x, SequenceInfo()).sum().backward()
    fwd_kinds = ("state_fwd",) if exchange != "alltoall" else ("alltoall_in_fwd", "alltoall_out_fwd")
    fwd = sum(comm_stats.records[("layer", k)].bytes_received for k in fwd_kinds)
    rounds = sum(comm_stats.records[("layer", k)].rounds for k in fwd_kinds)
    return fwd, rounds


def _rank(rank, P):
    errors = {}
    for exchange in ("allgather", "logscan", "alltoall"):
        for docs in ("none", "packed"):
            errs = layer_errors(rank, P, "torch", exchange, "contiguous", 6 * P, docs)
            errors[(exchange, docs)] = max(errs.values())
    traffic = {exchange: {T: received_per_layer(rank, P, exchange, T, heads=P) for T in (16 * P, 64 * P)}
               for exchange in ("allgather", "logscan", "alltoall")}
    return errors, traffic


def check(P):
    results = run_on_ranks(_rank, P, timeout=600)
    heads, K, V = P, 8, 12  # make_layer: num_v_heads = 2 * heads, head_dim 8, expand_v 1.5
    summary = 2 * heads * K * (K + V) * 4  # B = 1, Hv = 2 * heads, float32
    for rank, (errors, traffic) in enumerate(results):
        bad = {k: v for k, v in errors.items() if v > FP32_REL}
        assert not bad, f"P={P} rank {rank}: {bad}"
        for T in (16 * P, 64 * P):
            assert traffic["allgather"][T] == ((P - 1) * summary, 1)
            steps_back = sum(1 for d in range(math.ceil(math.log2(P))) if rank - 2**d >= 0)
            assert traffic["logscan"][T] == (steps_back * summary, math.ceil(math.log2(P)))
        small, large = traffic["alltoall"][16 * P][0], traffic["alltoall"][64 * P][0]
        assert large == 4 * small > 0
    last = results[-1][1]
    print(f"P={P} bytes received per layer forward at the last rank:",
          {k: v[16 * P][0] for k, v in last.items()})


@pytest.mark.parametrize("P", [2, 5])
def test_strategies_exact_and_traffic_laws(P):
    check(P)


@pytest.mark.slow
def test_strategies_exact_and_traffic_laws_8_ranks():
    check(8)
