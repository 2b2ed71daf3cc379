"""``model.kernel = "triton"``: FLA's Triton ``chunk_gated_delta_rule`` behind titan_cp's kernel interface.

FLA 0.6.0 (``fla.ops.gated_delta_rule.chunk_gated_delta_rule``) computes the
same recurrence as every titan_cp kernel (see :mod:`titan_cp.ops.gated_delta_rule`) with the
same layouts: q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H] (g is the
log decay, beta post-sigmoid), state [N, H, K, V] float32 (``state_v_first =
False``, the default). What it lacks is ``doc_starts``; it has variable-length
batches instead (``cu_seqlens``, FlashAttention style: batch size 1, the
sequences concatenated, one initial and one final state per sequence).

This module converts one into the other:

    [B, T] rows + doc_starts  ->  one varlen batch of N segments,
    cu_seqlens = every row start and every document start (sorted, unique) + [B*T]

- segment initial state: the row's ``initial_state`` for the first segment of
  each row, unless the row begins with a document start (then zeros, like
  every other segment: a document start drops the state);
- row final state: the final state of the row's last segment.

A document start at t is exactly a new varlen sequence starting at t with a
zero state (S_t = beta_t k_t v_t^T either way), so the conversion is exact.
The conversion is pure PyTorch (:func:`varlen_layout`,
:func:`segment_initial_states`, :func:`row_final_states`) and the whole
wrapper (:func:`gated_delta_rule_via_varlen`) takes the varlen op as an
argument, so CPU tests run it with a recurrent stand-in for FLA's kernel
(tests/unit/test_triton_kernel.py). Gradients (q, k, v, g, beta, initial_state)
flow through FLA's backward and the index ops here by autograd.

Flags passed to FLA: ``use_qk_l2norm_in_kernel=False`` (our layer normalises q
and k itself, titan_cp.ops.gated_delta_rule.mixing.l2norm), ``use_beta_sigmoid_in_kernel=False``
(beta is already a probability), ``use_gate_in_kernel=False`` (g is already
``-exp(A_log) * softplus(a + dt_bias)``), ``state_v_first=False`` ([K, V]
states, our layout). The context-parallel call of titan_cp.cp.state_passing (values
[v | 0] of width V + K, initial state [0 | I], final state [S_local | M]) needs
nothing else: FLA tiles V in blocks of BV (any V), and K <= 256.

Precision notes (FLA 0.6.0, read from its code): the chunk states h that the
output kernel reads (and w, u, v_new) are stored in the input dtype (bf16 for
bf16 inputs), the running state and the final state in float32; for fp32
inputs ``tl.dot`` runs in TF32 on Ampere and newer (Triton's default; FLA
forces IEEE only on older GPUs, and its UT-transform solve asks for TF32
explicitly); ``TRITON_F32_DEFAULT=ieee`` gives full fp32 dots.

CPU testing: tests/support/triton_interpreter.py makes FLA's real kernels run under
``TRITON_INTERPRET=1`` (tiny shapes; tests/unit/test_triton_kernel.py).

Other FLA switches worth knowing on a GPU machine: FLA dispatches
``chunk_gated_delta_rule`` to the FlashQLA backend when the ``flash_qla``
package is installed, on Hopper/Blackwell, bf16/fp16, K = V = 128, no CP
context (``FLA_FLASH_QLA=0`` disables it; titan_cp's augmented CP call has
V + K values, so it never qualifies there). ``FLA_DISABLE_BACKEND_DISPATCH=1``
bypasses every backend.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from titan_cp.ops.gated_delta_rule.interface import check_inputs

FLA_VERSION = "0.6.0"
CONFIG_HINT = (
    "model.kernel = 'triton' needs a CUDA GPU and FLA: pip install 'titan_cp[gpu]' "
    f"(flash-linear-attention=={FLA_VERSION}), or set model.kernel = 'torch'"
)
# The FLA keyword arguments this wrapper relies on (checked once, so an FLA API change is a clear error).
_FLA_ARGS = ("scale", "initial_state", "output_final_state", "use_qk_l2norm_in_kernel", "cu_seqlens", "cu_seqlens_cpu")


@functools.cache
def _import_fla_chunk() -> Callable:
    """FLA's chunk_gated_delta_rule (its import warns about the missing GPU on CPU machines: silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule


