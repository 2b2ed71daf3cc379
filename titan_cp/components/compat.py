"""Workarounds that let TorchTitan 0.3.0 run on a CPU-only torch 2.13 (gloo ranks).

Everything titan_cp patches in TorchTitan or torch lives here, applied by one
idempotent :func:`apply` (``train.py`` and ``titan_cp.config_registry`` call it;
calling it again is a no-op). Each item says what it fixes and when it can go.
On a machine with an accelerator the device items do nothing, and the others
only act on gloo (CPU) process groups, so GPU runs see stock TorchTitan.

Items:

1. ``device_type``: ``torchtitan/tools/utils.py`` falls back to
   ``device_type = "cuda"`` / ``torch.cuda`` when no accelerator is found, and
   ``distributed/utils.py``, ``distributed/parallel_dims.py``,
   ``components/metrics.py``, ``tools/profiler.py``,
   ``models/common/token_dispatcher.py`` copy those names at import time. We
   set ``"cpu"`` / ``torch.cpu`` in each of them; the process group then gets
   ``gloo`` (``Backend.default_device_backend_map["cpu"]``), meshes are CPU
   meshes and batches stay on the CPU. Can go when TorchTitan detects CPU
   itself (``_get_available_device_type() or "cpu"``).
2. Memory metrics: ``components/metrics.py``'s ``DeviceMemoryMonitor`` calls
   ``torch.cuda`` memory stats. On CPU we build :class:`CpuMemoryMonitor`
   instead: process peak RSS (``VmHWM`` from ``/proc/self/status``, falling back
   to ``resource.getrusage``), reset per log step through
   ``/proc/self/clear_refs`` where the kernel allows it. It reports through
   the same ``DeviceMemStats`` fields, so ``memory/max_reserved(GiB)`` etc. in
   the log and TensorBoard are the rank's peak RSS. Can go when TorchTitan
   has a CPU memory monitor.
3. ``torch.distributed.set_timeout``: TorchTitan calls it after the first
   step (``dist_utils.set_pg_timeouts``); torch 2.13 has only the private
   ``distributed_c10d._set_pg_timeout``. We add a public alias that forwards
   to it. Can go when torch ships ``set_timeout``.
4. ``set_pg_timeouts``' barrier passes ``device_ids=[device_module.current_device()]``,
   which is the string ``"cpu"`` on CPU; ``BarrierOptions`` then raises
   ``TypeError: incompatible function arguments``. We
   wrap ``torch.distributed.barrier`` to drop ``device_ids`` on gloo groups
   only. Can go with item 1 (TorchTitan guarding device_ids for CPU).
5. FSDP reduce op: TorchTitan sets ``gradient_divide_factor = 1.0`` on every
   FSDP module (it normalises the loss by the global token count itself), and
   FSDP2 then reduce-scatters with ``ReduceOp.PREMUL_SUM(1.0)``, which gloo
   rejects. We extend ``FSDPModule.set_gradient_divide_factor`` to also call
   ``set_force_sum_reduction_for_comms(True)`` when the module's mesh is a
   CPU mesh, i.e. gloo (plain SUM plus a no-op scale: same numbers; without
   it backward fails with "Cannot use ReduceOp.PREMUL_SUM with Gloo"). Can go when gloo
   supports PREMUL_SUM or FSDP picks SUM for gloo itself. Note: a
   parallelize function must call TorchTitan's
   ``torchtitan.distributed.fsdp.disable_fsdp_gradient_division`` (or
   ``set_gradient_divide_factor(1.0)``) after ``fully_shard``, as TorchTitan's
   own models do; that is also what makes the loss scaling right.
6. ``spmd_backend``: TorchTitan's default ``spmd_types`` backend builds no
   ``fsdp`` mesh (``parallelize_gdn`` needs it: "Invalid mesh dim: 'fsdp'")
   and fails with FSDP > 1 on CPU; titan_cp's configs set
   ``parallelism.spmd_backend = "partial_dtensor"`` and the TOML front end
   rejects the others (config, not patched here; listed for completeness).
7. CUDA graphs: TorchTitan captures fwd+bwd in a CUDA graph unless
   ``training.disable_cuda_graphs``. On CPU it already falls back to eager; on
   GPU a replayed graph would skip the Python-side CP byte counters
   (:mod:`titan_cp.cp.comm`), so titan_cp's configs set
   ``disable_cuda_graphs = True`` (config, not patched here).
8. MFU: ``tools/utils.py: get_peak_flops`` runs ``lspci`` and, for an
   unknown device, falls back to the A100's 312 TFLOP/s. On CPU we return
   200 GFLOP/s per torch thread (the fp32 large-matmul rate measured on the
   CPU machines this project's CI runs on) so ``mfu(%)`` is meaningful. Can go with item 1.
9. ``triton`` must be importable for ``import torchtitan.trainer``
   (``distributed/minimal_async_ep/kernels.py`` imports it at module level).
   Not patchable from here: install ``triton`` (CPU wheel is fine).

10. Pipeline schedules: TorchTitan 0.3.0's trainer calls
   ``pp_schedule.step(arg_mbs=..., kwarg_mbs=..., target_mbs=..., losses=...,
   loss_kwargs=..., return_outputs=False)`` with microbatches it split itself
   (the newer torch API); torch 2.13's ``step`` only takes the whole batch and
   would treat those lists as model kwargs ("Expecting 4 arg_mbs but got 1").
   We let ``step`` of the single- and multi-stage schedules accept the
   pre-split form and hand it to their own ``_step_microbatches`` (what
   ``step`` does after splitting). Can go when torch's ``step`` takes them.

Nothing else is copied from TorchTitan: trainer loop, optimizer, LR schedule,
DCP checkpoints and metrics are TorchTitan's own.
"""

