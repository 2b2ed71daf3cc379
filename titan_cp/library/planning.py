"""Before launching: per-rank memory of a GDN LM or a Qwen3.5 model without and with CP, and what fits a budget.

A thin front to the analytic estimator (``titan_cp/analysis/memory.py``, every term
documented there; Qwen3.5 dense / MoE in ``analysis/qwen3_5_memory.py``) with the
kernel's measured profile (``analysis/profiles.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from titan_cp.analysis.memory import MemoryEstimate, estimate_memory, max_seq_len
from titan_cp.analysis.train_setup import Parallelism, TrainSetup
from titan_cp.analysis.profiles import kernel_profile
from titan_cp.analysis.qwen3_5_memory import is_qwen3_5


@dataclass(frozen=True)
class CPMemoryEstimate:
    """Per-rank peak bytes at ``seq_len`` with CP = 1 and CP = ``cp`` (same dp, tp, batch)."""

    seq_len: int
    cp: int
    without_cp: float  # bytes per rank, CP = 1
    with_cp: float  # bytes per rank, CP = cp
    max_seq_len_without_cp: int | None  # longest seq_len within budget_bytes (None: no budget given)
    max_seq_len_with_cp: int | None
    budget_bytes: float | None
    details_without_cp: MemoryEstimate
    details_with_cp: MemoryEstimate

    @property
    def savings(self) -> float:
        """Bytes per rank that CP saves."""
        return self.without_cp - self.with_cp

    @property
    def reduction(self) -> float:
        """without_cp / with_cp (CP = P gives at most ~P: parameters and fixed buffers do not shrink)."""
        return self.without_cp / self.with_cp


def estimate_cp_memory(
    model,
    seq_len: int,
    cp: int,
    *,
    dp: int = 1,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
    batch: int = 1,
    param_dtype: str = "fp32",
    act_dtype: str = "bf16",
    activation_checkpointing: bool = False,
    budget_gib: float | None = None,
) -> CPMemoryEstimate:
    """Memory of ``model``: a ``GDNModel.Config`` (``titan_cp.model_config("340M")``) or a TorchTitan
    Qwen3.5 config (``titan_cp.models.qwen3_5.flavors.torchtitan_config("35B-A3B")``, dense or MoE).

    FSDP shards parameters over dp x cp (as TorchTitan does; MoE experts over ep x
    dp cp tp / ep); ``pp`` stages split the layers (Qwen3.5). The kernel, exchange and
    layout are the model config's (``kernel``, ``cp_exchange``, ``cp_layout``, ``cp_q_transition``; a
    TorchTitan Qwen3.5 config without them: FLA's kernel, allgather, contiguous, recompute).
    ``budget_gib``: also the longest sequence that fits, with and without CP.
    """
    qwen = is_qwen3_5(model)
    profile = None if qwen else kernel_profile(model.kernel, model, act_dtype)
    setup = TrainSetup(
        seq_len=seq_len, batch=batch, param_dtype=param_dtype, act_dtype=act_dtype,
        ac="full" if activation_checkpointing else "none",
        cp_exchange=getattr(model, "cp_exchange", "allgather"), cp_layout=getattr(model, "cp_layout", "contiguous"),
        cp_q_transition=getattr(model, "cp_q_transition", "recompute"),
        microbatches=max(1, pp) if pp > 1 else 1, **({} if qwen else profile.setup),
    )
    calibration = None if qwen else profile.calibration
    one, many = (Parallelism(dp=dp, tp=tp, cp=c, ep=ep, pp=pp) for c in (1, cp))
    without = estimate_memory(model, setup, one, calibration=calibration)
    with_cp = estimate_memory(model, setup, many, calibration=calibration)
    budget = None if budget_gib is None else budget_gib * 2**30
    fits = [None if budget is None else max_seq_len(budget, model, setup, par, calibration)
            for par in (one, many)]
    return CPMemoryEstimate(seq_len, cp, without.total, with_cp.total, fits[0], fits[1], budget, without, with_cp)
