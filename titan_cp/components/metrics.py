"""TorchTitan's metrics plus what CP needs: per-rank peak memory and CP bytes per step.

The hook is TorchTitan's own ``MetricsProcessor`` (the trainer calls
``metrics_processor.log(step, loss, max_loss, grad_norm, extra_metrics)`` on
*every* rank at each log step), subclassed here and selected by the config
(``Trainer.Config.metrics = TitanCPMetricsProcessor.Config(...)``); no Trainer
subclass and nothing copied from TorchTitan. :meth:`TitanCPMetricsProcessor.log`

1. reads :data:`titan_cp.cp.comm.comm_stats` (``total()``), divides by the
   steps since the last log and ``reset()``-s it;
2. reads this rank's peak memory from TorchTitan's memory monitor (on CPU
   :class:`titan_cp.components.compat.CpuMemoryMonitor`: peak RSS);
3. all-gathers both over the world group (one small collective per log step),
   adds them to ``extra_metrics`` as ``memory/peak(GiB)/rank{r}``,
   ``cp/bytes_sent_per_step/rank{r}``, ``cp/bytes_received_per_step/rank{r}``,
   ``cp/rounds_per_step/rank{r}`` plus ``.../max`` over ranks, and hands over to
   TorchTitan's ``log`` (TensorBoard/W&B on the metrics rank, console line);
4. on the metrics rank (rank 0; under pipeline parallelism the first rank of
   the last stage, which holds the loss: TorchTitan's ``_get_metrics_rank``)
   appends one JSON line per logged step to
   ``{dump_folder}/{jsonl_file}`` with the exact (repr) loss, grad norm, lr and
   the CP/memory figures: what the tests and scripts parse (the console line
   rounds the loss to 5 digits). The file holds one record per step: the
   first write of a run drops the records of steps at or after its first
   logged step (a resumed run replaces the steps it re-runs; a fresh run in an
   old dump folder starts the file anew).

It also fixes what TorchTitan 0.3.0 gets wrong or leaves out under titan_cp:

- ``max_loss`` under CP. The trainer computes each rank's average as
  ``accumulated_loss * global_valid_tokens / local_valid_tokens``, with
  ``local_valid_tokens`` counted on the *unsharded* labels (before its CP
  sharding), while ``accumulated_loss`` covers only this rank's 1/cp of the
  sequence: every "average" is 1/cp of the shard's real mean (4.09 next to a
  loss of 8.18 at cp 2). :meth:`TitanCPMetricsProcessor.log` multiplies it by
  the CP degree, giving ``max over ranks of shard_loss_sum / (tokens / cp)``:
  the mean loss of the worst shard (with every label valid, as in packed
  rows). It is never below ``loss``: ``loss`` is a token-weighted mean of the
  data-parallel rows' means, each the mean of its cp shard values.
- The step line reads ``step: 12/20 ...  ETA 0:01:23`` (steps from
  ``training.steps``; ETA from the mean time per step since this run's first
  logged step, so compilation and warm-up of step 1 do not count).
- TensorBoard: one folder per run, ``{dump_folder}/{save_tb_folder}/
  YYYYmmdd-HHMMSS[-k]``, created by rank 0 (``-2``, ``-3``, ... if a run
  started in the same second) and broadcast, instead of TorchTitan's
  per-minute name that two runs can share.
- Rank-0 logging (:mod:`titan_cp.components.run_logging`): the step line is marked so
  that it shows from the rank holding the loss (the last pipeline stage under
  PP) and only there.
- A heartbeat watchdog per rank (:mod:`titan_cp.components.watchdog`) that names a rank
  that stopped (``metrics.watchdog_silence_seconds``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.metrics import (
    BaseLogger,
    LoggerContainer,
    MetricsProcessor,
    TensorBoardLogger,
    _get_metrics_rank,
)
from torchtitan.tools.logging import logger

from titan_cp.cp.comm import comm_stats
from titan_cp.components.run_logging import STEP_LINE_ATTR, set_step_line_rank



class TitanCPMetricsProcessor(MetricsProcessor):
    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        log_per_rank: bool = True
        """Log per-rank peak memory and CP bytes/step (one all-gather per log step)."""

        jsonl_file: str | None = "metrics.jsonl"
        """The metrics rank writes one JSON line per logged step here (relative to dump_folder); "" disables."""

        watchdog_silence_seconds: float = 60.0
        """Log an error naming a rank whose heartbeat stopped for this long (0 disables the watchdog)."""

        watchdog_no_step_seconds: float = 1800.0
        """End the run (exit code 3) when no training step began for this long, busy or not (0 disables)."""

    def __init__(self, config: Config, *, dump_folder: str = "./outputs", config_dict=None, **kwargs):
        super().__init__(config, dump_folder=dump_folder, config_dict=config_dict, **kwargs)
        self._metrics_rank = _get_metrics_rank(
            parallel_dims=kwargs["parallel_dims"], pp_schedule=kwargs.get("pp_schedule", "1F1B")
        )
        self._last_logged_step = 0
        self._jsonl = StepJsonl(os.path.join(dump_folder, config.jsonl_file)) if config.jsonl_file else None
        self._total_steps = ((config_dict or {}).get("training") or {}).get("steps")
        self._first_log: tuple[int, float] | None = None  # (step, time) of this run's first log
        pp_schedule = kwargs.get("pp_schedule", "1F1B")
        set_step_line_rank(_get_metrics_rank(parallel_dims=self.parallel_dims, pp_schedule=pp_schedule))
        self._watchdog = None
        if config.watchdog_silence_seconds > 0 and dist.is_available() and dist.is_initialized():
            from titan_cp.components.watchdog import HeartbeatWatchdog

            self._watchdog = HeartbeatWatchdog.start(silence_s=config.watchdog_silence_seconds)
        self._step_watchdog = None
        if config.watchdog_no_step_seconds > 0:
            from titan_cp.components.watchdog import StepWatchdog

            self._step_watchdog = StepWatchdog(config.watchdog_no_step_seconds)

    def should_log(self, step: int) -> bool:
        """TorchTitan asks this at the start of every step: the step watchdog's clock."""
        if self._step_watchdog is not None:
            self._step_watchdog.step_seen(step)
        return super().should_log(step)

    # --- TensorBoard: one folder per run -----------------------------------------------------

    def _build_metric_logger(self, *, config, parallel_dims, dump_folder, pp_schedule, **kwargs) -> BaseLogger:
        base = super()._build_metric_logger(
            config=dataclasses.replace(config, enable_tensorboard=False),
            parallel_dims=parallel_dims, dump_folder=dump_folder, pp_schedule=pp_schedule, **kwargs,
        )
        if not config.enable_tensorboard:
            return base
        run_dir = _run_folder(os.path.join(dump_folder, config.save_tb_folder))
        rank = dist.get_rank() if dist.is_initialized() else 0
        if not config.save_for_all_ranks and rank != _get_metrics_rank(parallel_dims=parallel_dims,
                                                                      pp_schedule=pp_schedule):
            return base
        if kwargs.get("ft_enable"):
            run_dir = os.path.join(run_dir, f"replica_{kwargs.get('ft_replica_id', 0)}")
        if config.save_for_all_ranks:
            run_dir = os.path.join(run_dir, f"rank_{rank}")
        container = base if isinstance(base, LoggerContainer) else LoggerContainer()
        container.add_logger(TensorBoardLogger(run_dir, kwargs.get("tag")))
        return container

    # --- per-rank figures --------------------------------------------------------------------

    def _rank_figures(self, steps: int) -> list[float]:
        """[peak GiB, bytes sent/step, bytes received/step, rounds/step] of this rank."""
        total = comm_stats.total()
        comm_stats.reset()
        mem = self.device_memory_monitor.get_peak_stats()
        steps = max(steps, 1)
        return [
            float(mem.max_reserved_gib),
            total.bytes_sent / steps,
            total.bytes_received / steps,
            total.rounds / steps,
        ]

    def _gather(self, figures: list[float]) -> list[list[float]]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [figures]
        device = getattr(self.device_memory_monitor, "device", torch.device("cpu"))
        local = torch.tensor(figures, dtype=torch.float64, device=device)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return [p.tolist() for p in parts]

    def per_rank_metrics(self, step: int) -> dict[str, float]:
        steps = step - self._last_logged_step
        self._last_logged_step = step
        if not self.config.log_per_rank:
            comm_stats.reset()
            return {}
        rows = self._gather(self._rank_figures(steps))
        names = ("memory/peak(GiB)", "cp/bytes_sent_per_step", "cp/bytes_received_per_step", "cp/rounds_per_step")
        out: dict[str, float] = {}
        for i, name in enumerate(names):
            values = [row[i] for row in rows]
            for rank, v in enumerate(values):
                out[f"{name}/rank{rank}"] = v
            out[f"{name}/max"] = max(values)
        return out

    # --- the log step ------------------------------------------------------------------------

    def _progress(self, step: int) -> tuple[str, str]:
        """("12/20", "  ETA 0:01:23") for the step line; ETA is empty at this run's first log."""
        now = time.perf_counter()
        if self._first_log is None:
            self._first_log = (step, now)
        total = f"/{self._total_steps}" if self._total_steps else ""
        first_step, first_time = self._first_log
        if not self._total_steps or step <= first_step:
            return f"{step}{total}", ""
        eta_s = (now - first_time) / (step - first_step) * max(self._total_steps - step, 0)
        return f"{step}{total}", f"  ETA {timedelta(seconds=round(eta_s))}"

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ):
        # TorchTitan's max_loss under CP is 1/cp of the shard mean (module docstring).
        global_max_loss = global_max_loss * self.parallel_dims.cp
        extra = dict(extra_metrics or {})
        extra.update(self.per_rank_metrics(step))
        if extra.get("cp/bytes_sent_per_step/max", 0) > 0:
            logger.info(
                f"step: {step:2}  cp: {extra['cp/bytes_sent_per_step/max'] / 2**20:.3f} MiB/step sent "
                f"(max over ranks), {extra['cp/rounds_per_step/max']:.0f} rounds/step  "
                f"peak memory (max over ranks): {extra['memory/peak(GiB)/max']:.2f}GiB"
            )
        progress, eta = self._progress(step)
        with _StepLineRewrite(f"step: {step:2}  ", f"step: {progress}  ", eta):
            super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
        if self._jsonl is not None and (not dist.is_initialized() or dist.get_rank() == self._metrics_rank):
            record = {"step": step, "loss": global_avg_loss, "max_loss": global_max_loss, "grad_norm": grad_norm}
            record.update({k: v for k, v in extra.items() if isinstance(v, (int, float))})
            self._jsonl.write(record)

    def close(self):
        if self._step_watchdog is not None:
            self._step_watchdog.stop()
        if self._watchdog is not None:
            self._watchdog.stop()
        super().close()