from __future__ import annotations

import os
import resource
import sys

import torch

_APPLIED = False


def on_cpu() -> bool:
    """True when torch sees no accelerator (TorchTitan would then assume CUDA)."""
    from torch._utils import _get_available_device_type

    return _get_available_device_type() is None


# --- item 1: device type ----------------------------------------------------------------------

_DEVICE_MODULES = (
    "torchtitan.tools.utils",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.components.metrics",
    "torchtitan.tools.profiler",
    "torchtitan.models.common.token_dispatcher",
)


def _patch_device_type() -> None:
    import importlib

    for name in _DEVICE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a module TorchTitan dropped: nothing to patch there
            continue
        if getattr(mod, "device_type", None) == "cuda":
            mod.device_type = "cpu"
        if getattr(mod, "device_module", None) is torch.cuda:
            mod.device_module = torch.cpu


# --- item 2: memory monitor -------------------------------------------------------------------


def _read_proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (since start or the last reset), bytes."""
    kib = _read_proc_status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if sys.platform == "darwin":
            kib //= 1024
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CpuMemoryMonitor:
    """Drop-in for TorchTitan's ``DeviceMemoryMonitor`` reporting process peak RSS."""

    def __init__(self, device: str = "cpu"):
        self.device = torch.device("cpu")
        self.device_name = "cpu"
        self.device_index = 0
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 0
        self.device_capacity = total or 1
        self.device_capacity_gib = self.device_capacity / 2**30
        self.reset_peak_stats()

    def _to_gib(self, memory_in_bytes):
        return memory_in_bytes / 2**30

    def _to_pct(self, memory):
        return 100 * memory / self.device_capacity

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        peak = peak_rss_bytes()
        current = (_read_proc_status_kib("VmRSS") or 0) * 1024
        return DeviceMemStats(
            self._to_gib(current),  # max_active: RSS now
            self._to_pct(current),
            self._to_gib(peak),  # max_reserved: peak RSS since the last reset
            self._to_pct(peak),
            0,
            0,
        )

    def reset_peak_stats(self):
        reset_peak_rss()


def _patch_memory_monitor() -> None:
    from torchtitan.components import metrics

    def build_device_memory_monitor():
        monitor = CpuMemoryMonitor()
        metrics.logger.info(
            f"CPU capacity: {monitor.device_capacity_gib:.2f}GiB host memory "
            "(memory metrics report this rank's peak RSS)"
        )
        return monitor

    build_device_memory_monitor._titan_cp_compat = True  # type: ignore[attr-defined]
    metrics.build_device_memory_monitor = build_device_memory_monitor


# --- item 8: peak FLOP/s for MFU ---------------------------------------------------------------

CPU_PEAK_FLOPS_PER_THREAD = 200e9


