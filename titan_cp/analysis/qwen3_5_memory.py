"""Analytic per-rank memory of a Qwen3.5 decoder (dense or MoE) under HSDP x TP x EP x PP x CP.

Reached through :func:`titan_cp.analysis.memory.estimate_memory` (it dispatches here
for a TorchTitan ``Qwen35Model.Config``); same :class:`TrainSetup` /
:class:`Parallelism` / :class:`MemoryEstimate` and the same accounting::

    peak = params + optimizer + fsdp_buffers
         + max(grads, grads + layer activations x in-flight microbatches + model activations + transient)

Shapes come from :func:`titan_cp.models.qwen3_5.flavors.shape_of` (TorchTitan's
``qwen3_5_configs``) and the MoE block's config. Per token of a rank, one layer
saves (``a`` = act bytes, ``f`` = fp32; counted with ``saved_tensors_hooks`` on
the debug shapes, every storage accounted for, see docs/max_context.md):

=====================  ===================================  ======================================
term                   elements / token                      what
=====================  ===================================  ======================================
attention_norm         3 d (a) + 1 (f)                       block input, x*rstd, normed x; rstd
gdn_gates              4 Hv (f)                              a+dt_bias, softplus, beta, g
gdn_conv               3 (2 Dk + Dv) (a)                     conv input (qkv), conv output, SiLU output
gdn_l2                 2 H (f)                               L2 norms of q, k
gdn_kernel (torch)     4 Hv K V / C + 2 Hv K / C (f)         chunk states / their decays kept by the torch kernel
gdn_kernel (triton)    2 Hv K + Hv C (a) + Hv (f)            FLA: normalised repeated q, k; WY matrix A; gate cumsum
cp_q_transition        Hv K (f)                              CP with cp_q_transition = "keep" only: q_t M_<=t
gdn_out                6 Dv (a) + Hv (f)                     o, o*rstd, normed, z, SiLU(z), out_proj input; rstd
attn_qkv_norm          3 Hq D + 2 Hkv D (a) + (Hq+Hkv) (f)   wq out [q|gate], normed q, k proj, normed k; rstds
attn_rope              2 R (f)                               RoPE cos / sin
attn_core              4 Hq D + 2 Hkv D (a) + Hq (f)         ring inputs q, k, v; out; lse; gated out, wo input
ffn_norm               3 d (a) + 1 (f)
mlp (dense)            4 F (a)                               w1 h, w3 h, SiLU, product
moe_router             4 E + 28 k + 4 bytes                  scores, top-k ids / scores, sort indices
moe_routed             k (2 d + 4 Fe) (bf16) + k d (a)       dispatched x, w1/w3 outs, SiLU, product; output
                                                             (TP without EP: Fe / tp, see below)
moe_shared             4 Fs (a) + d (a)                      shared expert, its sigmoid gate's input
=====================  ===================================  ======================================

plus per MoE layer the bf16 copies of its local experts' weights (3 E/ep d Fe x 2 bytes, / tp
without EP; ``_grouped_mm`` casts them) and the model terms (token ids, final norm, hidden states).
Under TP the head terms divide by tp, the norm terms by tp with sequence parallel. The MoE
terms follow where the tokens go (titan_cp.models.qwen3_5.moe): under TP alone every TP rank
routes all T tokens of its CP shard (the block's input all-gathered under SP) through its
F/tp slice of every expert, so moe_router, moe_routed and its output count T tokens with
Fe/tp; under TP x EP each TP rank routes its T/tp piece to whole experts, so they divide by
tp with the full Fe. The shared expert's gate input is the residual stream's piece (/ tp
under SP, and under EP, where the block works on T/tp). Measured per layout on CPU ranks
(benchmarks/memory.py --layouts, docs/max_context.md): within 3% of the saved bytes.

Static: dense parameters shard over tp x dp_shard x cp (HSDP replicas hold copies);
routed experts over ep x efsdp = dp_shard x cp x tp (TorchTitan's ``efsdp = dp cp tp / ep``;
:func:`expert_shards`, also for ``fsdp_over_cp=False``).
PP: every stage holds ``n_layers / pp`` layers (+ embedding or lm_head), and 1F1B
keeps ``min(pp, microbatches)`` microbatches' activations on the first stage.
Transient: the backward's hidden-state gradient plus the larger of two phases, and the
loss chunk. The last layer's (attention) backward: ``attention_workspace`` x its saved
bytes and its score tensors (``attention_score_tensors`` fp32 [Hq, T_b, T_b] per ring
block pair, T_b = tokens of one CP segment), less its FFN's and the final norm's saved
tensors, freed by then. The GDN layer before it: half a layer's activations, with the
attention layer's saved tensors freed. The block ops' path sets the two attention
fields (:func:`titan_cp.analysis.train_setup.block_attention_terms`: the fused CPU kernel
holds no score tensor). Under full AC a layer keeps only its input and the recomputed
layer joins the transient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from titan_cp.analysis.memory_terms import ActTerm, MemoryEstimate, _terms_bytes
from titan_cp.analysis.train_setup import AC_MODES, Parallelism, TrainSetup, dtype_bytes, keeps_q_transition
from titan_cp.models.qwen3_5.flavors import TextShape, shape_of


def is_qwen3_5(model) -> bool:
    """True for a TorchTitan Qwen3.5 config (``Qwen35Model.Config`` or titan_cp's subclass)."""
    layers = getattr(model, "layers", None)
    return isinstance(layers, list) and bool(layers) and hasattr(layers[0], "delta_net")


@dataclass(frozen=True)
class MoEShape:
    experts: int
    top_k: int
    expert_hidden: int
    shared_hidden: int


@dataclass(frozen=True)
class QwenDims:
    text: TextShape
    moe: MoEShape | None
    n_gdn: int
    n_attn: int

    @classmethod
    def of(cls, model) -> "QwenDims":
        text = shape_of(model)
        moe_cfg = next((layer.moe for layer in model.layers if getattr(layer, "moe", None) is not None), None)
        moe = None
        if moe_cfg is not None:
            inner = moe_cfg.routed_experts.inner_experts
            moe = MoEShape(inner.num_experts, moe_cfg.router.top_k, inner.hidden_dim,
                           moe_cfg.shared_experts.w1.out_features if moe_cfg.shared_experts is not None else 0)
        n_attn = sum(layer.attention is not None for layer in model.layers)
        return cls(text, moe, len(model.layers) - n_attn, n_attn)


def param_counts(q: QwenDims) -> dict[str, float]:
    """Parameter counts: ``dense_layer`` (per layer, TP-sharded, averaged over GDN / attention layers),
    ``replicated_layer`` (norms and small per-head vectors), ``expert_layer`` (routed experts), ``embed``."""
    s, m = q.text, q.moe
    d = s.dim
    Dk, Dv = s.n_key_heads * s.key_head_dim, s.n_value_heads * s.value_head_dim
    W = s.conv_kernel_size
    gdn = d * (2 * Dk + 2 * Dv + 2 * s.n_value_heads) + (2 * Dk + Dv) * W + Dv * d + 2 * s.n_value_heads
    attn = d * (2 * s.n_heads * s.head_dim + 2 * s.n_kv_heads * s.head_dim) + s.n_heads * s.head_dim * d
    if m is None:
        ffn, experts = 3 * d * s.hidden_dim, 0.0
    else:
        ffn = 3 * d * m.shared_hidden + d + d * m.experts  # shared expert + its gate + router
        experts = 3 * m.experts * d * m.expert_hidden
    n = q.n_gdn + q.n_attn
    dense_layer = (q.n_gdn * gdn + q.n_attn * attn) / n + ffn
    replicated = 2 * d + (q.n_attn * 2 * s.head_dim + q.n_gdn * s.value_head_dim) / n
    return {"dense_layer": dense_layer, "replicated_layer": replicated, "expert_layer": experts,
            "embed": s.vocab_size * d, "lm_head": s.vocab_size * d, "norm": d,
            "total": n * (dense_layer + replicated + experts) + 2 * s.vocab_size * d + d}


def _norm_terms(d: int, a: int, prefix: str) -> list[ActTerm]:
    return [ActTerm(f"{prefix}_norm", 2 * d, a, "sp", "RMSNorm input and x*rstd"),
            ActTerm(f"{prefix}_norm_rstd", 1, 4, "sp", "RMSNorm rstd"),
            ActTerm(f"{prefix}_norm_out", d, a, "rep", "normalised x (all-gathered under SP)")]


def gdn_terms(q: QwenDims, setup: TrainSetup, par: Parallelism, kernel: str) -> list[ActTerm]:
    s, a = q.text, dtype_bytes(setup.act_dtype)
    H, Hv, K, V, C = s.n_key_heads, s.n_value_heads, s.key_head_dim, s.value_head_dim, setup.chunk_size
    Dk, Dv = H * K, Hv * V
    terms = _norm_terms(s.dim, a, "attention") + [
        ActTerm("gdn_gates", 4 * Hv, 4, "tp", "a+dt_bias, softplus, beta, g"),
        ActTerm("gdn_conv", 3 * (2 * Dk + Dv), a, "tp", "conv input, conv output, SiLU output"),
        ActTerm("gdn_l2", 2 * H, 4, "tp", "L2 norms of q, k"),
    ]
    if kernel == "torch":
        terms.append(ActTerm("gdn_kernel", (4 * Hv * K * V + 2 * Hv * K) / C, 4, "tp", "chunk states, decays"))
    else:
        terms += [ActTerm("gdn_kernel", 2 * Hv * K + Hv * C, a, "tp", "FLA: q, k (normalised, repeated), A"),
                  ActTerm("gdn_kernel_gates", Hv, 4, "tp", "FLA: gate cumsum")]
    if keeps_q_transition(setup, par):
        terms.append(ActTerm("cp_q_transition", Hv * K, 4, "tp", "CP 'keep': q M_<=t (fp32)"))
    terms += [ActTerm("gdn_out", 6 * Dv, a, "tp", "o, o*rstd, normed, z, SiLU(z), out_proj input"),
              ActTerm("gdn_out_rstd", Hv, 4, "tp", "gated-norm rstd")]
    return terms


def attention_terms(q: QwenDims, setup: TrainSetup) -> list[ActTerm]:
    s, a = q.text, dtype_bytes(setup.act_dtype)
    Q, KV = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    return _norm_terms(s.dim, a, "attention") + [
        ActTerm("attn_qkv_norm", 3 * Q + 2 * KV, a, "tp", "wq out [q|gate], normed q, k proj, normed k"),
        ActTerm("attn_qk_rstd", s.n_heads + s.n_kv_heads, 4, "tp", "q/k norm rstd"),
        ActTerm("attn_rope", 2 * s.rotary_dim, 4, "rep", "RoPE cos / sin"),
        ActTerm("attn_core", 4 * Q + 2 * KV, a, "tp", "ring inputs q, k, v; out; gated out; wo input"),
        ActTerm("attn_lse", s.n_heads, 4, "tp", "log-sum-exp"),
    ]


def ffn_terms(q: QwenDims, setup: TrainSetup, par: Parallelism) -> list[ActTerm]:
    s, m, a = q.text, q.moe, dtype_bytes(setup.act_dtype)
    terms = _norm_terms(s.dim, a, "ffn")
    if m is None:
        return terms + [ActTerm("mlp", 4 * s.hidden_dim, a, "tp", "w1 h, w3 h, SiLU, product")]
    # TP x EP: each TP rank routes its T/tp piece of the CP shard to whole experts; TP alone: every TP rank
    # routes all T tokens through its F/tp slice of every expert (the block's input all-gathered under SP)
    routed, routed_hidden = ("tp", m.expert_hidden) if par.ep > 1 else ("rep", m.expert_hidden / par.tp)
    return terms + [
        ActTerm("moe_router", 4 * m.experts + 28 * m.top_k + 4, 1, routed, "scores, top-k, sort indices (bytes)"),
        ActTerm("moe_routed", m.top_k * (2 * s.dim + 4 * routed_hidden), 2, routed, "routed x, w1/w3, SiLU, product"),
        ActTerm("moe_routed_out", m.top_k * s.dim, a, routed, "routed output"),
        ActTerm("moe_shared", 4 * m.shared_hidden, a, "tp", "shared expert"),
        ActTerm("moe_shared_gate", s.dim, a, "tp" if par.ep > 1 else "sp", "shared output (gate input)"),
    ]


def model_terms(q: QwenDims, setup: TrainSetup) -> list[ActTerm]:
    a, d = dtype_bytes(setup.act_dtype), q.text.dim
    return [ActTerm("token_ids", 1, 8, "rep", "int64 token ids"),
            ActTerm("final_norm", 2 * d, a, "sp", "final norm input and x*rstd"),
            ActTerm("final_norm_rstd", 1, 4, "sp", "final norm rstd"),
            ActTerm("hidden_states", d, a, "rep", "final norm output (chunked loss input)")]


def expert_shards(par: Parallelism) -> int:
    """Ranks one MoE layer's routed experts are split over: TorchTitan's ep x efsdp = dp_shard x cp x tp;
    without FSDP over CP (``fsdp_over_cp=False``, the CPU benchmark) ep x the dp_shard ranks EP does not
    take (EP takes dp_shard ranks first: lcm(ep, dp)), and the hidden dim over tp when EP is off."""
    if par.fsdp_over_cp:
        return par.dp * par.cp * par.tp
    return math.lcm(par.ep, par.dp) * (par.tp if par.ep == 1 else 1)


def estimate_qwen3_5(model, setup: TrainSetup, par: Parallelism, calibration: dict[str, float] | None = None,
                     activation_scale: float = 1.0, kernel: str | None = None) -> MemoryEstimate:
    """Per-rank peak bytes of a Qwen3.5 config (module docstring for every term)."""
    if setup.ac not in AC_MODES:
        raise ValueError(f"ac = '{setup.ac}' is not one of {list(AC_MODES)}")
    if setup.seq_len % par.cp:
        raise ValueError(f"seq_len {setup.seq_len} does not divide by cp {par.cp}")
    q = QwenDims.of(model)
    kernel = kernel or getattr(model, "kernel", "triton")  # a plain TorchTitan config: FLA's kernel
    cal = dict(calibration or {})
    n_layers = q.n_gdn + q.n_attn
    if n_layers % par.pp:
        raise ValueError(f"pp {par.pp} does not divide the {n_layers} layers")
    layers_local = n_layers / par.pp
    in_flight = min(par.pp, setup.microbatches) if par.pp > 1 else 1
    rows = setup.batch / setup.microbatches if par.pp > 1 else setup.batch
    tokens = rows * setup.seq_len / par.cp

    # static
    c = param_counts(q)
    fsdp = par.fsdp
    dense = layers_local * (c["dense_layer"] / par.tp + c["replicated_layer"]) / fsdp
    experts = layers_local * c["expert_layer"] / expert_shards(par) if q.moe else 0.0
    ends = (c["embed"] / par.tp + c["norm"] + c["lm_head"] / par.tp) / (1 if par.pp == 1 else 2) / fsdp
    n_local = dense + experts + ends
    pb = dtype_bytes(setup.param_dtype)
    params = n_local * pb
    grads = n_local * dtype_bytes(setup.grad_dtype or setup.param_dtype)
    opt = setup.optimizer_states * dtype_bytes(setup.optimizer_dtype) + (4 if setup.master_weights and pb < 4 else 0)
    a = dtype_bytes(setup.act_dtype)
    fsdp_buffers = 0.0
    if fsdp > 1:
        experts_per_layer = c["expert_layer"] / (par.ep if par.ep > 1 else par.tp) if q.moe else 0.0
        per_layer = c["dense_layer"] / par.tp + experts_per_layer
        fsdp_buffers = per_layer * (2 * a + dtype_bytes(setup.reduce_dtype))

    # saved activations (per layer kind), then the layers of this stage and the microbatches in flight
    ffn = _terms_bytes(ffn_terms(q, setup, par), par, tokens, cal)
    if q.moe:
        ffn["moe_expert_weight_copies"] = cal.get("moe_expert_weight_copies", 1.0) * 3 * q.moe.experts / par.ep \
            * q.text.dim * q.moe.expert_hidden / (par.tp if par.ep == 1 else 1) * 2
    gdn = _terms_bytes(gdn_terms(q, setup, par, kernel), par, tokens, cal) | ffn
    attn = _terms_bytes(attention_terms(q, setup), par, tokens, cal) | ffn
    gdn_bytes, attn_bytes = activation_scale * sum(gdn.values()), activation_scale * sum(attn.values())
    layer_full = max(gdn_bytes if q.n_gdn else 0.0, attn_bytes if q.n_attn else 0.0)
    if setup.ac == "full":
        per_layer_kept = activation_scale * tokens * q.text.dim * a / (par.tp if par.sequence_parallel else 1)
        activations = layers_local * per_layer_kept
    else:
        activations = layers_local * (q.n_gdn * gdn_bytes + q.n_attn * attn_bytes) / n_layers
    activations *= in_flight
    model_acts = activation_scale * sum(_terms_bytes(model_terms(q, setup), par, tokens, cal).values())

    # transients. The last layer is attention: its backward (first in the backward pass, the activation
    # peak) runs with the score tensors, after the loss, the final norm and its own FFN have freed their
    # saved tensors, and with only the lm_head / final-norm / this layer's gradients allocated.
    grad_accum = cal.get("grad_accumulator", 1.0) * tokens * q.text.dim * 4
    grads_at_peak = grads
    backward = grad_accum + cal.get("workspace", 1.0) * setup.workspace_fraction * layer_full
    if q.n_attn and model.layers[-1].attention is not None:
        segment = tokens / (2 if setup.cp_layout == "zigzag" and par.cp > 1 else 1) / rows
        scores = setup.attention_score_tensors * rows * q.text.n_heads / par.tp * segment**2 * 4
        model_freed = sum(v for k, v in _terms_bytes(model_terms(q, setup), par, tokens, cal).items()
                          if k != "token_ids")
        ffn_freed = 0.0 if setup.ac == "full" else sum(ffn.values()) * activation_scale
        attn_ws = cal.get("attention_workspace", 1.0) * setup.attention_workspace * attn_bytes
        attention_phase = grad_accum + scores + attn_ws - ffn_freed - model_freed
        if setup.ac == "full":
            backward = max(backward, attention_phase)
        else:  # the GDN layer before it runs its backward with the attention layer's saved tensors freed
            backward = max(backward - attn_bytes - model_freed, attention_phase)
        grads_at_peak = grads * (ends + (dense + experts) / layers_local) / n_local
    if setup.ac == "full":
        backward += layer_full
    loss = grad_accum + cal.get("loss_chunk", 1.0) * tokens / max(1, setup.loss_chunks) \
        * q.text.vocab_size / par.tp * setup.loss_bytes_per_logit
    if fsdp > 1:
        loss += q.text.vocab_size * q.text.dim / par.tp * (a + 4)
    terms = {f"gdn:{k}": v for k, v in gdn.items()} | {f"attention:{k}": v for k, v in attn.items()}
    return MemoryEstimate(params=params, grads=grads, optimizer=n_local * opt, fsdp_buffers=fsdp_buffers,
                          activations=activations, model_activations=model_acts, loss_phase=loss,
                          backward_phase=backward, tokens_per_rank=int(tokens), layer_activation_bytes=layer_full,
                          layer_terms=terms, grads_at_peak=cal.get("grads_at_peak", 1.0) * grads_at_peak)
