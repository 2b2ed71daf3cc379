"""Every collective titan_cp issues for context parallelism, and what it sends.

No other module calls ``torch.distributed`` for CP traffic: the state exchange
(cp/state_passing.py), the conv halo (cp/halo.py), the head-parallel
all-to-all (cp/head_parallel.py), the attention ring (cp/ring_attention.py)
and the small shape checks and gathers of cp/context.py and cp/layout.py all
go through the functions here. Each records what it sends in
:data:`comm_stats` under a ``(layer, kind)`` key, e.g.
``("layers.0.attention", "state_fwd")``: bytes sent and received by this rank
(self-copies excluded) and rounds (sequential communication steps).
Benchmarks and the trainer's metrics read :data:`comm_stats`, then
``reset()`` per step.

The calls themselves go through a :class:`Comm` backend:

- :class:`DistComm` (the default): torch.distributed as is.
- :class:`HostStagedComm`: the same collectives through host copies, for a
  gloo group whose tensors live on a GPU (gloo's CUDA support is partial, and
  NCCL refuses two ranks on one GPU: several CP ranks sharing one GPU in
  tests). Exact: only copies. :func:`backend_for` picks it by itself for a
  gloo group with CUDA tensors.
- anything else (a test double, a loopback that simulates one rank of P):
  :func:`use_backend` installs it for a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------- accounting


@dataclass
class CommRecord:
    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0
    calls: int = 0

    def add(self, other: "CommRecord") -> None:
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        self.rounds += other.rounds
        self.calls += other.calls


@dataclass
class CommStats:
    records: dict[tuple[str, str], CommRecord] = field(default_factory=lambda: defaultdict(CommRecord))

    def add(self, layer: str, kind: str, *, sent: int, received: int, rounds: int = 1) -> None:
        self.records[(layer, kind)].add(CommRecord(sent, received, rounds, 1))

    def reset(self) -> None:
        self.records.clear()

    def total(self, kind_prefix: str = "") -> CommRecord:
        out = CommRecord()
        for (_, kind), r in self.records.items():
            if kind.startswith(kind_prefix):
                out.add(r)
        return out

    def per_layer(self, kind_prefix: str = "") -> dict[str, CommRecord]:
        out: dict[str, CommRecord] = defaultdict(CommRecord)
        for (layer, kind), r in self.records.items():
            if kind.startswith(kind_prefix):
                out[layer].add(r)
        return dict(out)


comm_stats = CommStats()


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class P2P:
    """One point-to-point transfer: send ``tensor`` to, or receive into it from, global rank ``peer``."""

    send: bool
    tensor: torch.Tensor
    peer: int
    tag: int = 0


class DistComm:
    """The collectives CP needs, straight from torch.distributed (blocking unless said otherwise)."""

    def all_gather_into_tensor(self, out: torch.Tensor, x: torch.Tensor, group) -> None:
        dist.all_gather_into_tensor(out, x, group=group)

    def all_gather(self, outs: list[torch.Tensor], x: torch.Tensor, group) -> None:
        dist.all_gather(outs, x, group=group)

    def all_to_all_single(self, out: torch.Tensor, x: torch.Tensor, group) -> None:
        dist.all_to_all_single(out, x, group=group)

    def batch_isend_irecv(self, ops: list[P2P], group) -> list[Any]:
        """Start every transfer; return handles with ``wait()``."""
        return dist.batch_isend_irecv([
            dist.P2POp(dist.isend if op.send else dist.irecv, op.tensor, op.peer, group=group, tag=op.tag)
            for op in ops
        ])


class _Done:
    def wait(self, *args, **kwargs) -> bool:
        return True


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


class HostStagedComm(DistComm):
    """:class:`DistComm` through host copies: gloo with tensors on a GPU. Exact; transfers are synchronous."""

    def all_gather_into_tensor(self, out, x, group) -> None:
        staged = torch.empty(out.shape, dtype=out.dtype)
        super().all_gather_into_tensor(staged, _host(x), group)
        out.copy_(staged)

    def all_gather(self, outs, x, group) -> None:
        staged = [torch.empty(o.shape, dtype=o.dtype) for o in outs]
        super().all_gather(staged, _host(x), group)
        for o, s in zip(outs, staged):
            o.copy_(s)

    def all_to_all_single(self, out, x, group) -> None:
        staged = torch.empty(out.shape, dtype=out.dtype)
        super().all_to_all_single(staged, _host(x), group)
        out.copy_(staged)

    def batch_isend_irecv(self, ops, group) -> list[Any]:
        staged = [P2P(op.send, _host(op.tensor), op.peer, op.tag) for op in ops]
        for work in super().batch_isend_irecv(staged, group):
            work.wait()
        for op, host in zip(ops, staged):
            if not op.send:
                op.tensor.copy_(host.tensor)
        return [_Done() for _ in ops]


_override: DistComm | None = None


@contextlib.contextmanager
def use_backend(backend: DistComm) -> Iterator[None]:
    """Route every CP collective through ``backend`` inside the block."""
    global _override
    previous, _override = _override, backend
    try:
        yield
    finally:
        _override = previous


def backend_for(group, device: torch.device) -> DistComm:
    """The installed backend, else host staging for gloo + CUDA tensors, else plain torch.distributed."""
    if _override is not None:
        return _override
    real_group = group is None or isinstance(group, dist.ProcessGroup)  # not a test double of a group
    if device.type == "cuda" and real_group and dist.get_backend(group) == "gloo":
        return HostStagedComm()
    return DistComm()


# --------------------------------------------------------------------------- CP collectives


def all_gather_stacked(x: torch.Tensor, cp, layer_name: str, kind: str) -> torch.Tensor:
    """All-gather ``x`` from every CP rank: [P, *x.shape], index = group rank. Recorded as one round."""
    x = x.contiguous()
    gathered = x.new_empty((cp.size * x.shape[0], *x.shape[1:]))
    backend_for(cp.group, x.device).all_gather_into_tensor(gathered, x, cp.group)
    moved = nbytes(x) * (cp.size - 1)
    comm_stats.add(layer_name, kind, sent=moved, received=moved, rounds=1)
    return gathered.view(cp.size, *x.shape)


def all_gather_list(x: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    """Every rank's ``x`` as a list (index = group rank): shape checks and gathers of small tensors.

    Not recorded: used for start-up checks, test and benchmark gathers, and the
    document starts of the head-parallel strategy (one bool per token).
    """
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    backend_for(group, x.device).all_gather(parts, x, group)
    return parts


def all_to_all(x_P: torch.Tensor, cp, layer_name: str, kind: str) -> torch.Tensor:
    """all_to_all_single over dim 0: chunk j of ``x_P`` [P, ...] goes to rank j, chunk j back from it."""
    x_P = x_P.contiguous()
    out = torch.empty_like(x_P)
    backend_for(cp.group, x_P.device).all_to_all_single(out, x_P, cp.group)
    moved = nbytes(x_P[0]) * (cp.size - 1)
    comm_stats.add(layer_name, kind, sent=moved, received=moved, rounds=1)
    return out


class AllToAll(torch.autograd.Function):
    """:func:`all_to_all` with autograd: it is its own inverse, so the backward is the same exchange.

    Recorded as ``kind + "_fwd"`` and ``kind + "_bwd"``.
    """

    @staticmethod
    def forward(ctx, x_P: torch.Tensor, cp, layer_name: str, kind: str):
        ctx.cp, ctx.layer_name, ctx.kind = cp, layer_name, kind
        return all_to_all(x_P, cp, layer_name, kind + "_fwd")

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.cp, ctx.layer_name, ctx.kind + "_bwd"), None, None, None


def exchange_p2p(
    cp,
    outgoing: list[tuple[torch.Tensor, int, int]],
    incoming: list[tuple[torch.Tensor, int, int]],
    layer_name: str,
    kind: str,
) -> None:
    """Send and receive ``(tensor, peer group rank, tag)`` lists in one batch; recorded as one round.

    A transfer to this rank itself is a copy (matched by tag) and is not counted.
    Blocks until every transfer is done.
    """
    ops: list[P2P] = []
    local_sends = {tag: t for t, peer, tag in outgoing if peer == cp.rank}
    sent = received = 0
    for t, peer, tag in outgoing:
        if peer != cp.rank:
            ops.append(P2P(True, t.contiguous(), cp.global_rank(peer), tag))
            sent += nbytes(t)
    for buf, peer, tag in incoming:
        if peer == cp.rank:
            buf.copy_(local_sends[tag])
        else:
            ops.append(P2P(False, buf, cp.global_rank(peer), tag))
            received += nbytes(buf)
    if ops:
        device = ops[0].tensor.device
        for work in backend_for(cp.group, device).batch_isend_irecv(ops, cp.group):
            work.wait()
    comm_stats.add(layer_name, kind, sent=sent, received=received, rounds=1)


class Ring:
    """Shifts around the CP ring (rank r sends to r+1, receives from r-1), counted until :meth:`record`."""

    def __init__(self, cp):
        self.group = cp.group
        self.next = cp.global_rank((cp.rank + 1) % cp.size)
        self.prev = cp.global_rank((cp.rank - 1) % cp.size)
        self.sent = 0

    def shift(self, tensors: list[tuple[torch.Tensor, int]]) -> "PendingShift":
        """Start sending each (tensor, tag) to the next rank and receiving same-shaped ones from the previous."""
        ops, received = [], []
        for tensor, tag in tensors:
            buf = torch.empty_like(tensor)
            ops += [P2P(True, tensor, self.next, tag), P2P(False, buf, self.prev, tag)]
            received.append(buf)
            self.sent += nbytes(tensor)
        works = backend_for(self.group, tensors[0][0].device).batch_isend_irecv(ops, self.group)
        return PendingShift(works, received)

    def record(self, layer_name: str, kind: str, rounds: int) -> None:
        """One record for all shifts so far (every rank sends what it receives)."""
        comm_stats.add(layer_name, kind, sent=self.sent, received=self.sent, rounds=rounds)


class PendingShift:
    def __init__(self, works, received: list[torch.Tensor]):
        self.works, self.received = works, received

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        return self.received


__all__ = [
    "AllToAll",
    "CommRecord",
    "CommStats",
    "DistComm",
    "HostStagedComm",
    "P2P",
    "Ring",
    "all_gather_list",
    "all_gather_stacked",
    "all_to_all",
    "backend_for",
    "comm_stats",
    "exchange_p2p",
    "nbytes",
    "use_backend",
]