def check_triton_available() -> None:
    """Raise RuntimeError naming ``model.kernel`` and the fix unless the Triton path can run here.

    Needs: a visible CUDA device, ``import triton``, FLA's chunk_gated_delta_rule
    with the keyword arguments this wrapper passes.
    """
    problems = []
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        problems.append(f"no CUDA device is visible (torch {torch.__version__}: torch.cuda.is_available() is False)")
    try:
        import triton  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any import failure means the path is unusable
        problems.append(f"'import triton' failed: {type(error).__name__}: {error}")
    if not has_cuda:
        # Importing FLA takes seconds and cannot help without a GPU: only say whether it is installed.
        if importlib.util.find_spec("fla") is None:
            problems.append("FLA (package 'fla') is not installed")
    else:
        try:
            fla_chunk = _import_fla_chunk()
        except Exception as error:  # noqa: BLE001
            problems.append(f"'from fla.ops.gated_delta_rule import chunk_gated_delta_rule' failed: "
                            f"{type(error).__name__}: {error}")
        else:
            params = inspect.signature(inspect.unwrap(fla_chunk)).parameters
            missing = [name for name in _FLA_ARGS if name not in params]
            if missing:
                problems.append(f"the installed FLA's chunk_gated_delta_rule lacks {missing} "
                                f"(titan_cp is written against flash-linear-attention=={FLA_VERSION})")
    if problems:
        raise RuntimeError(f"{CONFIG_HINT}. Not usable here: " + "; ".join(problems) + ".")


# --------------------------------------------------------------------------------------
# [B, T] + doc_starts <-> one varlen batch (pure PyTorch, unit-tested on CPU).
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VarlenLayout:
    """How B rows of T tokens with document starts become N varlen segments.

    cu_seqlens:           [N + 1] int64, segment boundaries in the flattened [B * T] sequence
    first_segment_of_row: [B] int64, the segment each row begins with
    last_segment_of_row:  [B] int64, the segment each row ends with
    row_keeps_state:      [B] bool, False where the row begins with a document start
                          (its initial_state is dropped)
    """

    cu_seqlens: torch.Tensor
    first_segment_of_row: torch.Tensor
    last_segment_of_row: torch.Tensor
    row_keeps_state: torch.Tensor

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1


def varlen_layout(doc_starts: torch.Tensor | None, B: int, T: int) -> VarlenLayout:
    """Segments of the flattened [B * T] sequence: cut at every row start and every document start.

    One host sync (``nonzero``) when ``doc_starts`` is given: the number of
    segments sizes FLA's grids.
    """
    if T < 1 or B < 1:
        raise ValueError(f"varlen_layout: need B >= 1 and T >= 1, got B={B}, T={T}")
    device = doc_starts.device if doc_starts is not None else torch.device("cpu")
    row_starts = torch.arange(B, device=device, dtype=torch.int64) * T
    if doc_starts is None:
        boundaries = row_starts
        keeps = torch.ones(B, dtype=torch.bool, device=device)
    else:
        if tuple(doc_starts.shape) != (B, T) or doc_starts.dtype != torch.bool:
            raise ValueError(f"varlen_layout: doc_starts must be bool [B, T] = {(B, T)}, "
                             f"got {doc_starts.dtype} {tuple(doc_starts.shape)}")
        cuts = doc_starts.clone()
        cuts[:, 0] = True  # every row starts a segment
        boundaries = cuts.reshape(-1).nonzero().squeeze(1)  # sorted, unique
        keeps = ~doc_starts[:, 0]
    total = torch.full((1,), B * T, dtype=torch.int64, device=device)
    cu_seqlens = torch.cat([boundaries, total])
    first = torch.searchsorted(boundaries, row_starts)
    num_segments = boundaries.numel()
    last = torch.cat([first[1:] - 1, torch.full((1,), num_segments - 1, dtype=torch.int64, device=device)])
    return VarlenLayout(cu_seqlens, first, last, keeps)


def segment_initial_states(initial_state: torch.Tensor | None, layout: VarlenLayout) -> torch.Tensor | None:
    """[B, H, K, V] row states -> [N, H, K, V] segment states (zeros except rows' first segments).

    Differentiable: the gradient of a row's initial_state is the gradient of its
    first segment's state, or exactly 0 if the row begins with a document start.
    """
    if initial_state is None:
        return None
    B = initial_state.shape[0]
    kept = torch.where(layout.row_keeps_state.view(B, 1, 1, 1), initial_state, torch.zeros_like(initial_state))
    states = initial_state.new_zeros(layout.num_segments, *initial_state.shape[1:])
    return states.index_copy(0, layout.first_segment_of_row, kept)