def _patch_peak_flops() -> None:
    from torchtitan.tools import utils

    original = utils.get_peak_flops
    if getattr(original, "_titan_cp_compat", False):
        return

    def get_peak_flops(device_name: str) -> float:
        if device_name == "cpu":
            return CPU_PEAK_FLOPS_PER_THREAD * torch.get_num_threads()
        return original(device_name)

    get_peak_flops._titan_cp_compat = True  # type: ignore[attr-defined]
    utils.get_peak_flops = get_peak_flops


# --- item 3: torch.distributed.set_timeout ----------------------------------------------------


def _patch_set_timeout() -> None:
    import torch.distributed as dist

    if hasattr(dist, "set_timeout"):
        return
    from torch.distributed import distributed_c10d as c10d

    def set_timeout(timeout, group=None):
        """Shim (titan_cp.components.compat): forwards to ``distributed_c10d._set_pg_timeout``."""
        c10d._set_pg_timeout(timeout, group)

    dist.set_timeout = set_timeout


# --- item 4: barrier(device_ids=...) on gloo --------------------------------------------------


def _is_gloo(group=None) -> bool:
    import torch.distributed as dist

    try:
        return dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):
        return False


def _patch_barrier() -> None:
    import torch.distributed as dist

    original = dist.barrier
    if getattr(original, "_titan_cp_compat", False):
        return

    def barrier(group=None, async_op=False, device_ids=None):
        if device_ids is not None and _is_gloo(group):
            device_ids = None
        return original(group=group, async_op=async_op, device_ids=device_ids)

    barrier._titan_cp_compat = True  # type: ignore[attr-defined]
    barrier.__wrapped__ = original  # type: ignore[attr-defined]
    dist.barrier = barrier


# --- item 5: FSDP PREMUL_SUM on gloo ----------------------------------------------------------


def _patch_fsdp_divide_factor() -> None:
    from torch.distributed.fsdp import FSDPModule

    original = FSDPModule.set_gradient_divide_factor
    if getattr(original, "_titan_cp_compat", False):
        return

    def set_gradient_divide_factor(self, factor: float) -> None:
        original(self, factor)
        state = self._get_fsdp_state()
        groups = state._fsdp_param_groups
        # CPU meshes run on gloo (the only CPU backend TorchTitan sets up)
        if groups and groups[0].mesh_info.mesh.device_type == "cpu":
            self.set_force_sum_reduction_for_comms(True)

    set_gradient_divide_factor._titan_cp_compat = True  # type: ignore[attr-defined]
    set_gradient_divide_factor.__wrapped__ = original  # type: ignore[attr-defined]
    FSDPModule.set_gradient_divide_factor = set_gradient_divide_factor


# --- item 10: pipeline schedules take pre-split microbatches ------------------------------------


def _patch_pipeline_step() -> None:
    import inspect

    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

    for cls in (PipelineScheduleSingle, PipelineScheduleMulti):
        original = cls.step
        if getattr(original, "_titan_cp_compat", False) or "arg_mbs" in inspect.signature(original).parameters:
            continue

        def step(self, *args, arg_mbs=None, kwarg_mbs=None, target_mbs=None, _original=original, **kwargs):
            if arg_mbs is None and kwarg_mbs is None and target_mbs is None:
                return _original(self, *args, **kwargs)
            stages = self._stages if hasattr(self, "_stages") else [self._stage]
            for stage in stages:
                stage.has_backward = self._has_backward
                stage.clear_runtime_states()
            return_outputs = kwargs.get("return_outputs", True)
            self._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, kwargs.get("losses"), return_outputs,
                                    loss_kwargs=kwargs.get("loss_kwargs"))
            for stage in stages:
                if stage.is_last and return_outputs:
                    return self._merge_outputs(stage.output_chunks)
            return None

        step._titan_cp_compat = True  # type: ignore[attr-defined]
        step.__wrapped__ = original  # type: ignore[attr-defined]
        cls.step = step


def apply() -> None:
    """Apply every workaround that this machine needs. Idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_set_timeout()
    _patch_barrier()
    _patch_fsdp_divide_factor()
    _patch_pipeline_step()
    if on_cpu():
        _patch_device_type()
        _patch_memory_monitor()
        _patch_peak_flops()
    _APPLIED = True


__all__ = ["CpuMemoryMonitor", "apply", "on_cpu", "peak_rss_bytes", "reset_peak_rss"]
