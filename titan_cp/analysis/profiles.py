"""Memory profiles of the GDN kernels: what each one really saves, as estimator settings.

The estimator's default terms (``titan_cp/analysis/memory.py``) describe the block in
plain PyTorch around FLA's kernel; a :class:`KernelProfile` corrects them for one
kernel and titan_cp's own layer code, term by term.
"""

from __future__ import annotations

from dataclasses import dataclass

from titan_cp.analysis.train_setup import dtype_bytes
from titan_cp.analysis.shape import Dims


@dataclass(frozen=True)
class KernelProfile:
    """What one GDN kernel (and titan_cp's model code around it) saves: TrainSetup fields + term factors.

    ``setup`` goes into :class:`TrainSetup`, ``calibration`` into
    :func:`estimate_memory`. ``measured`` says what the factors were checked against.
    """

    name: str
    setup: dict
    calibration: dict
    measured: str


def _torch_kernel_profile(model, act_dtype: str) -> KernelProfile:
    """titan_cp's ``torch`` chunk kernel (kernels/chunk.py) inside titan_cp's GatedDeltaNet.

    Counted with saved_tensors_hooks on the real model (benchmarks/memory.py), per token per layer:

    - the kernel saves fp32 chunk-layout copies of q, k (repeated to Hv heads), v, g, beta and
      the state entering every chunk [T/C, Hv, K, V]; no WY matrix
      (``kernel_saved_per_head_token = 0``, ``kernel_saves_states``). ``kernel_inputs`` is scaled
      to those fp32 copies: 4 Hv (2K + V) bytes instead of a (2 Dk + Dv).
    - ``qk_silu_out``: the SiLU output of the fused q|k|v conv is one storage and the L2 norm keeps
      all of it alive: (2 Dk + Dv) / (2 Dk).
    - ``qk_l2_norms``: one rsqrt per head for q and for k (2 H, not 4 H): 0.5.
    - ``gates``: a + dt_bias, softplus, sigmoid(b), the kernel's g and beta copies, o-norm rstd:
      6 Hv instead of 5 Hv: 1.2.
    - CP: the segment kernel is native (``cp_recomputes_kernel`` False): the transition rides
      as K extra state columns through the forward only, the saved chunk states become the
      true ones (the ``kernel_states`` term, width V); q M is recomputed in the backward, not
      kept (cp/state_passing.py), unless ``cp_q_transition = "keep"`` (the ``cp_q_transition``
      term, Hv K fp32: measured exact in tests/integration/test_estimator.py).
    - transient (fitted to the tracked-allocator peak on CPU, fp32, dim 256 / 4 x 64 heads,
      CP 1..8, 256..16384 tokens per rank): the peak falls in the last block's MLP backward,
      where the backward workspace is about 0.1 of a layer's activations (``workspace`` 0.21 x
      ``workspace_fraction`` 0.5), the kernel's chunk-state workspace is not at the peak
      (``kernel_workspace`` 0), and of the gradients only lm_head's and the final norm's
      exist yet (``grads_at_peak`` 0.2 for this shape; small next to activations at any real length).
    """
    a = dtype_bytes(act_dtype)
    cal = {"qk_l2_norms": 0.5, "gates": 1.2, "workspace": 0.21, "kernel_workspace": 0.0, "grads_at_peak": 0.2}
    if model is not None:
        shape = Dims.of(model, allow_attention=True)
        H, Hv, K, V = shape.H, shape.Hv, shape.K, shape.V
        cal["qk_silu_out"] = (2 * shape.key_dim + shape.value_dim) / (2 * shape.key_dim)
        cal["kernel_inputs"] = 4 * Hv * (2 * K + V) / (a * (2 * H * K + Hv * V))
    return KernelProfile(
        "torch", {"kernel_saved_per_head_token": 0.0, "kernel_saves_states": True, "cp_recomputes_kernel": False}, cal,
        "CPU, fp32, torch 2.13: saved-tensor tally and tracked-allocator peak of benchmarks/memory.py "
        "(docs/benchmarks.md); bf16 factors derived, not measured",
    )


def kernel_profile(kernel: str, model=None, act_dtype: str = "fp32") -> KernelProfile:
    """The calibration profile of a kernel for ``model`` (a ``GDNModel.Config``; some factors depend on its heads).

    ``torch``: measured (see :func:`_torch_kernel_profile`). ``triton`` (FLA) and others: the
    TrainSetup defaults (FLA saves the WY matrix A, C per head per token, and recomputes the
    chunk states), not yet checked against a GPU measurement. Under CP their segment kernel
    reruns the plain kernel in the backward (``cp_recomputes_kernel``): no kernel-private
    tensors saved, the true start state kept instead.
    """
    if kernel == "torch":
        return _torch_kernel_profile(model, act_dtype)
    return KernelProfile(kernel, {}, {}, "uncalibrated: TrainSetup defaults (FLA's chunk kernel)")
