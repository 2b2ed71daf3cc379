"""Analytic per-rank memory estimate for a Gated DeltaNet LM trained with FSDP x TP x CP.

The model is a ``GDNModel.Config`` (``titan_cp.models.gdn.model_config(flavor)``;
sizes read by :class:`titan_cp.analysis.shape.Dims`): one block, repeated
``n_layers`` times; H key heads of dim K, Hv value heads of dim V = K * expand_v,
Dk = H*K, Dv = Hv*V::

    x -> RMSNorm -> GatedDeltaNet -> + x -> RMSNorm -> SwiGLU MLP -> + ...
    GatedDeltaNet: q,k = SiLU(conv4(q_proj x)), SiLU(conv4(k_proj x))   dim -> Dk
                   v   = SiLU(conv4(v_proj x))                          dim -> Dv
                   q,k L2-normalised per head; beta = sigmoid(b_proj x);
                   g = -exp(A_log) * softplus(a_proj x + dt_bias)       dim -> Hv
                   o = gated_delta_rule(q, k, v, g, beta)
                   out = o_proj(RMSNorm_V(o) * SiLU(g_proj x))          Dv -> dim
    SwiGLU MLP:    w2(SiLU(w1 h) * w3 h)                                dim -> hidden -> dim
    embedding (vocab x dim), final RMSNorm, lm_head (dim x vocab, or tied)

Everything here is arithmetic on shapes: nothing is allocated. The estimate is

    peak = params + grads + optimizer + fsdp_buffers            (static)
         + n_layers * layer_activations + model_activations   (saved for backward)
         + max(loss_phase, backward_phase)                     (transient)

(conservative: every gradient is counted as alive at the activation peak; the
calibration factor ``grads_at_peak`` < 1 says only that fraction is, and the
peak becomes ``params + optimizer + fsdp_buffers + max(grads, grads_at_peak *
grads + activations + transient)``.)

Activations are a list of :class:`ActTerm` s, each ``elements per token x bytes
per element``, multiplied by the tokens a rank holds (``batch * seq_len / cp``)
and divided by TP where the tensor is head- or hidden-sharded. Every term has a
name; ``calibration={"name": factor}`` scales it, so measured peaks can be
fitted term by term (``activation_scale`` scales them all). The default counts
are what autograd saves for the model written in plain PyTorch ops (checked
with ``torch.autograd.graph.saved_tensors_hooks`` on a small block; see
tests/integration/test_estimator.py for the hand counts):

=================  ======================  ==========================================
term               elements / token        what is saved
=================  ======================  ==========================================
attn_norm          2 dim        (act)      RMSNorm input x (block input) and x*rstd
attn_norm_rstd     1            (fp32)     its rstd
mixer_input        dim          (act)      normalised x, saved once for all six
                                           projections; all-gathered under TP+SP
qkv_proj_out       2 Dk + Dv    (act)      q,k,v projections (conv inputs)
qkv_conv_out       2 Dk + Dv    (act)      conv outputs (SiLU inputs)
qk_silu_out        2 Dk         (act)      SiLU outputs of q,k (L2-norm inputs)
qk_l2_norms        4 H          (fp32)     the L2 norms (and their broadcast)
kernel_inputs      2 Dk + Dv    (act)      normalised q,k and SiLU(conv v): the
                                           kernel's saved inputs
gates              5 Hv         (fp32)     a+dt_bias, softplus(.), beta, g, o-norm rstd
kernel_internal    Hv * c       (act)      kernel-private tensors, c per head per token
                                           (FLA saves the WY matrix A: c = chunk 64);
                                           0 under CP with ``cp_recomputes_kernel``
kernel_states      Hv K V / C   (fp32)     only if the kernel saves its chunk states
                                           [T/C, Hv, K, V] (``kernel_saves_states``;
                                           under CP the true states, width V)
cp_q_transition    Hv K         (fp32)     only with state-passing CP and
                                           ``cp_q_transition = "keep"``: q_t M_<=t kept
                                           for the backward's G = (q M)^T dO (the default
                                           "recompute" reruns it in the backward)
out_gate_norm      5 Dv         (act)      kernel output o, o*rstd, o*rstd*w,
                                           g_proj x (SiLU input), SiLU(g_proj x)
o_proj_input       Dv           (act)      gated-norm output
ffn_norm           2 dim        (act)      RMSNorm input h and h*rstd
ffn_norm_rstd      1            (fp32)     its rstd
mlp_input          dim          (act)      normalised h (w1, w3 input)
mlp_hidden         4 hidden     (act)      w1 h, SiLU(w1 h), w3 h, product (w2 input)
=================  ======================  ==========================================

(Under CP the transition M rides as K extra state columns through the forward only;
the backward is the plain one from the true incoming state, so nothing saved is wider
than V. A ``cp_recomputes_kernel`` segment kernel saves no kernel-private tensors: it
reruns the plain kernel in the backward.)
Sum without CP: ``6 dim + 8 Dk + 9 Dv + 4 hidden`` act elements + ``5 Hv + 4 H + 2``
fp32 + kernel terms. Under CP (state passing) each layer also keeps a few buffers
that do not scale with tokens, ``cp_state_buffers`` (:func:`cp_state_buffer_bytes`:
the gathered transitions, the true start of a recomputing kernel).

Hybrid models (``model.layer_pattern`` with 'A'): each softmax-attention block
saves :func:`attention_layer_terms` instead (the same norms and MLP; q, k, v, the
ring's output and log-sum-exp, the o-projection input, RoPE's cos/sin), the same
per token with and without CP (ring attention keeps only local blocks).

These counts describe the block in plain PyTorch with FLA's kernel. What a given
kernel and titan_cp's own layer code really save is a *profile*:
:func:`titan_cp.analysis.profiles.kernel_profile` returns the TrainSetup fields and per-term factors for a
kernel (``torch``: measured with benchmarks/memory.py, within a few percent
of the tracked-allocator peak on CPU; see docs/benchmarks.md).

With ``ac="full"`` (TorchTitan full activation checkpointing: every block
wrapped) a layer keeps only its input (``dim`` act elements per token), and the
backward re-runs one block at a time: one layer's full activations join the
transient peak.

Model-level terms: token ids (int64), the final norm (2 dim act + rstd), its
output (the hidden states handed to TorchTitan's chunked loss, dim act), the
loss's fp32 gradient accumulator for the hidden states (dim fp32), and per loss
chunk ``tokens / loss_chunks x vocab / tp x loss_bytes_per_logit`` (logits,
their fp32 upcast / log-softmax and gradient).

Static terms: parameters are sharded over TP (matrices, convs, embedding,
lm_head; norms replicated) and over FSDP = dp x cp (TorchTitan shards over
dp_shard x cp). Grads sharded like params (``grad_bytes``); AdamW keeps
``optimizer_states`` fp32 states per parameter (+ an fp32 master copy with
``master_weights``). With FSDP (dp*cp > 1) the unsharded parameters of two
blocks (current + prefetched) live in the compute dtype and one block's
unsharded gradients in the reduce dtype (fp32) at a time.

Transient: ``backward_phase`` = the hidden-state gradient accumulator + one
layer's backward workspace (``workspace_fraction`` x a layer's saved activations
for activation gradients, + ``kernel_workspace_states`` fp32 chunk-state tensors
[T/C, Hv, K, V] that a chunked kernel's backward materialises: recomputed h and
dh) (+ one layer's recomputed activations under AC) (+ for hybrids,
``attention_score_tensors`` fp32 [Hq, T_loc, T_loc] tensors of the attention backward,
which the explicit block ops materialise for one ring block pair at a time; 0 on CPU, where
the fused kernel runs: :func:`titan_cp.analysis.train_setup.block_attention_terms`). ``loss_phase`` = the
accumulator + one loss chunk's logits (+ the unsharded lm_head weight and its
fp32 gradient under FSDP).
"""

