"""Mamba-2's state-space duality (SSD) scan behind the gated-delta-rule signature.

Per head, with state S [K, V] (K = d_state N, V = head dim P), for every token t
(q_t = C_t, k_t = B_t: [K]; v_t = x_t: [V]; a_t = exp(g_t), g_t = dt_t A <= 0;
beta_t = dt_t):

    S_t = a_t S_{t-1} + beta_t k_t v_t^T          (transition M_t = a_t I: a scalar per head)
    o_t = scale * S_t^T q_t                        (scale 1 unless given)

Mamba-2's skip term D x_t and its gated RMSNorm are token-local and stay in the
layer. A document start at t (``doc_starts[b, t]``) drops a_t: S_t = beta_t k_t v_t^T.
The signature is :class:`titan_cp.ops.gated_delta_rule.interface.GatedDeltaRuleKernel`
(same argument names, layouts and dtypes; ``scale`` None means 1, Mamba-2's), so the
CP engine (titan_cp/cp/state_passing.py) runs it unchanged; only its segment
summary is cheaper: M is one scalar per head (:mod:`titan_cp.ops.mamba2.segment`).
"""

from __future__ import annotations

import torch

from titan_cp.ops.gated_delta_rule.interface import check_inputs

KERNEL_NAMES = ("torch", "recurrent")


def check_ssd_inputs(q, k, v, g, beta, initial_state=None, doc_starts=None) -> None:
    """:func:`check_inputs` of the gated delta rule: the same shapes ([B, T, H] g and beta)."""
    check_inputs(q, k, v, g, beta, initial_state, doc_starts)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


__all__ = ["KERNEL_NAMES", "accumulation_dtype", "check_ssd_inputs"]
