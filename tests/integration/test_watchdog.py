"""A stopped rank is named: rank 1 SIGSTOPs itself, rank 0's heartbeat watchdog must name it.

Two gloo ranks (run_on_ranks; the parent hosts the store, as torchrun's agent
does). Both start :class:`titan_cp.components.watchdog.HeartbeatWatchdog` with a 1 s
silence limit; rank 0 first checks that a healthy peer is never reported,
then rank 1 stops itself with SIGSTOP and rank 0 waits for the error naming
rank 1's pid, sends SIGCONT, and both finish with a collective (so rank 1
really was stopped, not gone).
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch
import torch.distributed as dist

from titan_cp.testing import run_on_ranks

SILENCE_S = 1.0


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _stop_one_rank(rank: int, world: int) -> dict:
    from titan_cp.components.watchdog import HeartbeatWatchdog

    errors = _Errors()
    logging.getLogger().addHandler(errors)
    dog = HeartbeatWatchdog.start(silence_s=SILENCE_S, interval_s=0.1)
    dist.barrier()
    time.sleep(4 * SILENCE_S)  # both alive: nobody may be reported
    healthy_errors = list(errors.messages)
    dist.barrier()
    out = {"healthy_errors": healthy_errors, "pid": os.getpid()}
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # resumes when rank 0 sends SIGCONT
    else:
        deadline = time.monotonic() + 60
        while not errors.messages and time.monotonic() < deadline:
            time.sleep(0.1)
        out["errors"] = list(errors.messages)
        peer_pid = int(dog.peer_info().rsplit("pid ", 1)[1])
        os.kill(peer_pid, signal.SIGCONT)
    dist.all_reduce(torch.ones(1))  # rank 1 is back
    dog.stop()
    return out


def test_stopped_rank_is_named():
    results = run_on_ranks(_stop_one_rank, 2, timeout=180, pg_timeout=120)
    assert results[0]["healthy_errors"] == [] and results[1]["healthy_errors"] == []
    errors = results[0]["errors"]
    assert len(errors) == 1, errors
    assert "rank 1 (host " in errors[0] and f"pid {results[1]['pid']})" in errors[0], errors[0]
    assert "stopped" in errors[0]
