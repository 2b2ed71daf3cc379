"""Name the rank that stopped: a heartbeat per rank, watched by its ring neighbour.

When one rank stops (``SIGSTOP``, a frozen host, a process swapped out), the
others block in their next collective until ``comm.train_timeout_seconds``
(``comm.init_timeout_seconds`` before the first step) and then fail with an
error that names *themselves*; torchrun then reports a healthy rank as the
root cause. Here every rank runs a daemon thread that, every ``interval_s``:

1. increments its counter ``titan_cp/heartbeat/{rank}`` in the process group's
   store (torchrun's rendezvous store, hosted by the agent, so it outlives a
   stopped rank; ``store.add`` is atomic and never blocks on a missing key);
2. reads the counter of rank ``(rank + 1) % world`` (a ring: O(1) store
   traffic per rank at any scale, and every rank is watched by exactly one);
3. if that counter has not moved for ``silence_s`` seconds, logs one ERROR
   (shown from any rank) naming the silent rank with its host and pid.

A rank that is merely slow or blocked in a collective keeps beating (the
thread needs only the GIL, which torch releases inside its ops), so the error
singles out ranks whose whole process stopped or died. Pick ``silence_s``
below ``comm.train_timeout_seconds`` so the name is printed before the
collectives fail (titan_cp's default: 60 s vs TorchTitan's 100 s).

A rank can also be busy and never step (a data loader re-looping a dataset
that yields no rows, a wedged start-up loop): it keeps beating, so step 3
does not fire. :class:`StepWatchdog` covers that: the trainer's per-step
``should_log(step)`` call (titan_cp's metrics processor) calls
:meth:`StepWatchdog.step_seen`; a thread checks every ``interval_s`` and, if
no step began for ``no_step_s`` seconds (counted from the watchdog's start,
so the first step's set-up counts), logs an ERROR naming
``metrics.watchdog_no_step_seconds`` and ends the process with exit code 3
(``os._exit``: a busy main thread never returns to check a flag). It runs on
every rank, also in a 1-rank run.

Tested in ``tests/integration/test_watchdog.py`` (2 ranks, one SIGSTOPs itself) and
``tests/unit/test_data_formats.py`` (a busy loop that never steps). Checked
by hand with the trainer: ``torchrun --nproc_per_node=2 train.py
--job.config_file train_configs/cp2.toml --training.steps 200
--comm.train_timeout_seconds 30 --metrics.watchdog_silence_seconds 10``, then
``kill -STOP`` of rank 1's process after step 5: 10 s later rank 0 logged
"rank 1 (host ..., pid ...) has sent no heartbeat for 10 s ...", and at 30 s
its collective failed with gloo's "Timed out waiting 30000ms".
"""

from __future__ import annotations

import os
import socket
import threading
import time

import torch.distributed as dist
from torchtitan.tools.logging import logger

_PREFIX = "titan_cp/heartbeat"


class HeartbeatWatchdog:
    def __init__(self, store, rank: int, world: int, silence_s: float, interval_s: float):
        self.store, self.rank, self.world = store, rank, world
        self.silence_s, self.interval_s = silence_s, interval_s
        self.peer = (rank + 1) % world
        self._stop = threading.Event()
        store.set(f"{_PREFIX}/info/{rank}", f"host {socket.gethostname()}, pid {os.getpid()}")
        store.add(f"{_PREFIX}/{rank}", 1)
        self._thread = threading.Thread(target=self._run, name="titan_cp-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, silence_s: float, interval_s: float | None = None) -> HeartbeatWatchdog | None:
        """Start this rank's heartbeat and watch its neighbour; None without a process group of 2+ ranks."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        store = dist.distributed_c10d._get_default_store()
        interval_s = interval_s if interval_s is not None else min(5.0, silence_s / 4)
        return cls(store, dist.get_rank(), dist.get_world_size(), silence_s, interval_s)

    def peer_info(self) -> str:
        key = f"{_PREFIX}/info/{self.peer}"
        return self.store.get(key).decode() if self.store.check([key]) else "host and pid unknown"

    def _run(self) -> None:
        last_count, last_change, reported = None, time.monotonic(), False
        try:
            while not self._stop.wait(self.interval_s):
                self.store.add(f"{_PREFIX}/{self.rank}", 1)
                count = self.store.add(f"{_PREFIX}/{self.peer}", 0)
                now = time.monotonic()
                if count != last_count:
                    if reported:
                        logger.warning(f"rank {self.peer} is sending heartbeats again")
                    last_count, last_change, reported = count, now, False
                elif not reported and now - last_change > self.silence_s:
                    reported = True
                    logger.error(
                        f"rank {self.peer} ({self.peer_info()}) has sent no heartbeat for "
                        f"{now - last_change:.0f} s: that process is stopped (SIGSTOP), frozen or dead. "
                        f"Collectives waiting on it fail after comm.train_timeout_seconds; "
                        f"the other ranks' timeout errors are a consequence. Look at rank {self.peer} first."
                    )
        except Exception as e:  # noqa: BLE001 - the store went away (shutdown): stop watching quietly
            logger.debug(f"heartbeat watchdog stopped: {e}")

    def stop(self) -> None:
        self._stop.set()


class StepWatchdog:
    """Ends a process whose training loop has not begun a step for ``no_step_s`` seconds (busy or not)."""

    EXIT_CODE = 3

    def __init__(self, no_step_s: float, interval_s: float | None = None, exit_fn=None):
        self.no_step_s = no_step_s
        self.interval_s = interval_s if interval_s is not None else max(0.05, min(5.0, no_step_s / 10))
        self._exit = exit_fn or os._exit
        self._last_step, self._last_time = None, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="titan_cp-step-watchdog", daemon=True)
        self._thread.start()

    def step_seen(self, step: int) -> None:
        """The training loop began ``step`` (called once per step)."""
        if step != self._last_step:
            self._last_step, self._last_time = step, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            quiet = time.monotonic() - self._last_time
            if quiet > self.no_step_s:
                where = "before the first step" if self._last_step is None else f"after step {self._last_step}"
                logger.error(
                    f"no training step began for {quiet:.0f} s ({where}) although this process is alive "
                    f"(pid {os.getpid()}): the run is busy without progress (e.g. a data loader re-looping a "
                    f"dataset that yields no rows). Ending it. Check dataloader.dataset_path with "
                    f"`titan_cp data-report`, or raise metrics.watchdog_no_step_seconds "
                    f"(now {self.no_step_s:g}; 0 disables) if steps are really this slow."
                )
                self._exit(self.EXIT_CODE)
                return

    def stop(self) -> None:
        self._stop.set()


__all__ = ["HeartbeatWatchdog", "StepWatchdog"]
