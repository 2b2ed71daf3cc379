r"""FLOPs of a GDN model: the one formula behind the training log's MFU and the scale model.

The gated delta rule kernel
---------------------------
titan_cp's ``torch`` kernel (``titan_cp/ops/gated_delta_rule/chunk.py``) and FLA's Triton
kernel run the same chunked algorithm (WY representation + UT transform).
Per head and per chunk of C tokens (state H: K x V; matmul [m, n] x [n, p] =
2 m n p FLOPs), forward:

=====================================  ======================  =================
step                                   shapes                  FLOPs per chunk
=====================================  ======================  =================
K K^T (masked by the decays)           [C,K] x [K,C]           2 C^2 K
T = (I + A)^-1, unit lower triangular  C x C                   C^3 / 3
[W | U] = T [beta gamma K | beta V]    [C,C] x [C,K+V]         2 C^2 (K + V)
u = U - W H         (chunk loop)       [C,K] x [K,V]           2 C K V
H' = gamma H + K^T diag(lam) u (loop)  [K,C] x [C,V]           2 C K V
Q K^T (masked by the decays)           [C,K] x [K,C]           2 C^2 K
(Q K^T * D) u                          [C,C] x [C,V]           2 C^2 V
diag(gamma) Q H                        [C,K] x [K,V]           2 C K V
=====================================  ======================  =================

Sum per chunk: 6 C^2 K + 4 C^2 V + 6 C K V + C^3 / 3, so per token per head

    F_gdn(K, V, C) = 6 C K + 4 C V + 6 K V + C^2 / 3

(K = 256, V = 512, C = 64: 1.017 MFLOP; K = V = 128: 0.182 MFLOP). The
inverse is counted as what inverting a unit triangular matrix costs (C^3 / 3;
``torch.linalg.solve_triangular`` against an identity spends C^3, 2/3 of it on
zeros: +0.3% of F_gdn at K = 256, V = 512). Elementwise work (cumulative
decays, their exp and masks: O(C) per token) is not counted, as matmul-FLOP
conventions do. The backward is counted as twice the forward (the usual
training convention, as for the matmuls: 3 x forward for a training step);
the kernel's real backward also recomputes W, U and u, which the scale model
prices as a time factor (``kernel_bwd_factor``), not as model FLOPs.

Under grouped value heads (GVA, Hv > H) the kernel runs once per value head.

The model
---------
Training FLOPs per token (:func:`training_flops_per_token`):

    6 x (parameters outside the embedding)          every weight: 2 FLOPs fwd, 4 bwd per token
  + 3 x n_gdn_layers x Hv x F_gdn(K, V, C)          the gated delta rule, fwd + bwd
  + 12 x n_attn_layers x heads x head_dim x L       softmax attention scores and values
                                                    (TorchTitan's convention, hybrid layers)
  + 3 x n_mamba2_layers x H x F_ssd(N, P, C)        Mamba-2's chunked SSD (titan_cp/ops/mamba2/chunk.py)

F_ssd(N, P, C) = 2 C N (C B^T per chunk) + 2 C P (its masked product with x) + 2 N P (the chunk's
state B^T x) + 2 N P (the inter-chunk output C S): no delta-rule inverse, a scalar decay per head.
"""

from __future__ import annotations

CHUNK_SIZE = 64  # the GDN kernels' chunk C (titan_cp's torch kernel and FLA's)


def gdn_chunk_flops_per_token(K: int, V: int, C: int = CHUNK_SIZE) -> float:
    """Forward FLOPs of the chunked gated delta rule per token per (value) head (module docstring)."""
    return 6 * C * K + 4 * C * V + 6 * K * V + C * C / 3


def ssd_chunk_flops_per_token(N: int, P: int, C: int = CHUNK_SIZE) -> float:
    """Forward FLOPs of Mamba-2's chunked SSD per token per head (module docstring)."""
    return 2 * C * N + 2 * C * P + 4 * N * P


def training_flops_per_token(config, matmul_params: int, seq_len: int) -> float:
    """FLOPs of one training step per token of a ``GDNModel.Config`` model (module docstring).

    ``matmul_params``: parameters that multiply activations (all but the embedding table,
    or all of them with tied embeddings, whose weight is also lm_head).
    """
    layer_types = config.layer_types()
    num_v_heads = config.num_v_heads or config.num_heads
    value_head_dim = int(config.head_dim * config.expand_v)
    # KDA ('K') runs the same chunked delta rule with a per-channel decay: the same matmuls to first order.
    delta_rule = (layer_types.count("G") + layer_types.count("K")) * num_v_heads \
        * gdn_chunk_flops_per_token(config.head_dim, value_head_dim)
    ssd = layer_types.count("M") * config.num_heads * ssd_chunk_flops_per_token(config.ssm_state_size,
                                                                                config.head_dim)
    attention = 12 * layer_types.count("A") * config.attn_num_heads * config.attn_head_dim * seq_len
    return 6 * matmul_params + 3 * (delta_rule + ssd) + attention
