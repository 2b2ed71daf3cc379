"""Counters of what context parallelism sends: bytes and rounds per layer.

Every CP collective or point-to-point call records itself here under a
``(layer, kind)`` key, e.g. ``("layers.0.attention", "state_fwd")``. Benchmarks
and the trainer's metrics read :data:`comm_stats`, then ``reset()`` per step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class CommRecord:
    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0
    calls: int = 0


@dataclass
class CommStats:
    records: dict[tuple[str, str], CommRecord] = field(default_factory=lambda: defaultdict(CommRecord))

    def add(self, layer: str, kind: str, *, sent: int, received: int, rounds: int = 1) -> None:
        record = self.records[(layer, kind)]
        record.bytes_sent += sent
        record.bytes_received += received
        record.rounds += rounds
        record.calls += 1

    def reset(self) -> None:
        self.records.clear()

    def total(self, kind_prefix: str = "") -> CommRecord:
        out = CommRecord()
        for (_, kind), r in self.records.items():
            if kind.startswith(kind_prefix):
                out.bytes_sent += r.bytes_sent
                out.bytes_received += r.bytes_received
                out.rounds += r.rounds
                out.calls += r.calls
        return out

    def per_layer(self, kind_prefix: str = "") -> dict[str, CommRecord]:
        out: dict[str, CommRecord] = defaultdict(CommRecord)
        for (layer, kind), r in self.records.items():
            if kind.startswith(kind_prefix):
                o = out[layer]
                o.bytes_sent += r.bytes_sent
                o.bytes_received += r.bytes_received
                o.rounds += r.rounds
                o.calls += r.calls
        return dict(out)


comm_stats = CommStats()
