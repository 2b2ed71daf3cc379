"""Run a Python function on P ranks, one process each: the launcher of tests, benchmarks, GPU checks.

Usage (the rank function must be defined at module level so the ``spawn``
start method can pickle it by reference)::

    from titan_cp.testing import run_on_ranks

    def _check(rank, world_size, seq_len):
        group = torch.distributed.group.WORLD   # already initialised (gloo)
        ...                                     # asserts raise -> test fails
        return {"rank": rank, "max_err": 1e-7}  # anything picklable

    def test_something():
        results = run_on_ranks(_check, 4, args=(64,))   # list, index = rank
        assert all(r["max_err"] < 1e-5 for r in results)

What it does, so that a broken rank can never hang or hide a failure:

- Processes start with the ``spawn`` method (no forked torch state). Each sets
  ``torch.set_num_threads(1)`` (``threads``) and the usual env variables
  (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
- Rendezvous: the parent itself hosts a ``TCPStore`` on 127.0.0.1 with port 0,
  so the OS picks a free port atomically (no bind-then-close race with other
  tests running at the same time on the machine); ranks join it as clients
  and call ``init_process_group(backend, store=..., timeout=pg_timeout)``.
  With ``init_process_group=False`` the ranks are left uninitialised (for code
  that initialises itself from the env, e.g. a trainer): MASTER_PORT is then a
  port that was free a moment ago.
- Results travel back pickled to bytes (tensors by value, not shared memory).
- Any exception in any rank is sent back with its traceback; the parent then
  waits a moment for other ranks' errors, kills the rest and raises
  :class:`RankFailure` with every failing rank's traceback. A rank that dies
  without a word (segfault, ``os._exit``) is reported with its exit code.
- ``timeout`` (seconds, whole run) bounds everything: on expiry every rank is
  terminated (then killed) and :class:`RankTimeout` names the ranks that had
  not finished. ``pg_timeout`` bounds each collective inside the ranks.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_on_ranks", "RankFailure", "RankTimeout", "free_port"]

_ERROR_GRACE_S = 2.0  # after a first error, how long to wait for other ranks' errors


class RankFailure(RuntimeError):
    """One or more ranks raised (or died); the message holds their tracebacks."""

    def __init__(self, message: str, failures: dict[int, str]):
        super().__init__(message)
        self.failures = failures


class RankTimeout(TimeoutError):
    """The ranks did not all finish within ``timeout`` seconds."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (racy: prefer the store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    results: Any,
    backend: str,
    pg_timeout_s: float,
    threads: int,
    init: bool,
) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set or parallel work already started
        pass
    initialised = False
    try:
        if init:
            timeout = timedelta(seconds=pg_timeout_s)
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
            initialised = True
        result = fn(rank, world_size, *args, **kwargs)
        payload = pickle.dumps(result)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        results.put((rank, "error", f"{traceback.format_exc()}"))
        return
    finally:
        if initialised or (dist.is_available() and dist.is_initialized()):
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - never mask the real outcome
                pass
    results.put((rank, "ok", payload))


def _stop(processes: list) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5.0)


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    timeout: float = 180.0,
    pg_timeout: float = 60.0,
    backend: str = "gloo",
    threads: int = 1,
    init_process_group: bool = True,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` processes.

    ``fn`` must be a module-level function (picklable by reference) and ``args``
    / ``kwargs`` / its return value picklable. Returns the return values as a
    list indexed by rank. Raises :class:`RankFailure` if any rank raised or
    died, :class:`RankTimeout` if the run took longer than ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"run_on_ranks: world_size must be >= 1, got {world_size}")
    kwargs = dict(kwargs or {})
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = None
    if init_process_group:
        # The parent hosts the rendezvous store: port 0 lets the OS pick a free
        # port atomically, and the store lives exactly as long as this run.
        store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=pg_timeout)
        )
        port = store.port
    else:
        port = free_port()

    processes = []
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, port, tuple(args), kwargs, results, backend, pg_timeout, threads,
                      init_process_group),
                name=f"rank{rank}",
                daemon=True,
            )
            p.start()
            processes.append(p)

        outcomes: dict[int, tuple[str, Any]] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        first_error_at: float | None = None
        silent_exit_seen: dict[int, float] = {}
        while len(outcomes) < world_size:
            now = time.monotonic()
            if first_error_at is not None and now - first_error_at > _ERROR_GRACE_S:
                break
            if now > deadline:
                pending = [r for r in range(world_size) if r not in outcomes]
                _stop(processes)
                raise RankTimeout(
                    f"run_on_ranks({getattr(fn, '__qualname__', fn)}, {world_size}): ranks {pending} did not "
                    f"finish within {timeout:.0f} s (finished: {sorted(outcomes)}); all ranks terminated"
                )
            try:
                rank, status, payload = results.get(timeout=0.1)
                outcomes[rank] = (status, payload)
                if status == "error":
                    failures[rank] = payload
                    first_error_at = first_error_at or time.monotonic()
                continue
            except queue_module.Empty:
                pass
            # A process that exited without reporting (crash, os._exit): give its
            # queue message a moment to arrive, then count it as a failure.
            for rank, p in enumerate(processes):
                if rank in outcomes or p.exitcode is None:
                    continue
                seen = silent_exit_seen.setdefault(rank, time.monotonic())
                if time.monotonic() - seen > 1.0:
                    failures[rank] = f"rank {rank} exited with code {p.exitcode} without reporting a result"
                    outcomes[rank] = ("error", failures[rank])
                    first_error_at = first_error_at or time.monotonic()

        if failures:
            _stop(processes)
            parts = [f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures)]
            raise RankFailure(
                f"run_on_ranks({getattr(fn, '__qualname__', fn)}, {world_size}): "
                f"{len(failures)} rank(s) failed: {sorted(failures)}\n" + "\n".join(parts),
                failures,
            )
        for p in processes:
            p.join(max(1.0, deadline - time.monotonic()))
        return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
    finally:
        _stop(processes)
        results.close()
        del store
