"""TorchTitan's metrics plus what CP needs: per-rank peak memory and CP bytes per step.

The hook is TorchTitan's own ``MetricsProcessor`` (the trainer calls
``metrics_processor.log(step, loss, max_loss, grad_norm, extra_metrics)`` on
*every* rank at each log step), subclassed here and selected by the config
(``Trainer.Config.metrics = TitanCPMetricsProcessor.Config(...)``); no Trainer
subclass and nothing copied from TorchTitan. :meth:`TitanCPMetricsProcessor.log`

1. reads :data:`titan_cp.cp.stats.comm_stats` (``total()``), divides by the
   steps since the last log and ``reset()``-s it;
2. reads this rank's peak memory from TorchTitan's memory monitor (on CPU
   :class:`titan_cp.compat.CpuMemoryMonitor`: peak RSS);
3. all-gathers both over the world group (one small collective per log step),
   adds them to ``extra_metrics`` as ``memory/peak(GiB)/rank{r}``,
   ``cp/bytes_sent_per_step/rank{r}``, ``cp/bytes_received_per_step/rank{r}``,
   ``cp/rounds_per_step/rank{r}`` plus ``.../max`` over ranks, and hands over to
   TorchTitan's ``log`` (TensorBoard/W&B on the metrics rank, console line);
4. on rank 0 appends one JSON line per logged step to
   ``{dump_folder}/{jsonl_file}`` with the exact (repr) loss, grad norm, lr and
   the CP/memory figures: what the tests and scripts parse (the console line
   rounds the loss to 5 digits).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.tools.logging import logger

from titan_cp.cp.stats import comm_stats

_GIB = 2**30


class TitanCPMetricsProcessor(MetricsProcessor):
    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        log_per_rank: bool = True
        """Log per-rank peak memory and CP bytes/step (one all-gather per log step)."""

        jsonl_file: str | None = "metrics.jsonl"
        """Rank 0 appends one JSON line per logged step here (relative to dump_folder); "" disables."""

    def __init__(self, config: Config, *, dump_folder: str = "./outputs", **kwargs):
        super().__init__(config, dump_folder=dump_folder, **kwargs)
        self._last_logged_step = 0
        self._jsonl_path = (
            os.path.join(dump_folder, config.jsonl_file) if config.jsonl_file else None
        )

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

    def log(
        self,
        step: int,
        global_avg_loss: float,
        global_max_loss: float,
        grad_norm: float,
        extra_metrics: dict[str, Any] | None = None,
    ):
        extra = dict(extra_metrics or {})
        extra.update(self.per_rank_metrics(step))
        if extra.get("cp/bytes_sent_per_step/max", 0) > 0:
            logger.info(
                f"step: {step:2}  cp: {extra['cp/bytes_sent_per_step/max'] / 2**20:.3f} MiB/step sent "
                f"(max over ranks), {extra['cp/rounds_per_step/max']:.0f} rounds/step  "
                f"peak memory (max over ranks): {extra['memory/peak(GiB)/max']:.2f}GiB"
            )
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
        self._append_jsonl(step, global_avg_loss, global_max_loss, grad_norm, extra)

    def _append_jsonl(self, step, loss, max_loss, grad_norm, extra: dict[str, Any]) -> None:
        if self._jsonl_path is None:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        record = {"step": step, "loss": loss, "max_loss": max_loss, "grad_norm": grad_norm}
        for k, v in extra.items():
            if isinstance(v, (int, float)):
                record[k] = v
        os.makedirs(os.path.dirname(self._jsonl_path) or ".", exist_ok=True)
        with open(self._jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics_jsonl(path: str) -> dict[int, dict[str, Any]]:
    """Per-step records of a run's ``metrics.jsonl`` (a resumed run's later lines win)."""
    out: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out[int(rec["step"])] = rec
    return out


__all__ = ["TitanCPMetricsProcessor", "read_metrics_jsonl"]
