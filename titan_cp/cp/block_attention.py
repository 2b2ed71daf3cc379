"""One block of causal attention: a query block against a key block, with its log-sum-exp.

The ring (:mod:`titan_cp.cp.ring_attention`, whose docstring has the math) calls
these two ops per segment block: :func:`block_attention_forward` returns the
block-normalised output and its LSE, :func:`block_attention_backward` the
block's dq, dk, dv recomputed from the final LSE and delta = rowsum(dO * O).

On CPU they run torch's fused flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: no
score matrix in memory, GQA native, LSE out / LSE in): a square diagonal
block uses the kernel's causal flag, a full block no mask, any other block
(documents, or a causal block with Tq != Tk, since the kernel's flag is aligned
top left) an additive -inf mask. The backward hands the kernel the final L and
a stand-in output whose rowsum with dO is delta (the kernel uses O only for
delta). On other devices the explicit masked softmax runs instead

    s = scale q k^T (masked -inf),  out = softmax(s) v,  lse = logsumexp(s)

with the backward of the ring's docstring (a GPU flash kernel with LSE in / out
and document masking can replace that branch). Both compute in the
accumulation dtype (:func:`accumulation_dtype`).
"""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype", "block_attention_forward", "block_attention_backward"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32 for bf16 / fp16 / fp32, float64 for float64


def _block_mask(tq: int, tk: int, causal: bool, q_doc, k_doc, device) -> torch.Tensor | None:
    """Allowed (query, key) pairs as bool [B or 1, 1, 1, Tq, Tk], or None (all allowed)."""
    mask = None
    if causal:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril_(tk - tq)[None, None, None]
    if q_doc is not None:
        same = (q_doc[:, :, None] == k_doc[:, None, :])[:, None, None]
        mask = same if mask is None else mask & same
    return mask


def _uses_fused_kernel(q: torch.Tensor) -> bool:
    """The block ops run on torch's fused CPU flash-attention kernel for CPU tensors, the explicit math otherwise."""
    return q.device.type == "cpu"


def _fused_mask(tq: int, tk: int, causal: bool, q_doc, k_doc, dtype, device):
    """(is_causal, additive mask [B or 1, 1, Tq, Tk] or None, allowed bool mask or None) for the fused kernel.

    The kernel's own ``is_causal`` is aligned at the top left, which equals the
    bottom-right rule only for a square block; every other masked block gets
    an additive mask (0 allowed, -inf not; the kernel takes a float mask of the
    inputs' dtype, not a bool one).
    """
    if q_doc is None and (not causal or tq == tk):
        return causal, None, None
    allowed = _block_mask(tq, tk, causal, q_doc, k_doc, device)[:, 0]  # [B or 1, 1, Tq, Tk]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return False, additive, allowed


