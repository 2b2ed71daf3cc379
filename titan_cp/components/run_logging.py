"""Rank-0 logging: info lines once per job, warnings and errors from every rank.

TorchTitan logs through the root logger on every rank, so a 2-rank run prints
each line twice. :func:`rank_zero_logging` adds a filter to the root logger's
handlers that lets through

- every record on the ranks listed in ``LOG_RANK`` (comma separated, default
  ``"0"``; the variable TorchTitan's own launch script and its pipeline
  warning use: ``LOG_RANK=0,3`` also shows rank 3, ``LOG_RANK=all`` every rank);
- records of level WARNING and above on all other ranks, prefixed with the rank.

TorchTitan's step line (loss, grad norm, ...) is the exception: it is shown
from the rank that holds the loss (rank 0; under pipeline parallelism the
first rank of the last stage, which :class:`titan_cp.components.metrics.TitanCPMetricsProcessor`
sets through :func:`set_step_line_rank`) and from no other rank.

The rank is ``RANK`` from the environment (torchrun sets it before Python
starts), so the filter is in place before the process group exists.
``train.py`` installs it right after TorchTitan's ``init_logger`` (which
replaces the handlers); importing :mod:`titan_cp.config_registry` installs it
too, for TorchTitan's native entry point.
"""

from __future__ import annotations

import logging
import os


def logging_ranks() -> set[int] | None:
    """Ranks that log everything (None: all ranks), from ``LOG_RANK``."""
    raw = os.environ.get("LOG_RANK", "0").strip()
    if raw.lower() == "all":
        return None
    return {int(r) for r in raw.split(",") if r.strip()}


_step_line_rank = 0
STEP_LINE_ATTR = "titan_cp_step_line"  # set on TorchTitan's step-line records by titan_cp.components.metrics


def set_step_line_rank(rank: int) -> None:
    """The rank whose step lines are shown (the rank that holds the loss)."""
    global _step_line_rank
    _step_line_rank = rank


class RankFilter(logging.Filter):
    def __init__(self, rank: int, ranks: set[int] | None):
        super().__init__("titan_cp.rank_filter")
        self.rank = rank
        self.all_ranks = ranks is None
        self.verbose = self.all_ranks or rank in ranks

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, STEP_LINE_ATTR, False):
            return self.rank == _step_line_rank or self.all_ranks
        if self.verbose:
            return True
        if record.levelno < logging.WARNING:
            return False
        if not getattr(record, "_titan_cp_ranked", False):
            record.msg = f"[rank {self.rank}] {record.msg}"
            record._titan_cp_ranked = True
        return True


def rank_zero_logging() -> None:
    """Install :class:`RankFilter` on every handler of the root logger (idempotent)."""
    rank = int(os.environ.get("RANK", "0"))
    ranks = logging_ranks()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RankFilter) for f in handler.filters):
            handler.addFilter(RankFilter(rank, ranks))


def init_logger() -> None:
    """TorchTitan's ``init_logger`` followed by :func:`rank_zero_logging`."""
    from torchtitan.tools.logging import init_logger as torchtitan_init_logger

    torchtitan_init_logger()
    rank_zero_logging()


__all__ = ["RankFilter", "init_logger", "logging_ranks", "rank_zero_logging", "set_step_line_rank"]