from __future__ import annotations

import math
from dataclasses import replace

from titan_cp.analysis.memory_terms import ActTerm, MemoryEstimate, _terms_bytes
from titan_cp.analysis.qwen3_5_memory import estimate_qwen3_5, is_qwen3_5
from titan_cp.analysis.shape import Dims, param_counts
from titan_cp.analysis.train_setup import AC_MODES, Parallelism, TrainSetup, dtype_bytes, keeps_q_transition

def layer_activation_terms(shape: Dims, setup: TrainSetup, par: Parallelism) -> list[ActTerm]:
    """Saved-for-backward tensors of one block without checkpointing (see the module docstring)."""
    a = dtype_bytes(setup.act_dtype)
    f = 4
    d, H, Hv, K, Dk, Dv, hid = shape.dim, shape.H, shape.Hv, shape.K, shape.key_dim, shape.value_dim, shape.hidden
    C = setup.chunk_size
    state_passing = par.cp > 1 and setup.cp_extra
    kernel_internal = 0.0 if state_passing and setup.cp_recomputes_kernel else setup.kernel_saved_per_head_token
    terms = [
        ActTerm("attn_norm", 2 * d, a, "sp", "RMSNorm input x (block input) and x*rstd"),
        ActTerm("attn_norm_rstd", 1, f, "sp", "RMSNorm rstd"),
        ActTerm("mixer_input", d, a, "rep", "normalised x: input of q,k,v,a,b,g projections (one tensor)"),
        ActTerm("qkv_proj_out", 2 * Dk + Dv, a, "tp", "q,k,v projections: conv inputs"),
        ActTerm("qkv_conv_out", 2 * Dk + Dv, a, "tp", "conv outputs: SiLU inputs"),
        ActTerm("qk_silu_out", 2 * Dk, a, "tp", "SiLU(conv q), SiLU(conv k): L2-norm inputs"),
        ActTerm("qk_l2_norms", 4 * H, f, "tp", "L2 norms of q,k and their broadcast"),
        ActTerm("kernel_inputs", 2 * Dk + Dv, a, "tp", "normalised q,k and SiLU(conv v): kernel inputs"),
        ActTerm("gates", 5 * Hv, f, "tp", "a+dt_bias, softplus, beta, g, o-norm rstd (fp32 per head)"),
        ActTerm("kernel_internal", Hv * kernel_internal, a, "tp",
                "kernel-private saved tensors (FLA: WY matrix A, C per head per token)"),
    ]
    if setup.kernel_saves_states and not (state_passing and setup.cp_recomputes_kernel):
        terms.append(ActTerm("kernel_states", Hv * K * shape.V / C, f, "tp", "chunk states [T/C, Hv, K, V] fp32"))
    if keeps_q_transition(setup, par):
        terms.append(ActTerm("cp_q_transition", Hv * K, f, "tp", "CP 'keep': q M_<=t (fp32) for G = (q M)^T dO"))
    terms += [
        ActTerm("out_gate_norm", 5 * Dv, a, "tp", "o, o*rstd, o*rstd*w, g_proj x, SiLU(g_proj x)"),
        ActTerm("o_proj_input", Dv, a, "tp", "gated-norm output: o_proj input"),
        ActTerm("ffn_norm", 2 * d, a, "sp", "RMSNorm input h and h*rstd"),
        ActTerm("ffn_norm_rstd", 1, f, "sp", "RMSNorm rstd"),
        ActTerm("mlp_input", d, a, "rep", "normalised h: w1, w3 input"),
        ActTerm("mlp_hidden", 4 * hid, a, "tp", "w1 h, SiLU(w1 h), w3 h, product (w2 input)"),
    ]
    return terms


