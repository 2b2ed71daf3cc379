"""cp/comm.py's backends: host staging gives bit-identical results and the same byte counts.

HostStagedComm is what a gloo group with CUDA tensors uses (several CP ranks
sharing one GPU in tests/unit/test_gpu.py and benchmarks/gpu_check.py). On CPU its
code path (copy to host, collective, copy back) runs the same way, so two
gloo ranks check it here against plain torch.distributed: every strategy of
the GDN layer (halo + state exchange or all-to-all) and ring attention,
outputs and gradients equal, comm_stats equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from titan_cp.cp.comm import DistComm, HostStagedComm, comm_stats, use_backend
from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import rank_segments
from titan_cp.cp.ring_attention import ring_attention
from titan_cp.models.common.sequence import SequenceInfo
from titan_cp.models.gdn.layers import GatedDeltaNet
from titan_cp.testing import run_on_ranks


def _run_everything(rank: int, P: int) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    layer = GatedDeltaNet(dim=16, num_heads=2, head_dim=8, expand_v=1.0, num_v_heads=None, conv_size=4,
                          norm_eps=1e-6, kernel="torch")
    layer.init_weights(0.02)
    x_full = torch.randn(1, 8 * P, 16)
    starts = torch.zeros(1, 8 * P, dtype=torch.bool)
    starts[0, 5] = True
    out = []
    comm_stats.reset()
    for layout, exchange in (("zigzag", "allgather"), ("contiguous", "logscan"), ("contiguous", "alltoall")):
        layer.cp = CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange)
        x = rank_segments(x_full, 1, rank, P, layout).requires_grad_()
        y = layer(x, SequenceInfo(doc_starts=rank_segments(starts, 1, rank, P, layout)))
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        out += [y.detach(), x.grad, layer.q_conv1d.weight.grad.clone()]
        layer.zero_grad()
    q, k, v = (torch.randn(1, 2, 4 * P, 8, requires_grad=True) for _ in range(3))
    o = ring_attention(q, k, v, CPContext(group=dist.group.WORLD, layout="zigzag"), layer_name="ring")
    o.sum().backward()
    out += [o.detach(), q.grad, k.grad, v.grad]
    return out, {key: vars(r).copy() for key, r in comm_stats.records.items()}


def _rank(rank: int, P: int):
    with use_backend(DistComm()):
        plain = _run_everything(rank, P)
    with use_backend(HostStagedComm()):
        staged = _run_everything(rank, P)
    return plain, staged


def test_host_staged_backend_is_exact_and_counts_the_same_bytes():
    for plain, staged in run_on_ranks(_rank, 2, timeout=300):
        assert all(torch.equal(a, b) for a, b in zip(plain[0], staged[0]))
        assert plain[1] == staged[1] and plain[1][("ring", "ring_fwd")]["bytes_sent"] > 0
        kinds = {kind for _, kind in plain[1]}
        assert {"halo_fwd", "halo_bwd", "state_fwd", "state_bwd", "alltoall_in_fwd", "alltoall_out_bwd"} <= kinds
