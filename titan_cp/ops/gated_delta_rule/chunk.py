r"""The gated delta rule, chunked: WY representation + UT transform, in plain PyTorch.

This is the CPU default kernel (``model.kernel = "torch"``) and the algorithm of
FLA's ``fla/ops/gated_delta_rule`` chunk path, written with batched matmuls and a
hand-written backward. Interface and semantics: ``titan_cp/ops/gated_delta_rule/__init__.py``.
Ground truth: ``titan_cp/ops/gated_delta_rule/recurrent.py``.

The recurrence (per batch row and head; state S is [K, V], a_t = exp(g_t))::

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = scale * S_t^T q_t

Delta-rule form: S_t = a_t S_{t-1} + k_t u_t^T with the *new value*
u_t = beta_t (v_t - a_t S_{t-1}^T k_t) (what the state did not yet predict).

Chunks
------
The sequence is cut into chunks of C tokens (the tail is padded with g = 0,
beta = 0, k = q = v = 0: a padded token leaves the state untouched). Inside one
chunk, with H the state entering it and positions t = 0..C-1:

    G_t = g_0 + ... + g_t                  cumulative log decay inside the chunk
    d_t = #document starts at positions <= t inside the chunk   (document id)

    decay_within_chunk   D[t, s] = exp(G_t - G_s)       if s <= t and d_s == d_t, else 0
    decay_from_start     gamma_t = exp(G_t)             if d_t == 0,              else 0
    decay_to_end         lam_s   = exp(G_{C-1} - G_s)   if d_s == d_{C-1},        else 0

D[t, s] is the product a_{s+1} ... a_t; gamma_t is how much of H survives to t;
lam_s how much of token s's write survives to the chunk end. Unrolling,

    S_t = gamma_t H + sum_{s <= t} D[t, s] k_s u_s^T                          (1)

and putting (1) into the definition of u_t gives a unit lower-triangular system

    (I + A) u = diag(beta) V - diag(beta gamma) K H,
    A[t, s] = beta_t D[t, s] (k_t . k_s)  for s < t, else 0.

UT transform: T = (I + A)^{-1} (unit lower triangular; one batched triangular
solve for all chunks). WY representation: with

    W = T diag(beta gamma) K   [C, K]        U = T diag(beta) V   [C, V]

the new values are u = U - W H, the output and the state leaving the chunk are

    O     = scale (diag(gamma) Q H + (Q K^T * D) u)                           (2)
    H_out = gamma_{C-1} H + K^T diag(lam) u                                   (3)

Put together, H_out = (gamma_{C-1} I - K^T diag(lam) W) H + K^T diag(lam) U:
the product of the chunk's C rank-one updates (I - beta k k^T, decayed) in WY
form, a low-rank correction of the identity built from W and K.

Everything except (3) is independent across chunks and runs as batched matmuls
over all chunks at once; only the chunk recurrence (3) (two [C,K]x[K,V]-sized
matmuls per chunk) loops over chunks.

Document starts
---------------
A start at t drops a_t and the projection: S_t = beta_t k_t v_t^T. That is the
recurrence with a_t = 0, so every decay product spanning a start is 0. It is
*not* implemented by setting g = -inf (-inf - -inf would be NaN): the document
id d_t masks the decays above, and g at a start is set to 0 (it is unused).
D is zero between tokens of different documents, gamma is zero after the first start in the chunk (the
carried-in state is forgotten), lam is zero before the last start (those writes
do not reach the next chunk), and gamma_{C-1} = 0 if the chunk holds a start.
Every exp() above is of a difference of G inside one document, so no reset
position's g enters any of them; that is exact (the masks are constants).

Backward (hand-written, :func:`chunk_backward`)
-----------------------------------------------
Saved (:class:`ChunkSaved`): the inputs (in chunk layout, accumulation dtype)
and the state entering every chunk (``state_in_chunks``, [N, B*H, K, V], i.e.
T/C states per head);
everything else (decays, T, W, U, u) is recomputed, batched, in the backward.
Given dO and the gradient dH_N of the final state, a reverse chunk loop computes

    du_n     = scale (Q K^T * D)^T dO_n + diag(lam) K dH_{n+1}
    dH_n     = scale Q^T diag(gamma) dO_n + gamma_{C-1} dH_{n+1} - W^T du_n

(dH_0 is the gradient of ``initial_state``), then all chunks at once:
through (2) and (3) to dQ, dK, dD, dgamma, dlam; through u = U - W H to
dW = -du H^T, dU = du; through the WY products to T^T dW, T^T dU (giving dK,
dV, dbeta, dgamma); through the UT transform dA = -T^T dT T^T with
dT = dW (beta gamma K)^T + dU (beta V)^T, i.e. dA = -(T^T dW) W^T - (T^T dU) U^T
(strictly lower part; dT itself is never formed); through A to dK, dbeta, dD.
The decay gradients go straight to g: g_j enters exactly the decays that span
j (D[t, s] with s < j <= t, gamma_t with t >= j, lam_s with s < j), so dg_j is
the sum of dD D, dgamma gamma and dlam lam over those (prefix sums, no O(1)
terms that cancel: under strong decay every such term is tiny and so is dg).
A decay across a document start is exactly 0, so no gradient crosses a start
and g at a start (unused) gets exactly 0.

Precision: everything is accumulated in float32 (float64 for float64 inputs),
except the in-chunk cumulative log decay G, summed in float64 (it reaches
-C |g|, where float32 would lose ~1e-4 of every decay product); each exponent is
a float64 difference rounded once. g is clamped at -1000 (exp of any sum holding
it is 0 in either dtype), so g = -inf (a_t = 0) stays finite.
o is returned in v.dtype, the final state in the accumulation dtype.

Context parallelism (:class:`ChunkSegmentKernel`)
-------------------------------------------------
A CP segment's forward runs before its incoming state S is known: the state is
carried as [H | P] [K, V + K] from [S_0 | I] with zero values in the P columns,
so the final state is [S_local | M] and the outputs [o | q_t P_t] (the WY
factors stay at width V: the P columns have no values). Once the exchange gives
S, the saved chunk states become the true ones, H_n + P_n S
(:func:`bind_incoming_state`, one [K, K] x [K, V] product per chunk), and the
backward is the plain one above from the true start S_0 + S: no transition
columns in the backward (titan_cp/ops/gated_delta_rule/transition.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from titan_cp.ops.denormals import flush_denormals
from titan_cp.ops.gated_delta_rule.interface import check_inputs
from titan_cp.ops.gated_delta_rule.transition import SegmentForward

# --------------------------------------------------------------------------------------
# Layout helpers: [B, T, H, D] <-> [N, B*H, C, D] (N chunks of C tokens; chunk n
# contiguous, so the chunk loop indexes the first dimension).
# --------------------------------------------------------------------------------------


def _to_chunks(
    x: torch.Tensor, chunk_size: int, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T, H, D] or [B, T, H] -> [N, B*H, C, D] or [N, B*H, C], zero-padded in T (one copy).

    With ``out`` ([N, B*H, C, D], e.g. a column block of a wider buffer) the chunks are
    written there; otherwise into a new contiguous tensor.
    """
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(-1)
    B, T, H, D = x.shape
    C = chunk_size
    N = -(-T // C)
    if out is None:
        out = x.new_empty(N, B * H, C, D, dtype=dtype)
    chunks = out.view(N, B, H, C, D).permute(1, 0, 3, 2, 4)  # [B, N, C, H, D], a view of out
    full = T // C  # chunks without padding
    chunks[:, :full].copy_(x[:, : full * C].unflatten(1, (full, C)))
    if full < N:  # the last chunk: T - full * C tokens, then zeros
        chunks[:, full, : T - full * C].copy_(x[:, full * C :])
        chunks[:, full, T - full * C :].zero_()
    return out.squeeze(-1) if squeeze else out


def _from_chunks(x: torch.Tensor, B: int, H: int, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, B*H, C, D] or [N, B*H, C] -> [B, T, H, D] or [B, T, H] (padding dropped)."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(-1)
    N, _, C, D = x.shape
    x = x.reshape(N, B, H, C, D).permute(1, 0, 3, 2, 4).reshape(B, N * C, H, D)[:, :T]
    x = x.squeeze(-1) if squeeze else x
    return x.to(dtype)


def _documents_in_chunks(doc_starts: torch.Tensor, H: int, chunk_size: int) -> torch.Tensor:
    """doc_starts [B, T] bool -> document id inside each chunk [N, B*H, C] (int).

    d_t counts the document starts at positions <= t of the chunk, so the state
    carried into the chunk belongs to document 0.
    """
    B, T = doc_starts.shape
    pad = (-T) % chunk_size
    starts = F.pad(doc_starts.to(torch.int32), (0, pad))  # padded tokens start nothing
    N = (T + pad) // chunk_size
    doc_id = starts.reshape(B, N, chunk_size).cumsum(-1, dtype=torch.int32)  # [B, N, C]
    return doc_id.permute(1, 0, 2)[:, :, None, :].expand(N, B, H, chunk_size).reshape(N, B * H, chunk_size)


# --------------------------------------------------------------------------------------
# Intra-chunk quantities, batched over all chunks (shared by forward and backward).
# All tensors are [N, B*H, C, ...] and contiguous, so `_flat` views them as
# [N*B*H, C, ...] for the in-place batched matmuls (baddbmm_).
# --------------------------------------------------------------------------------------


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[N, BH, R, S] -> [N*BH, R, S] (a view: in-place ops on it write into x)."""
    return x.view(-1, x.shape[-2], x.shape[-1])


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[..., j] * b[..., j]."""
    return torch.linalg.vecdot(a, b)


LOG_DECAY_FLOOR = -1000.0
"""g is clamped from below here: exp() of any sum containing it is 0 in float32 and float64
alike, so the clamp changes no result, and g = -inf (a_t = 0) gives no -inf - -inf = NaN."""

def _exp_argument_bound(dtype: torch.dtype) -> float:
    """The in-chunk decay exponents G_t - G_s are clamped to [-b, b] before exp(), b = 87 (float32)
    or 708 (float64): exp()'s slow path for arguments whose result under- or overflows (the -inf of
    masked entries included) costs 5-30x its fast one. exp(-b) is about the dtype's smallest normal
    number; the entries clamped there (true decays below it) are set to exactly 0 afterwards, those
    above the diagonal or across a document start are masked to 0, so no result changes beyond
    1e-38 absolute (a lower-triangle growth above e^b would overflow anyway)."""
    return float(math.floor(-math.log(torch.finfo(dtype).tiny)))


def _chunk_decays(g_chunks: torch.Tensor, doc_id: torch.Tensor | None):
    """Decay factors of every chunk from the log decays g_chunks [N, BH, C].

    G is summed in float64 (it reaches -C * |g|, e.g. -640 for g = -10, where a
    float32 sum would be off by ~1e-4 absolute, i.e. every decay product by 1e-4
    relative) and every exponent is a float64 difference rounded once to the
    accumulation dtype. g at a document start is unused (set to 0) and g is clamped
    at ``LOG_DECAY_FLOOR``, so g = -inf anywhere gives finite results.

    Returns
      decay_within_chunk  [N, BH, C, C]  D[t, s] = exp(G_t - G_s) if s <= t, same document; else 0
      decay_from_start    [N, BH, C]     gamma_t = exp(G_t) if no document start in 0..t; else 0
      decay_to_end        [N, BH, C]     lam_s = exp(G_last - G_s) if same document as last; else 0
    """
    acc = g_chunks.dtype
    N, BH, C = g_chunks.shape
    g64 = g_chunks.to(torch.float64).clamp(min=LOG_DECAY_FLOOR)
    if doc_id is not None:
        g64.masked_fill_(_document_starts(doc_id), 0.0)
    G = g64.cumsum(-1)  # [N, BH, C] float64
    causal = torch.ones(C, C, dtype=acc, device=G.device).tril_()  # [C, C]
    if doc_id is not None:
        causal = causal * (doc_id[..., :, None] == doc_id[..., None, :])  # [N, BH, C, C]
    # One pass per step, in place: the float64 difference rounded once into acc, clamped
    # (_exp_argument_bound), exp, the entries clamped to the floor to 0, the mask.
    bound = _exp_argument_bound(acc)
    decay_within_chunk = torch.sub(G[..., :, None], G[..., None, :], out=G.new_empty(N, BH, C, C, dtype=acc))
    decay_within_chunk.clamp_(-bound, bound).exp_()
    F.threshold_(decay_within_chunk, math.exp(-bound) * (1 + 1e-6), 0.0)
    decay_within_chunk.mul_(causal)
    decay_from_start = G.to(acc).exp()  # [N, BH, C] (not in place: G may be that tensor)
    decay_to_end = (G[..., -1:] - G).to(acc).exp_()  # [N, BH, C]
    if doc_id is not None:
        decay_from_start.mul_(doc_id == 0)
        decay_to_end.mul_(doc_id == doc_id[..., -1:])
    return decay_within_chunk, decay_from_start, decay_to_end


def _document_starts(doc_id: torch.Tensor) -> torch.Tensor:
    """[N, BH, C] document ids -> bool, True where a document starts (the id steps up)."""
    return torch.diff(doc_id, dim=-1, prepend=torch.zeros_like(doc_id[..., :1])) != 0


def _wy_representation(k_chunks, v_chunks, beta_chunks, decay_within_chunk, decay_from_start, state_width,
                       keep_kkT_D: bool = True):
    """UT transform and WY representation of every chunk.

    ``state_width`` >= V is the width of the state (V + K with the transition columns).
    Returns
      T_inv     [N, BH, C, C]                T = (I + A)^{-1}, A[t, s] = beta_t D[t, s] k_t.k_s (s < t)
      kkT_D     [N, BH, C, C]                (K K^T) * D  (A = diag(beta) kkT_D below the diagonal);
                None unless ``keep_kkT_D`` (then A is built in its place)
      W         [N, BH, C, K]                W = T diag(beta gamma) K
      U         [N, BH, C, state_width]      [U | 0] = T [diag(beta) V | 0]: U padded with zero columns to the
                state width (the transition columns have no values)
    W and U are separate contiguous tensors (two matmuls, not one into [W | U]): a matmul whose output
    is a column block of a wider tensor runs as one small matmul per chunk and head in torch on CPU,
    and the forward's chunk loop updates U in place.
    """
    N, BH, C, K = k_chunks.shape
    V = v_chunks.shape[-1]
    kkT_D = (k_chunks @ k_chunks.transpose(-1, -2)).mul_(decay_within_chunk)  # [N, BH, C, C]
    # A with junk on the diagonal: the solve reads only the strictly lower part
    # (unitriangular=True takes the diagonal as 1; upper=False ignores the rest).
    # Solved as T (I + A) = I (left=False): that is (I + A)^T T^T = I, whose matrix
    # A^T is the row-major A read column-major, so the solver copies no A.
    A_and_diagonal = kkT_D * beta_chunks[..., :, None] if keep_kkT_D else kkT_D.mul_(beta_chunks[..., :, None])
    eye = torch.eye(C, dtype=kkT_D.dtype, device=kkT_D.device)
    T_inv = torch.linalg.solve_triangular(
        A_and_diagonal, eye.expand_as(kkT_D), upper=False, left=False, unitriangular=True
    )
    W = T_inv @ (k_chunks * (beta_chunks * decay_from_start)[..., None])
    v_scaled = k_chunks.new_empty(N, BH, C, state_width)  # [diag(beta) V | 0]
    torch.mul(v_chunks, beta_chunks[..., None], out=v_scaled[..., :V])
    v_scaled[..., V:] = 0
    U = T_inv @ v_scaled
    return T_inv, (kkT_D if keep_kkT_D else None), W, U


# --------------------------------------------------------------------------------------
# Forward and backward as functions (the autograd Function below and CP's segment
# kernel, titan_cp/ops/gated_delta_rule/transition.py, both call them).
# --------------------------------------------------------------------------------------


class ChunkSaved(NamedTuple):
    """What :func:`chunk_backward` reads: the inputs in chunk layout (accumulation dtype, q with
    the scale folded in), the state entering every chunk ``state_in_chunks`` [N, B*H, K, V] and
    the document ids; ``meta`` holds the shapes, the scale and the input dtypes."""

    tensors: tuple[torch.Tensor | None, ...]  # q, k, v, g, beta chunks, state_in_chunks, doc_id
    meta: tuple


def chunk_forward(q, k, v, g, beta, initial_state, doc_starts, scale: float, chunk_size: int,
                  with_transition: bool):
    """The chunked forward (module docstring): returns o [B, T, H, V] (dtype of v), the final
    state, q_transition (None unless ``with_transition``) and the :class:`ChunkSaved` context.

    ``with_transition``: the state is carried as [H | P] [K, V + K] from [S_0 | I] (values 0 in
    the P columns), so the final state is [S_local | M] and q_transition = scale q_t P_t; the
    WY factors stay at width V. Its saved chunk states are that wide too, until
    :func:`bind_incoming_state` turns them into the true states (width V).
    """
    with flush_denormals():
        B, T, H, K = q.shape
        V = v.shape[-1]
        Vw = V + K if with_transition else V  # state width: [S | P] with the transition columns
        acc = torch.promote_types(q.dtype, torch.float32)
        C = chunk_size

        q_chunks = _to_chunks(q, C, acc).mul_(scale)  # [N, BH, C, K]  (scale folded into q)
        k_chunks = _to_chunks(k, C, acc)  # [N, BH, C, K]
        v_chunks = _to_chunks(v, C, acc)  # [N, BH, C, V]
        g_chunks = _to_chunks(g, C, acc)  # [N, BH, C]
        beta_chunks = _to_chunks(beta, C, acc)  # [N, BH, C]
        doc_id = None if doc_starts is None else _documents_in_chunks(doc_starts, H, C)  # [N, BH, C]
        N = q_chunks.shape[0]

        # states[n] = H_n, the state entering chunk n; states[N] is the final state.
        states = q_chunks.new_empty(N + 1, B * H, K, Vw)
        if initial_state is None:
            states[0, :, :, :V] = 0
        else:
            states[0, :, :, :V] = initial_state.reshape(B * H, K, V)
        if with_transition:  # [H | I]: the identity columns carry the transition
            states[0, :, :, V:] = torch.eye(K, dtype=acc, device=states.device)

        D, gamma, lam = _chunk_decays(g_chunks, doc_id)
        # W [N, BH, C, K]; new_values = [U | 0] [N, BH, C, Vw], turned into u in place by the loop.
        _, _, W, new_values = _wy_representation(k_chunks, v_chunks, beta_chunks, D, gamma, Vw, keep_kkT_D=False)
        gamma_last = gamma[..., -1, None, None]  # [N, BH, 1, 1]
        k_to_end_T = (k_chunks * lam[..., None]).transpose(-1, -2)  # K^T diag(lam) [N, BH, K, C]

        # The chunk recurrence (3), the only sequential part:
        #   u_n = U_n - W_n H_n,   H_{n+1} = gamma_last_n H_n + K_n^T diag(lam_n) u_n
        # (unbind: one op for the per-chunk views instead of eight indexing ops per chunk)
        u_n, W_n, H_n, gamma_last_n, k_to_end_T_n = (
            x.unbind(0) for x in (new_values, W, states, gamma_last, k_to_end_T)
        )
        for n in range(N):
            u_n[n].baddbmm_(W_n[n], H_n[n], alpha=-1)
            torch.mul(H_n[n], gamma_last_n[n], out=H_n[n + 1]).baddbmm_(k_to_end_T_n[n], u_n[n])
        state_in_chunks = states[:N]  # [N, BH, K, Vw]
        final_state = states[N].reshape(B, H, K, Vw).clone()  # a separate tensor: users may modify it

        # Outputs (2), all chunks at once: O = diag(gamma) Q H + (Q K^T * D) u.
        qk = (q_chunks @ k_chunks.transpose(-1, -2)).mul_(D)  # [N, BH, C, C], zero above the diagonal
        o_chunks = qk @ new_values  # [N, BH, C, Vw]
        _flat(o_chunks).baddbmm_(_flat(q_chunks * gamma[..., None]), _flat(state_in_chunks))
        o = _from_chunks(o_chunks[..., :V], B, H, T, v.dtype)
        q_transition = _from_chunks(o_chunks[..., V:], B, H, T, acc) if with_transition else None

    meta = (B, T, H, K, V, Vw, scale, q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype,
            None if initial_state is None else initial_state.dtype)
    saved = ChunkSaved((q_chunks, k_chunks, v_chunks, g_chunks, beta_chunks, state_in_chunks, doc_id), meta)
    return o, final_state, q_transition, saved


def bind_incoming_state(saved: ChunkSaved, incoming_state: torch.Tensor | None) -> ChunkSaved:
    """A transition forward's context once the true incoming state S is known: the chunk states
    [H_n | P_n] (from [S_0 | I]) become the true states H_n + P_n S (width V), so the backward is
    the plain one from the true start S_0 + S. A plain forward's context is returned as is
    (``incoming_state`` must then be None: its start already was the true one)."""
    q_chunks, k_chunks, v_chunks, g_chunks, beta_chunks, state_in_chunks, doc_id = saved.tensors
    B, T, H, K, V, Vw = saved.meta[:6]
    if Vw == V:
        if incoming_state is not None:
            raise ValueError("bind_incoming_state: a plain forward has no transition to apply an incoming state to")
        return saved
    with flush_denormals():
        incoming = incoming_state.reshape(B * H, K, V).to(state_in_chunks.dtype)
        true_states = torch.matmul(state_in_chunks[..., V:], incoming).add_(state_in_chunks[..., :V])
    meta = saved.meta[:5] + (V,) + saved.meta[6:]
    return ChunkSaved((q_chunks, k_chunks, v_chunks, g_chunks, beta_chunks, true_states, doc_id), meta)


def chunk_backward(saved: ChunkSaved, d_o: torch.Tensor | None, d_final_state: torch.Tensor | None):
    """The hand-written backward (module docstring) of a plain forward, or of a transition forward
    after :func:`bind_incoming_state`. Returns dq, dk, dv, dg, dbeta in the inputs' dtypes and the
    gradient of the start state [B, H, K, V] (None if the forward had no ``initial_state``)."""
    with flush_denormals():
        return _chunk_backward(saved, d_o, d_final_state)


def _chunk_backward(saved: ChunkSaved, d_o, d_final_state):
    q_chunks, k_chunks, v_chunks, g_chunks, beta_chunks, state_in_chunks, doc_id = saved.tensors
    B, T, H, K, V, Vw, scale, q_dtype, k_dtype, v_dtype, g_dtype, beta_dtype, h0_dtype = saved.meta
    if Vw != V:
        raise ValueError("chunk_backward: a transition forward's context needs bind_incoming_state first")
    acc = q_chunks.dtype
    N, BH, C, _ = q_chunks.shape

    # Recompute the intra-chunk quantities (cheap, batched) instead of saving them.
    D, gamma, lam = _chunk_decays(g_chunks, doc_id)
    T_inv, kkT_D, W, U = _wy_representation(k_chunks, v_chunks, beta_chunks, D, gamma, V)  # W [N, BH, C, K], U [.., V]
    new_values = torch.baddbmm(_flat(U), _flat(W), _flat(state_in_chunks), alpha=-1).view(N, BH, C, V)  # u = U - W H
    qk = (q_chunks @ k_chunks.transpose(-1, -2)).mul_(D)  # Q K^T * D   [N, BH, C, C]
    gamma_last = gamma[..., -1, None, None]  # [N, BH, 1, 1]
    k_to_end = k_chunks * lam[..., None]  # diag(lam) K   [N, BH, C, K]
    q_from_start = q_chunks * gamma[..., None]  # diag(gamma) Q   [N, BH, C, K]

    d_o_chunks = q_chunks.new_zeros(N, BH, C, V) if d_o is None else _to_chunks(d_o, C, acc)  # [N, BH, C, V]
    # d_states[n] = dH_n (d_states[N] = gradient of the final state, d_states[0] of the start state).
    d_states = q_chunks.new_empty(N + 1, BH, K, V)
    if d_final_state is None:
        d_states[N] = 0
    else:
        d_states[N] = d_final_state.reshape(BH, K, V)

    # Reverse chunk recurrence:
    #   du_n = (Q K^T * D)^T dO_n + diag(lam) K dH_{n+1}
    #   dH_n = Q^T diag(gamma) dO_n + gamma_last dH_{n+1} - W^T du_n
    # The parts from O, batched over all chunks first: du into d_new_values, dH into d_states[:N].
    d_new_values = qk.transpose(-1, -2) @ d_o_chunks  # [N, BH, C, V]
    torch.matmul(q_from_start.transpose(-1, -2), d_o_chunks, out=d_states[:N])
    W_T = W.transpose(-1, -2)  # [N, BH, K, C]
    # (unbind: one op for the per-chunk views instead of eight indexing ops per chunk)
    d_u_n, k_to_end_n, gamma_last_n, W_T_n, d_H_n = (
        x.unbind(0) for x in (d_new_values, k_to_end, gamma_last, W_T, d_states)
    )
    for n in range(N - 1, -1, -1):
        d_u_n[n].baddbmm_(k_to_end_n[n], d_H_n[n + 1])
        d_H_n[n].addcmul_(d_H_n[n + 1], gamma_last_n[n]).baddbmm_(W_T_n[n], d_u_n[n], alpha=-1)
    d_state_out_chunks = d_states[1:]  # gradient of the state leaving chunk n   [N, BH, K, V]
    d_initial_state = d_states[0].clone()  # [BH, K, V]
    del q_from_start, k_to_end, W_T, d_u_n, k_to_end_n, gamma_last_n, W_T_n, d_H_n  # (keeps the peak memory down)

    # Through the outputs (2): O = diag(gamma) Q H + (Q K^T * D) u.
    d_q_from_start = d_o_chunks @ state_in_chunks.transpose(-1, -2)  # [N, BH, C, K]
    d_gamma = _row_dot(d_q_from_start, q_chunks)  # [N, BH, C]
    d_q = d_q_from_start.mul_(gamma[..., None])
    d_qk = d_o_chunks @ new_values.transpose(-1, -2)  # d(Q K^T * D)   [N, BH, C, C]
    del d_o_chunks
    d_D_times_D = qk.mul_(d_qk)  # dD * D (dD = d(Q K^T * D) * Q K^T), accumulated below   [N, BH, C, C]
    del qk
    d_qk.mul_(D)  # d(Q K^T)
    _flat(d_q).baddbmm_(_flat(d_qk), _flat(k_chunks))
    d_k = d_qk.transpose(-1, -2) @ q_chunks  # [N, BH, C, K]
    del d_qk

    # Through the state update (3): H_out = gamma_last H + K^T diag(lam) u.
    u_dH_T = new_values @ d_state_out_chunks.transpose(-1, -2)  # [N, BH, C, K]
    d_lam = _row_dot(u_dH_T, k_chunks)  # [N, BH, C]
    d_k.addcmul_(u_dH_T, lam[..., None])
    del u_dH_T, new_values  # (before the [N, BH, K, Vw] product below: keeps the peak memory down)
    d_gamma[..., -1] += _row_dot(state_in_chunks.flatten(-2), d_state_out_chunks.flatten(-2))
    del d_states, d_state_out_chunks

    # Through u = U - W H: dW = -du H^T, dU = du; through W = T (beta gamma K), U = T (beta V).
    T_inv_T = T_inv.transpose(-1, -2)
    # (The minus signs are carried, not applied: -dW and -T^T dW are what the products give.)
    minus_d_W = d_new_values @ state_in_chunks.transpose(-1, -2)  # -dW   [N, BH, C, K]
    minus_d_k_scaled = T_inv_T @ minus_d_W  # -T^T dW = -d(diag(beta gamma) K)   [N, BH, C, K]
    d_v_scaled = T_inv_T @ d_new_values  # T^T dU = d(diag(beta) V)   [N, BH, C, V]
    del minus_d_W, d_new_values, T_inv, T_inv_T
    # Through the UT transform: dA = -T^T dT T^T with dT = dW (beta gamma K)^T + dU (beta V)^T,
    # i.e. dA = -(T^T dW) W^T - (T^T dU) U^T, strictly lower.
    d_A = torch.matmul(minus_d_k_scaled, W.transpose(-1, -2))  # [N, BH, C, C]
    _flat(d_A).baddbmm_(_flat(d_v_scaled), _flat(U.transpose(-1, -2)), alpha=-1).tril_(-1)
    del W, U

    # Through diag(beta gamma) K and diag(beta) V.
    d_k.addcmul_(minus_d_k_scaled, (beta_chunks * gamma)[..., None], value=-1)
    minus_d_k_scaled_dot_k = _row_dot(minus_d_k_scaled, k_chunks)  # [N, BH, C]
    d_beta = _row_dot(d_v_scaled, v_chunks).sub_(minus_d_k_scaled_dot_k * gamma)
    d_v = d_v_scaled.mul_(beta_chunks[..., None])
    d_gamma.sub_(minus_d_k_scaled_dot_k * beta_chunks)

    # Through A = diag(beta) (K K^T * D) (strictly lower).
    d_A_kkT_D = kkT_D.mul_(d_A)  # [N, BH, C, C]
    d_beta.add_(d_A_kkT_D.sum(-1))
    d_D_times_D.addcmul_(d_A_kkT_D, beta_chunks[..., :, None])
    del d_A_kkT_D, kkT_D
    d_kkT = d_A.mul_(D).mul_(beta_chunks[..., :, None])  # d(K K^T), strictly lower
    _flat(d_k).baddbmm_(_flat(d_kkT + d_kkT.transpose(-1, -2)), _flat(k_chunks))

    # Decays -> g. With G_t = g_0 + ... + g_t, g_j enters D[t, s] for s < j <= t, gamma_t for
    # t >= j and lam_s for s < j, so
    #   dg_j = sum_{s < j <= t} dD[t, s] D[t, s] + sum_{t >= j} dgamma_t gamma_t + sum_{s < j} dlam_s lam_s.
    # Each sum holds only terms whose decay spans j (no O(1) terms that cancel: going through
    # dG_t and a reverse cumsum would subtract the diagonal dD[t, t] terms, off by 1.8x relative
    # at g = -20 in float32). Across a document start every such decay is exactly 0, so no
    # gradient crosses a start and g at a start (unused) gets exactly 0.
    # First sum: row prefix sums P[t, s] = sum_{s' <= s} dD[t, s'] D[t, s'], then for j = s + 1
    # the column sum of P[t, j - 1] over t >= j, i.e. over the strictly lower part.
    crossing = d_D_times_D.cumsum_(-1).tril_(-1).sum(-2)  # [N, BH, C]: column s -> dg_{s+1}
    del d_D_times_D
    d_lam_lam = d_lam.mul_(lam)
    d_g = (d_gamma.mul_(gamma)).flip(-1).cumsum(-1).flip(-1)  # sum_{t >= j} dgamma_t gamma_t
    d_g[..., 1:] += crossing[..., :-1] + d_lam_lam[..., :-1].cumsum(-1)

    d_q.mul_(scale)  # q_chunks had the scale folded in
    return (
        _from_chunks(d_q, B, H, T, q_dtype),
        _from_chunks(d_k, B, H, T, k_dtype),
        _from_chunks(d_v, B, H, T, v_dtype),
        _from_chunks(d_g, B, H, T, g_dtype),
        _from_chunks(d_beta, B, H, T, beta_dtype),
        None if h0_dtype is None else d_initial_state.reshape(B, H, K, V).to(h0_dtype),
    )


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """:func:`chunk_forward` / :func:`chunk_backward` (plain, width V) under autograd."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, doc_starts, scale, chunk_size):
        o, final_state, _, saved = chunk_forward(q, k, v, g, beta, initial_state, doc_starts, scale, chunk_size,
                                                 with_transition=False)
        ctx.save_for_backward(*saved.tensors)
        ctx.meta = saved.meta
        return o, final_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final_state):
        grads = chunk_backward(ChunkSaved(ctx.saved_tensors, ctx.meta), d_o, d_final_state)
        return (*grads, None, None, None)


def _checked_scale(q, k, v, g, beta, scale, initial_state, doc_starts, chunk_size) -> float:
    """Validate the inputs; the scale (K^-1/2 by default)."""
    check_inputs(q, k, v, g, beta, initial_state, doc_starts)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"gated delta rule: chunk_size must be a positive int, got {chunk_size!r}")
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def chunk_gated_delta_rule(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule by chunks (WY/UT transform) with a hand-written backward.

    Shapes and semantics as in :mod:`titan_cp.ops.gated_delta_rule`: q, k [B, T, H, K],
    v [B, T, H, V], g, beta [B, T, H], initial_state [B, H, K, V] or None,
    doc_starts [B, T] bool or None. Returns o [B, T, H, V] (dtype of v) and the
    final state [B, H, K, V] (float32, float64 for float64 inputs) or None.
    ``chunk_size`` is the number of tokens per chunk (any T works; the tail is
    padded internally).
    """
    scale = _checked_scale(q, k, v, g, beta, scale, initial_state, doc_starts, chunk_size)
    o, final_state = _ChunkGatedDeltaRule.apply(q, k, v, g, beta, initial_state, doc_starts, scale, chunk_size)
    return o, (final_state if output_final_state else None)


class ChunkSegmentKernel:
    """The ``torch`` kernel as a CP segment kernel (:class:`titan_cp.ops.gated_delta_rule.transition.SegmentKernel`).

    forward: :func:`chunk_forward`, with the transition as K extra state columns riding only
    through the chunk loop and the outputs (the WY factors stay at width V). Once the exchange
    gives the true incoming state S, :func:`bind_incoming_state` turns the saved chunk states
    into the true ones, H_n + P_n S (width V), and the backward is the plain
    :func:`chunk_backward` from the true start.
    """

    def __init__(self, chunk_size: int = 64):
        self.chunk_size = chunk_size

    def forward(self, q, k, v, g, beta, *, scale=None, initial_state=None, doc_starts=None, with_transition=True):
        scale = _checked_scale(q, k, v, g, beta, scale, initial_state, doc_starts, self.chunk_size)
        o, final_state, q_transition, saved = chunk_forward(q, k, v, g, beta, initial_state, doc_starts, scale,
                                                            self.chunk_size, with_transition)
        V = v.shape[-1]
        M = final_state[..., V:] if with_transition else None
        return SegmentForward(o, q_transition, final_state[..., :V], M, saved.tensors, saved.meta)

    def bind_incoming_state(self, tensors, meta, incoming_state):
        saved = bind_incoming_state(ChunkSaved(tensors, meta), incoming_state)
        return saved.tensors, saved.meta

    def q_transition(self, tensors, meta):
        """q_t P_t again from the saved chunks (q holds the scale): the transition forward at value
        width 0, whose outputs are the transition columns alone."""
        q_chunks, k_chunks, _, g_chunks, beta_chunks, _, doc_id = tensors
        B, T, H = meta[:3]
        q, k, g, beta = (_from_chunks(x, B, H, T, x.dtype) for x in (q_chunks, k_chunks, g_chunks, beta_chunks))
        doc_starts = None
        if doc_id is not None:  # the [N, B*H, C] ids back to [B, T] starts (every head has the same)
            starts = _document_starts(doc_id).view(-1, B, H, self.chunk_size)[:, :, 0]
            doc_starts = starts.permute(1, 0, 2).reshape(B, -1)[:, :T]
        return chunk_forward(q, k, q.new_zeros(B, T, H, 0), g, beta, None, doc_starts, 1.0, self.chunk_size,
                             with_transition=True)[2]

    def backward(self, tensors, meta, d_o, d_final_state):
        return chunk_backward(ChunkSaved(tensors, meta), d_o, d_final_state)


__all__ = ["ChunkSaved", "ChunkSegmentKernel", "bind_incoming_state", "chunk_backward", "chunk_forward",
           "chunk_gated_delta_rule"]
