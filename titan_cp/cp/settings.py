"""The one owner of a job's CP choices: the layout, the exchange, and the load balancer they imply.

``[parallelism] cp_layout`` / ``cp_exchange`` (TOML), the model config's
``cp_layout`` / ``cp_exchange`` fields and ``cp_context(layout=, exchange=)``
all mean :class:`CPSettings`; it names the valid choices and checks their
combination once (``CPContext`` and the start-up checks both construct it).

- ``layout``: which sequence segments a CP rank holds (titan_cp.cp.layout):
  ``contiguous`` (rank r: segment r of P) or ``zigzag`` (rank r: segments
  r and 2P-1-r of 2P, balancing causal attention work).
- ``exchange``: how linear-attention layers pass state across segments:
  ``allgather`` / ``logscan`` (state passing, titan_cp.cp.state_passing) or
  ``alltoall`` (head-parallel, titan_cp.cp.head_parallel).
- ``load_balancer``: TorchTitan's ``parallelism.context_parallel_load_balancer``
  that shards batches in that layout. The trainer shards inputs, labels and
  positions with torch's ``_context_parallel_shard``: with no load balancer
  rank r gets the r-th of P equal chunks (``contiguous``);
  ``_HeadTailLoadBalancer`` reorders the sequence as [seg 0, seg 2P-1, seg 1,
  seg 2P-2, ...] before chunking, so rank r gets segments r and 2P-1-r in
  that order (``zigzag``; checked in the trainer-sharding test).
"""

from __future__ import annotations

from dataclasses import dataclass

from titan_cp.errors import ConfigError, unknown_choice_message

LAYOUTS = ("contiguous", "zigzag")
EXCHANGES = ("allgather", "logscan", "alltoall")
LAYOUT_TO_LOAD_BALANCER: dict[str, str | None] = {"contiguous": None, "zigzag": "headtail"}


@dataclass(frozen=True)
class CPSettings:
    """A valid (layout, exchange) pair; ``field`` prefixes the names in error messages."""

    layout: str = "contiguous"
    exchange: str = "allgather"
    field: str = "parallelism.cp_"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(unknown_choice_message(f"{self.field}layout", self.layout, LAYOUTS))
        if self.exchange not in EXCHANGES:
            raise ConfigError(unknown_choice_message(f"{self.field}exchange", self.exchange, EXCHANGES))
        if self.exchange == "logscan" and self.layout != "contiguous":
            raise ConfigError(
                f"{self.field}exchange = 'logscan' needs {self.field}layout = 'contiguous' "
                f"(the scan runs over ranks in sequence order); use {self.field}exchange = 'allgather' with 'zigzag'."
            )

    @property
    def load_balancer(self) -> str | None:
        return LAYOUT_TO_LOAD_BALANCER[self.layout]


def load_balancer_for_layout(layout: str) -> str | None:
    """TorchTitan's ``context_parallel_load_balancer`` that shards sequences in ``layout``."""
    return CPSettings(layout=layout).load_balancer
