"""The one interface every gated-delta-rule kernel implements, and its input checks.

The gated delta rule (GDN) keeps a matrix state ``S`` of shape [K, V] per head
and, for every token t (q_t, k_t: [K]; v_t: [V]; a_t = exp(g_t); beta_t),

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

A document start at t (``doc_starts[b, t]`` True) forgets everything before it:
the first factor is dropped, S_t = beta_t k_t v_t^T. ``initial_state`` is
S_{-1}, the state each row continues from; a document start at t = 0 drops it
too. Document starts are how packed sequences and context-parallel shards that
begin a new document are expressed: the state never leaks across them.

Every kernel has the signature of :class:`GatedDeltaRuleKernel`:

    o, final_state = kernel(q, k, v, g, beta, scale=..., initial_state=...,
                            output_final_state=..., doc_starts=...)

    q, k:          [B, T, H, K]  (q, k already L2-normalised by the layer)
    v:             [B, T, H, V]
    g:             [B, T, H]     log decay, g <= 0
    beta:          [B, T, H]     in (0, 1)
    initial_state: [B, H, K, V]  float32 or None (zeros)
    doc_starts:    [B, T] bool   or None (one document per row)
    o:             [B, T, H, V]  dtype of v
    final_state:   [B, H, K, V]  float32, or None unless output_final_state

The kernels and how to pick one by name: :mod:`titan_cp.ops.gated_delta_rule`.
"""

from __future__ import annotations

from typing import Protocol

import torch

KERNEL_NAMES = ("torch", "recurrent", "triton")


class GatedDeltaRuleKernel(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        *,
        scale: float | None = None,
        initial_state: torch.Tensor | None = None,
        output_final_state: bool = False,
        doc_starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def check_inputs(q, k, v, g, beta, initial_state=None, doc_starts=None) -> None:
    """Validate shapes and dtypes; raise ValueError naming the offending tensor."""
    if q.dim() != 4:
        raise ValueError(f"gated delta rule: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    expected = {
        "k": (k, (B, T, H, K)),
        "g": (g, (B, T, H)),
        "beta": (beta, (B, T, H)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"gated delta rule: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                f"from q [B, T, H, K] = {tuple(q.shape)}"
            )
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(
            f"gated delta rule: v has shape {tuple(v.shape)}, expected [B, T, H, V] = "
            f"({B}, {T}, {H}, V) from q {tuple(q.shape)}"
        )
    V = v.shape[-1]
    for name, tensor in (("k", k), ("v", v)):
        if tensor.dtype != q.dtype:
            raise ValueError(
                f"gated delta rule: q, k, v must share one dtype; q is {q.dtype}, {name} is {tensor.dtype}"
            )
    for name, tensor in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not tensor.is_floating_point():
            raise ValueError(f"gated delta rule: {name} must be floating point, got {tensor.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"gated delta rule: {name} is on {tensor.device}, q on {q.device}")
    if initial_state is not None:
        if tuple(initial_state.shape) != (B, H, K, V):
            raise ValueError(
                f"gated delta rule: initial_state has shape {tuple(initial_state.shape)}, "
                f"expected [B, H, K, V] = {(B, H, K, V)}"
            )
        if not initial_state.is_floating_point() or initial_state.device != q.device:
            raise ValueError(
                f"gated delta rule: initial_state must be a floating-point tensor on {q.device} "
                f"(float32 recommended), got {initial_state.dtype} on {initial_state.device}"
            )
    if doc_starts is not None:
        if tuple(doc_starts.shape) != (B, T) or doc_starts.dtype != torch.bool or doc_starts.device != q.device:
            raise ValueError(
                f"gated delta rule: doc_starts must be a bool tensor [B, T] = {(B, T)} on {q.device}, "
                f"got {doc_starts.dtype} {tuple(doc_starts.shape)} on {doc_starts.device}"
            )


__all__ = ["KERNEL_NAMES", "GatedDeltaRuleKernel", "check_inputs"]