def attention_layer_terms(shape: Dims, setup: TrainSetup, par: Parallelism) -> list[ActTerm]:
    """Saved-for-backward tensors of one softmax-attention block of a hybrid (model/attention.py,
    cp/ring_attention.py), counted with saved_tensors_hooks: the same with and without CP."""
    a, f = dtype_bytes(setup.act_dtype), 4
    d, hid = shape.dim, shape.hidden
    q_width, kv_width = shape.attn_heads * shape.attn_head_dim, shape.attn_kv_heads * shape.attn_head_dim
    return [
        ActTerm("attn_norm", 2 * d, a, "sp", "RMSNorm input x (block input) and x*rstd"),
        ActTerm("attn_norm_rstd", 1, f, "sp", "RMSNorm rstd"),
        ActTerm("mixer_input", d, a, "rep", "normalised x: input of wq, wk, wv"),
        ActTerm("rope_cos_sin", shape.attn_head_dim, f, "rep", "RoPE cos and sin [T, D/2] each (fp32)"),
        ActTerm("attn_qkv", q_width + 2 * kv_width, a, "tp", "q, k (rotated) and v: the ring's inputs"),
        ActTerm("attn_out", q_width, a, "tp", "attention output (the ring's saved out)"),
        ActTerm("attn_lse", shape.attn_heads, f, "tp", "log-sum-exp per query head (fp32)"),
        ActTerm("attn_o_proj_input", q_width, a, "tp", "output in [T, Hq D] layout: wo input"),
        ActTerm("ffn_norm", 2 * d, a, "sp", "RMSNorm input h and h*rstd"),
        ActTerm("ffn_norm_rstd", 1, f, "sp", "RMSNorm rstd"),
        ActTerm("mlp_input", d, a, "rep", "normalised h: w1, w3 input"),
        ActTerm("mlp_hidden", 4 * hid, a, "tp", "w1 h, SiLU(w1 h), w3 h, product (w2 input)"),
    ]