def row_final_states(segment_final_states: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """[N, H, K, V] segment final states -> [B, H, K, V]: each row's last segment."""
    return segment_final_states.index_select(0, layout.last_segment_of_row)


def row_final_state_grads(row_grads: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """The adjoint of :func:`row_final_states`: [B, H, K, V] -> [N, H, K, V], each row's gradient
    on its last segment, zeros elsewhere (for backward passes written by hand)."""
    segment_grads = row_grads.new_zeros(layout.num_segments, *row_grads.shape[1:])
    return segment_grads.index_copy(0, layout.last_segment_of_row, row_grads)


def segment_initial_state_grads(segment_grads: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """The adjoint of :func:`segment_initial_states`: [N, H, K, V] -> [B, H, K, V], each row's
    first segment's gradient, exactly 0 for a row that begins with a document start."""
    B = layout.first_segment_of_row.numel()
    first = segment_grads.index_select(0, layout.first_segment_of_row)
    return first * layout.row_keeps_state.view(B, *([1] * (first.dim() - 1)))


VarlenKernel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
"""FLA's varlen signature: (q, k, v, g, beta, *, scale, initial_state, output_final_state,
cu_seqlens, cu_seqlens_cpu) -> (o, final_state [N, H, K, V] or None); with
cu_seqlens the inputs are [1, total, ...]."""


def call_rows_as_varlen(varlen_fn: Callable, inputs: tuple[torch.Tensor, ...], initial_state: torch.Tensor | None,
                        doc_starts: torch.Tensor | None, **kwargs) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Run ``varlen_fn`` (FLA's calling convention) on [B, T] rows with document starts.

    ``inputs`` are [B, T, ...] (q, k, v, g, beta); ``varlen_fn(*inputs, initial_state=,
    cu_seqlens=, cu_seqlens_cpu=, **kwargs)`` returns per-token outputs followed by the
    final states (or None). Returns the per-token outputs as [B, T, ...] and the final
    state of every row (the module docstring's conversion; none without doc_starts).
    """
    B, T = inputs[0].shape[:2]
    if doc_starts is None:  # plain batch: rows are FLA's sequences, no conversion
        *outputs, final = varlen_fn(*inputs, initial_state=initial_state, cu_seqlens=None, cu_seqlens_cpu=None,
                                    **kwargs)
        return outputs, final
    layout = varlen_layout(doc_starts, B, T)
    *outputs, final = varlen_fn(
        *(x.reshape(1, B * T, *x.shape[2:]) for x in inputs),
        initial_state=segment_initial_states(initial_state, layout),
        cu_seqlens=layout.cu_seqlens,
        cu_seqlens_cpu=layout.cu_seqlens.cpu(),
        **kwargs,
    )
    outputs = [x.reshape(B, T, *x.shape[2:]) for x in outputs]
    return outputs, (None if final is None else row_final_states(final, layout))


def gated_delta_rule_via_varlen(
    varlen_kernel: VarlenKernel,
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """titan_cp's kernel interface on top of a varlen kernel with FLA's signature."""
    check_inputs(q, k, v, g, beta, initial_state, doc_starts)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    (o,), final = call_rows_as_varlen(varlen_kernel, (q, k, v, g, beta), initial_state, doc_starts,
                                      scale=scale, output_final_state=output_final_state)
    return o, final


def fla_varlen(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu):
    """FLA's chunk_gated_delta_rule as a :data:`VarlenKernel`, with the flags of the module docstring."""
    fla_chunk = _import_fla_chunk()
    o, final = fla_chunk(
        q, k, v, g, beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,  # the layer already L2-normalised q and k
        cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
    )
    return o.to(v.dtype), final


def triton_gated_delta_rule(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule with FLA's Triton chunk kernels (CUDA only).

    Interface and semantics as in :mod:`titan_cp.ops.gated_delta_rule`; ``doc_starts`` is
    turned into FLA's ``cu_seqlens`` (module docstring).
    """
    if q.device.type != "cuda":
        raise RuntimeError(f"{CONFIG_HINT}. Got tensors on {q.device}.")
    if initial_state is not None:
        initial_state = initial_state.float()
    return gated_delta_rule_via_varlen(
        fla_varlen, q, k, v, g, beta,
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, doc_starts=doc_starts,
    )


__all__ = [
    "CONFIG_HINT",
    "call_rows_as_varlen",
    "FLA_VERSION",
    "VarlenLayout",
    "check_triton_available",
    "fla_varlen",
    "gated_delta_rule_via_varlen",
    "row_final_state_grads",
    "row_final_states",
    "segment_initial_state_grads",
    "segment_initial_states",
    "triton_gated_delta_rule",
    "varlen_layout",
]