class _StepLineRewrite(logging.Filter):
    """While active, rewrites TorchTitan's step line: ``old`` -> ``new`` and ``suffix`` appended."""

    def __init__(self, old: str, new: str, suffix: str):
        super().__init__()
        self.old, self.new, self.suffix = old, new, suffix

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and self.old in record.msg and "loss:" in record.msg:
            record.msg = record.msg.replace(self.old, self.new, 1) + self.suffix
            setattr(record, STEP_LINE_ATTR, True)  # shown from the loss-holding rank only
        return True

    def __enter__(self):
        logger.addFilter(self)
        return self

    def __exit__(self, *exc):
        logger.removeFilter(self)


def _run_folder(parent: str) -> str:
    """A new folder ``parent/YYYYmmdd-HHMMSS[-k]`` made by rank 0; every rank gets its name."""
    name = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        os.makedirs(parent, exist_ok=True)
        for k in range(1, 10_000):
            candidate = stamp if k == 1 else f"{stamp}-{k}"
            try:
                os.mkdir(os.path.join(parent, candidate))
            except FileExistsError:
                continue
            name = [candidate]
            break
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return os.path.join(parent, name[0])


class StepJsonl:
    """``metrics.jsonl`` with one record per step.

    The first :meth:`write` of a process keeps only the file's records of
    earlier steps (a resumed run re-runs the steps after its checkpoint; a fresh
    run starts at step 1 and so starts the file anew), rewriting it atomically;
    later writes append.
    """

    def __init__(self, path: str):
        self.path = path
        self._started = False

    def write(self, record: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if not self._started:
            self._started = True
            kept = []
            if os.path.exists(self.path):
                kept = [line for line in _lines(self.path) if json.loads(line)["step"] < record["step"]]
            tmp = f"{self.path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(line + "\n" for line in kept)
            os.replace(tmp, self.path)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def read_metrics_jsonl(path: str) -> dict[int, dict[str, Any]]:
    """Per-step records of a run's ``metrics.jsonl``; raises if a step appears twice."""
    out: dict[int, dict[str, Any]] = {}
    for line in _lines(path):
        rec = json.loads(line)
        step = int(rec["step"])
        if step in out:
            raise ValueError(f"{path}: step {step} is recorded twice")
        out[step] = rec
    return out


__all__ = ["StepJsonl", "TitanCPMetricsProcessor", "read_metrics_jsonl"]