def cp_state_buffer_bytes(shape: Dims, setup: TrainSetup, par: Parallelism) -> float:
    """Per-layer CP buffers that do not scale with tokens, kept for the backward (state passing).

    allgather: the transitions M_s of the segments after this rank's first, the reverse fold's
    (at most P n - 1 of [B, Hv, K, K], on the rank holding segment 0);
    logscan: this rank's M [B n, Hv, K, K]; with ``cp_recomputes_kernel`` also the true start
    state [B n, Hv, K, V] the backward reruns the kernel from (n = segments per rank: 1
    contiguous, 2 zigzag). fp32. 0 without CP or for alltoall.
    """
    if par.cp <= 1 or not setup.cp_extra or setup.cp_exchange == "alltoall":
        return 0.0
    K, V, Hv = shape.K, shape.V, shape.Hv / par.tp
    rows = setup.batch * (2 if setup.cp_layout == "zigzag" else 1)
    n = rows // setup.batch
    transitions = (par.cp * n - 1) * setup.batch * Hv * K * K if setup.cp_exchange == "allgather" else \
        rows * Hv * K * K
    start = rows * Hv * K * V if setup.cp_recomputes_kernel else 0
    return 4.0 * (transitions + start)


def checkpointed_layer_terms(shape: Dims, setup: TrainSetup) -> list[ActTerm]:
    """What a block keeps under full AC: its input."""
    return [ActTerm("ac_block_input", shape.dim, dtype_bytes(setup.act_dtype), "sp", "checkpointed block input")]


def model_activation_terms(shape: Dims, setup: TrainSetup) -> list[ActTerm]:
    """Saved tensors outside the blocks, alive until the backward reaches them."""
    a = dtype_bytes(setup.act_dtype)
    return [
        ActTerm("token_ids", 1, 8, "rep", "int64 token ids (embedding backward)"),
        ActTerm("final_norm", 2 * shape.dim, a, "sp", "final RMSNorm input and x*rstd"),
        ActTerm("final_norm_rstd", 1, 4, "sp", "final RMSNorm rstd"),
        ActTerm("hidden_states", shape.dim, a, "rep", "final norm output handed to the chunked loss"),
    ]


# ----------------------------------------------------------------------------- estimate


