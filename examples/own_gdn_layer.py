"""Context parallelism for your own GDN layer: titan_cp's op-level gated delta rule.

    torchrun --nproc_per_node 3 examples/own_gdn_layer.py                     # CPU: gloo
    torchrun --nproc_per_node 2 examples/own_gdn_layer.py --layout zigzag --exchange allgather

Every rank builds the same layer and the same batch of packed rows (several documents per
row, an initial state per row), runs its shard of the sequence with CP, and checks the
outputs and gradients against one process running the whole sequence without CP.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import titan_cp


class MyGatedDeltaLayer(nn.Module):
    """A user-written gated-delta layer: projections, L2-normed q/k, decay and write gates.

    (No short convolutions: a conv reads the previous tokens, which under CP live on another
    rank. For the full FLA layer with convs use titan_cp's model and ``titan_cp.make_cp_aware``.)
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.gates = nn.Linear(dim, 2 * heads, bias=False)  # decay (a) and write strength (b)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x_BTD, *, cp=None, doc_starts_BT=None, initial_state_BHKV=None):
        B, T, _ = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.silu(v)
        a, b = self.gates(x_BTD).float().view(B, T, 2, self.heads).unbind(2)
        g, beta = -F.softplus(a), torch.sigmoid(b)  # log decay <= 0, beta in (0, 1)
        o = titan_cp.gated_delta_rule(q, k, v, g, beta, cp=cp, kernel="torch",
                                      doc_starts_BT=doc_starts_BT, initial_state_BHKV=initial_state_BHKV)
        return self.out(o.reshape(B, T, -1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag"))
    p.add_argument("--exchange", default="allgather", choices=("allgather", "logscan"))
    p.add_argument("--seq-len", type=int, default=192)
    args = p.parse_args()
    dist.init_process_group("gloo")
    cp = titan_cp.cp_context(layout=args.layout, exchange=args.exchange)  # the WORLD group

    torch.manual_seed(0)  # the same layer and data on every rank
    dim, heads, head_dim, B, L = 32, 2, 16, 2, args.seq_len
    layer = MyGatedDeltaLayer(dim, heads, head_dim).double()
    x = torch.randn(B, L, dim, dtype=torch.float64)
    doc_starts = torch.rand(B, L) < 0.02  # packed rows: a few documents each
    initial_state = torch.randn(B, heads, head_dim, head_dim, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(B, L, dim, dtype=torch.float64)  # loss = sum(out * weights)

    # This rank's shard, with CP.
    x_local = titan_cp.shard_sequence(x, cp)
    y_local = layer(x_local, cp=cp, doc_starts_BT=titan_cp.shard_sequence(doc_starts, cp),
                    initial_state_BHKV=initial_state)
    (y_local * titan_cp.shard_sequence(weights, cp)).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()] + [initial_state.grad.clone()]
    for grad in grads:
        dist.all_reduce(grad)  # every rank's part of the parameter gradients
    y = titan_cp.gather_sequence(y_local.detach(), cp)

    # One process, whole sequence, no CP.
    layer.zero_grad()
    initial_state.grad = None
    y_ref = layer(x, doc_starts_BT=doc_starts, initial_state_BHKV=initial_state)
    (y_ref * weights).sum().backward()
    grads_ref = [p.grad for p in layer.parameters()] + [initial_state.grad]

    err = max([(y - y_ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, grads_ref)])
    if dist.get_rank() == 0:
        print(f"CP {cp.size} ({args.layout}, {args.exchange}) vs one process: max abs difference {err:.2e}")
    dist.destroy_process_group()
    if err > 1e-9:
        raise SystemExit(f"CP result differs from the single-process result by {err:.2e}")


if __name__ == "__main__":
    main()
