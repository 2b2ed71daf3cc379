"""The one owner of a job's CP choices: the layout, the exchange, what the backward keeps, the load balancer.

``[parallelism] cp_layout`` / ``cp_exchange`` / ``cp_q_transition`` (TOML), the
model config's fields of the same names and ``cp_context(layout=, exchange=,
q_transition=)`` all mean :class:`CPSettings`; it names the valid choices and
checks their combination once (``CPContext`` and the start-up checks both
construct it).

- ``layout``: which sequence segments a CP rank holds (titan_cp.cp.layout):
  ``contiguous`` (rank r: segment r of P) or ``zigzag`` (rank r: segments
  r and 2P-1-r of 2P, balancing causal attention work).
- ``exchange``: how linear-attention layers pass state across segments:
  ``allgather`` / ``logscan`` (state passing, titan_cp.cp.state_passing) or
  ``alltoall`` (head-parallel, titan_cp.cp.head_parallel).
- ``q_transition``: what state passing keeps of q_t M_<=t ([T, Hv, K] float32 per
  GDN layer, the shard's transition seen from every query; the backward's
  G = (q M)^T dO needs it): ``recompute`` (the default: not kept, the segment
  kernel recomputes it in the backward from the context it saves anyway, so a CP
  rank keeps what one rank keeps for its tokens) or ``keep`` (saved from the
  forward: 4 Hv K bytes more per token and GDN layer on every rank with a
  predecessor, one transition forward less in the backward; the faster choice
  where memory allows). Like activation checkpointing it trades memory for time;
  under full activation checkpointing only the layer being recomputed holds it,
  so the two differ by one layer's worth. Only state passing has q M: with CP
  degree 1 or ``alltoall`` the setting does nothing, and setting it is an error
  (:meth:`CPSettings.unused_q_transition`).
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
Q_TRANSITIONS = ("recompute", "keep")
LAYOUT_TO_LOAD_BALANCER: dict[str, str | None] = {"contiguous": None, "zigzag": "headtail"}


@dataclass(frozen=True)
class CPSettings:
    """A valid (layout, exchange, q_transition) choice; ``field`` prefixes the names in error messages."""

    layout: str = "contiguous"
    exchange: str = "allgather"
    q_transition: str = "recompute"
    field: str = "parallelism.cp_"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(unknown_choice_message(f"{self.field}layout", self.layout, LAYOUTS))
        if self.exchange not in EXCHANGES:
            raise ConfigError(unknown_choice_message(f"{self.field}exchange", self.exchange, EXCHANGES))
        if self.q_transition not in Q_TRANSITIONS:
            raise ConfigError(unknown_choice_message(f"{self.field}q_transition", self.q_transition, Q_TRANSITIONS))
        if self.exchange == "logscan" and self.layout != "contiguous":
            raise ConfigError(
                f"{self.field}exchange = 'logscan' needs {self.field}layout = 'contiguous' "
                f"(the scan runs over ranks in sequence order); use {self.field}exchange = 'allgather' with 'zigzag'."
            )

    @property
    def load_balancer(self) -> str | None:
        return LAYOUT_TO_LOAD_BALANCER[self.layout]

    def unused_q_transition(self, cp_degree: int) -> str | None:
        """Why ``q_transition`` does nothing in a run of CP degree ``cp_degree`` (None: it is used)."""
        name = f"{self.field}q_transition = {self.q_transition!r}"
        if cp_degree <= 1:
            return (f"{name} has no effect with parallelism.context_parallel_degree = {cp_degree} (without CP "
                    f"there is no q M to keep or recompute); remove it, or set context_parallel_degree > 1.")
        if self.exchange == "alltoall":
            return (f"{name} has no effect with {self.field}exchange = 'alltoall' (head-parallel CP runs whole "
                    f"sequences of fewer heads: no shard transitions, no q M); remove it, or use "
                    f"{self.field}exchange = 'allgather' or 'logscan'.")
        return None


def load_balancer_for_layout(layout: str) -> str | None:
    """TorchTitan's ``context_parallel_load_balancer`` that shards sequences in ``layout``."""
    return CPSettings(layout=layout).load_balancer