def _scores(q, k, scale, causal, q_doc, k_doc):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qa, ka = q.to(accumulation_dtype(q.dtype)), k.to(accumulation_dtype(q.dtype))
    s = torch.matmul(qa.reshape(B, Hkv, G * Tq, D), ka.transpose(-1, -2)).mul_(scale).view(B, Hkv, G, Tq, Tk)
    mask = _block_mask(Tq, Tk, causal, q_doc, k_doc, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def block_attention_forward(q, k, v, *, scale: float, causal: bool, q_doc=None, k_doc=None):
    """Attention of one query block to one key block, with its log-sum-exp.

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]; ``causal`` masks key j > query i
    (aligned at the bottom right, i.e. the diagonal block when Tq == Tk);
    q_doc [B, Tq] / k_doc [B, Tk] restrict keys to the query's document.
    Returns out [B, Hq, Tq, D] (normalised within the block; 0 for a row without
    allowed keys) and lse [B, Hq, Tq] (-inf for such a row), in the accumulation dtype.

    CPU tensors: torch's fused flash-attention kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``, GQA native), run on
    inputs cast to the accumulation dtype; it returns lse 0 for a row without
    allowed keys, set to -inf here. Other devices: the explicit masked softmax.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = accumulation_dtype(q.dtype)
    if _uses_fused_kernel(q):
        is_causal, additive, allowed = _fused_mask(Tq, Tk, causal, q_doc, k_doc, acc, q.device)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.to(acc), k.to(acc), v.to(acc), 0.0, is_causal, attn_mask=additive, scale=scale)
        if allowed is not None:
            lse = lse.masked_fill(~allowed.any(dim=-1), float("-inf"))
        return out, lse
    s = _scores(q, k, scale, causal, q_doc, k_doc)  # [B, Hkv, G, Tq, Tk]
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)  # noqa: E741
    out = torch.matmul(p.view(B, Hkv, G * Tq, Tk), v.to(s.dtype)).view(B, Hkv, G, Tq, -1)
    out = out / l.clamp_min(torch.finfo(s.dtype).tiny)
    lse = (m + torch.log(l)).squeeze(-1)
    return out.reshape(B, Hq, Tq, -1), lse.reshape(B, Hq, Tq)


def _output_with_delta(dout: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A stand-in output O' with rowsum(dout * O') = delta, for the fused backward.

    The fused backward takes the output O only to form delta = rowsum(dO * O)
    (flash-attention-2's D). With a = max_j |dO_ij| (1 for a zero row),
    w = dO / a and n = max(rowsum(w * w), 1):

        O' = w * (delta / a) / n,   rowsum(dO * O') = a n (delta / a) / n = delta

    (|w| <= 1 and n >= 1 on non-zero rows, so nothing over- or underflows; a
    zero row has delta = 0 and gets O' = 0).
    """
    a = dout.abs().amax(dim=-1, keepdim=True)
    a = torch.where(a > 0, a, torch.ones_like(a))
    w = dout / a
    n = (w * w).sum(dim=-1, keepdim=True).clamp_min_(1.0)
    return w.mul_((delta.unsqueeze(-1) / a) / n)


def block_attention_backward(q, k, v, dout, lse, delta, *, scale: float, causal: bool, q_doc=None, k_doc=None):
    """Gradients of one block's contribution, recomputed from the final LSE.

    dout [B, Hq, Tq, D], lse / delta [B, Hq, Tq] (final log-sum-exp of the
    queries over all keys, rowsum(dout * out)). Returns dq [B, Hq, Tq, D],
    dk, dv [B, Hkv, Tk, D], all in the accumulation dtype.

    CPU tensors: the fused kernel's backward
    (``aten._scaled_dot_product_flash_attention_for_cpu_backward``), given the
    final lse and a stand-in output that carries delta (:func:`_output_with_delta`).
    Other devices: the explicit math of the module docstring.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = accumulation_dtype(q.dtype)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(acc)
    if _uses_fused_kernel(q):
        is_causal, additive, _ = _fused_mask(Tq, Tk, causal, q_doc, k_doc, acc, q.device)
        do = dout.to(acc)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q.to(acc), k.to(acc), v.to(acc), _output_with_delta(do, delta.to(acc)), lse, 0.0, is_causal,
            attn_mask=additive, scale=scale)
    s = _scores(q, k, scale, causal, q_doc, k_doc)  # [B, Hkv, G, Tq, Tk]
    p = torch.exp(s - lse.reshape(B, Hkv, G, Tq, 1)).view(B, Hkv, G * Tq, Tk)
    do = dout.to(s.dtype).reshape(B, Hkv, G * Tq, -1)
    dv = torch.matmul(p.transpose(-1, -2), do)
    dp = torch.matmul(do, v.to(s.dtype).transpose(-1, -2))
    ds = p * (dp - delta.reshape(B, Hkv, G * Tq, 1))
    ds.mul_(scale)
    dq = torch.matmul(ds, k.to(s.dtype)).view(B, Hq, Tq, D)
    dk = torch.matmul(ds.transpose(-1, -2), q.to(s.dtype).reshape(B, Hkv, G * Tq, D))
    return dq, dk, dv