def estimate_memory(
    model,
    setup: TrainSetup,
    par: Parallelism = Parallelism(),
    calibration: dict[str, float] | None = None,
    activation_scale: float = 1.0,
) -> MemoryEstimate:
    """Per-rank peak memory in bytes of ``model``: a ``GDNModel.Config`` (module docstring for every term) or a
    TorchTitan Qwen3.5 config (:mod:`titan_cp.analysis.qwen3_5_memory`)."""
    if is_qwen3_5(model):
        return estimate_qwen3_5(model, setup, par, calibration, activation_scale)
    shape = Dims.of(model, allow_attention=True)
    if setup.ac not in AC_MODES:
        raise ValueError(f"ac = '{setup.ac}' is not one of {list(AC_MODES)}")
    if setup.seq_len % par.cp:
        raise ValueError(f"seq_len {setup.seq_len} does not divide by cp {par.cp}")
    cal = dict(calibration or {})
    tokens = setup.batch * setup.seq_len // par.cp

    # static
    counts = param_counts(model)
    n_rep = counts["tp_replicated"]
    n_local = ((counts["total"] - n_rep) / par.tp + n_rep) / par.fsdp
    pb = dtype_bytes(setup.param_dtype)
    params = n_local * pb
    grads = n_local * dtype_bytes(setup.grad_dtype or setup.param_dtype)
    opt_per_param = setup.optimizer_states * dtype_bytes(setup.optimizer_dtype)
    if setup.master_weights and pb < 4:
        opt_per_param += 4
    optimizer = n_local * opt_per_param
    a = dtype_bytes(setup.act_dtype)
    layer_local = counts["layer"] / par.tp
    fsdp_buffers = 0.0
    if par.fsdp > 1:
        fsdp_buffers = layer_local * (2 * a + dtype_bytes(setup.reduce_dtype))

    # saved activations
    full_terms = _terms_bytes(layer_activation_terms(shape, setup, par), par, tokens, cal)
    cp_buffers = cp_state_buffer_bytes(shape, setup, par)
    if cp_buffers:
        full_terms["cp_state_buffers"] = cal.get("cp_state_buffers", 1.0) * cp_buffers
    gdn_full = activation_scale * sum(full_terms.values())
    attn_full = 0.0
    if shape.n_attn:
        attn_terms = _terms_bytes(attention_layer_terms(shape, setup, par), par, tokens, cal)
        full_terms.update({f"attention:{name}": b for name, b in attn_terms.items()})
        attn_full = activation_scale * sum(attn_terms.values())
    layer_full = max(gdn_full if shape.n_gdn else 0.0, attn_full)  # the larger block's, for the workspace
    if setup.ac == "full":
        kept = activation_scale * sum(_terms_bytes(checkpointed_layer_terms(shape, setup), par, tokens, cal).values())
        activations = shape.n_layers * kept
    else:
        activations = shape.n_gdn * gdn_full + shape.n_attn * attn_full
    model_acts = activation_scale * sum(_terms_bytes(model_activation_terms(shape, setup), par, tokens, cal).values())

    # transients
    grad_accum = cal.get("grad_accumulator", 1.0) * tokens * shape.dim * 4
    kernel_ws = (
        cal.get("kernel_workspace", 1.0)
        * setup.kernel_workspace_states * tokens * shape.Hv * shape.K * shape.V / setup.chunk_size * 4 / par.tp
    )
    backward = grad_accum + cal.get("workspace", 1.0) * setup.workspace_fraction * layer_full + kernel_ws
    if shape.n_attn:  # the attention backward's score-sized tensors (one block pair of the ring at a time)
        backward += setup.attention_score_tensors * setup.batch * shape.attn_heads / par.tp * tokens**2 / setup.batch**2 * 4
    if setup.ac == "full":
        backward += layer_full  # the block being recomputed
    chunk_tokens = tokens / max(1, setup.loss_chunks)
    loss = grad_accum + cal.get("loss_chunk", 1.0) * chunk_tokens * shape.vocab / par.tp * setup.loss_bytes_per_logit
    if par.fsdp > 1:
        loss += shape.vocab * shape.dim / par.tp * (a + 4)  # unsharded lm_head weight + fp32 grad
    return MemoryEstimate(
        params=params,
        grads=grads,
        optimizer=optimizer,
        fsdp_buffers=fsdp_buffers,
        activations=activations,
        model_activations=model_acts,
        loss_phase=loss,
        backward_phase=backward,
        tokens_per_rank=tokens,
        layer_activation_bytes=layer_full,
        layer_terms=full_terms,
        grads_at_peak=cal.get("grads_at_peak", 1.0) * grads,
    )


def max_seq_len(
    budget_bytes: float,
    model,
    setup: TrainSetup | None = None,
    par: Parallelism = Parallelism(),
    calibration: dict[str, float] | None = None,
    activation_scale: float = 1.0,
    multiple_of: int | None = None,
    limit: int = 1 << 34,
) -> int:
    """Longest seq_len (a multiple of ``multiple_of``, default 128*cp: every shard a multiple
    of two 64-token chunks, and divisible by 2*cp as TorchTitan requires) whose estimate fits
    ``budget_bytes``; 0 if none does. ``setup.seq_len`` is ignored."""
    setup = setup or TrainSetup(seq_len=0)
    step = multiple_of or 128 * par.cp
    if setup.loss_chunks > 1:
        step = math.lcm(step, setup.loss_chunks * par.cp)

    def fits(n_steps: int) -> bool:
        s = replace(setup, seq_len=n_steps * step)
        return estimate_memory(model, s, par, calibration, activation_scale).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi * step > limit:
            return lo * step
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo * step


def format_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"
