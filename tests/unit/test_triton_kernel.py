"""The Triton kernel path (titan_cp/ops/gated_delta_rule/triton.py) as far as a CPU machine can check it.

(a) Without a GPU, ``get_kernel("triton")`` fails with an error naming the
    config field and the fix.
(b) The [B, T] + doc_starts -> varlen conversion is exact: the whole wrapper
    run with a recurrent stand-in for FLA's varlen kernel (one recurrent call
    per segment, FLA's contract enforced) equals the recurrent kernel on the
    original rows, outputs, final states and every gradient.
(c) On a CUDA machine: parity of the real Triton kernel with the torch kernel
    (skipped here, with the reason).
(d) FLA's real Triton kernels under the Triton interpreter on CPU: the plain
    kernel against the recurrent one, and the CP segment kernel of ``triton``
    (titan_cp/ops/gated_delta_rule/triton_transition.py: FLA's chunk forward at width V + K, its
    plain backward from the true start) against the torch kernel's; (b) checks that
    segment kernel's varlen plumbing with a recurrent stand-in for FLA's calls.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule import get_kernel
from titan_cp.ops.gated_delta_rule.chunk import ChunkSegmentKernel
from titan_cp.ops.gated_delta_rule.recurrent import recurrent_gated_delta_rule
from titan_cp.ops.gated_delta_rule.transition import RecomputingSegmentKernel
from titan_cp.ops.gated_delta_rule.triton import (
    gated_delta_rule_via_varlen,
    row_final_states,
    segment_initial_states,
    varlen_layout,
)
from titan_cp.ops.gated_delta_rule.triton_transition import VarlenSegmentKernel, VarlenSegmentOps
from tests.support.triton_interpreter import version_skip_reason

REPO = Path(__file__).resolve().parents[2]

HAS_CUDA = torch.cuda.is_available()
EXACT = 1e-6


def recurrent_varlen(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens,
                     cu_seqlens_cpu=None):
    """A pure-PyTorch stand-in for FLA's varlen chunk_gated_delta_rule (same contract)."""
    if cu_seqlens is None:
        return recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                          output_final_state=output_final_state)
    assert q.shape[0] == 1, "FLA's varlen mode needs batch size 1"
    N = cu_seqlens.numel() - 1
    assert initial_state is None or initial_state.shape[0] == N, "one initial state per sequence"
    assert cu_seqlens[0] == 0 and cu_seqlens[-1] == q.shape[1] and bool((cu_seqlens.diff() > 0).all())
    if cu_seqlens_cpu is not None:
        assert torch.equal(cu_seqlens_cpu.cpu(), cu_seqlens.cpu())
    outputs, finals = [], []
    for i in range(N):
        s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        o, h = recurrent_gated_delta_rule(
            q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], scale=scale,
            initial_state=None if initial_state is None else initial_state[i:i + 1], output_final_state=True,
        )
        outputs.append(o)
        finals.append(h)
    return torch.cat(outputs, 1), (torch.cat(finals, 0) if output_final_state else None)


def random_inputs(B, T, H, K, V, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2)  # decays ~0.9
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen)
    cast = lambda x, dt=dtype: x.to(device=device, dtype=dt)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g, torch.float32), cast(beta, torch.float32), cast(h0, torch.float32)


def doc_start_patterns(B, T, seed):
    """Random starts plus the edge cases: t = 0, consecutive starts, the last token, none at all."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=gen) < 0.2
    starts[0, 0] = True  # row 0 drops its initial state
    starts[1, 0] = False
    starts[1, [3, 4, 5]] = True  # consecutive (one-token documents)
    starts[1, T - 1] = True  # last token
    if B > 2:
        starts[2] = False  # a row with no document start at all
    return starts


# ----------------------------------------------------------------------------------- (a)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU; the check is for CPU-only machines")
def test_triton_kernel_on_cpu_raises_a_clear_error():
    with pytest.raises(RuntimeError) as info:
        get_kernel("triton")
    message = str(info.value)
    assert "model.kernel = 'triton'" in message
    assert "pip install 'titan_cp[gpu]'" in message and "model.kernel = 'torch'" in message
    assert "no CUDA device" in message


def test_triton_kernel_rejects_cpu_tensors():
    from titan_cp.ops.gated_delta_rule.triton import triton_gated_delta_rule

    q, k, v, g, beta, _ = random_inputs(1, 4, 1, 4, 4)
    with pytest.raises(RuntimeError, match="model.kernel = 'triton'"):
        triton_gated_delta_rule(q, k, v, g, beta)


# ----------------------------------------------------------------------------------- (b)


def test_varlen_layout_by_hand():
    starts = torch.zeros(3, 6, dtype=torch.bool)
    starts[0, [0, 2]] = True
    starts[1, [4, 5]] = True
    layout = varlen_layout(starts, 3, 6)
    # rows at 0, 6, 12; documents at 2 (row 0), 10 and 11 (row 1); end 18
    assert layout.cu_seqlens.tolist() == [0, 2, 6, 10, 11, 12, 18]
    assert layout.first_segment_of_row.tolist() == [0, 2, 5]
    assert layout.last_segment_of_row.tolist() == [1, 4, 5]
    assert layout.row_keeps_state.tolist() == [False, True, True]
    assert layout.num_segments == 6

    plain = varlen_layout(None, 2, 5)
    assert plain.cu_seqlens.tolist() == [0, 5, 10]
    assert plain.first_segment_of_row.tolist() == plain.last_segment_of_row.tolist() == [0, 1]

    h0 = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2).clone().requires_grad_()
    seg = segment_initial_states(h0, layout)
    assert seg[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 2.0]  # row 0 starts a document: dropped
    seg.sum().backward()
    assert h0.grad[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]
    finals = torch.arange(6.0).view(6, 1, 1, 1)
    assert row_final_states(finals, layout).flatten().tolist() == [1.0, 4.0, 5.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_initial_state", [True, False])
def test_varlen_conversion_is_exact(seed, with_initial_state):
    B, T, H, K, V = 3, 17, 2, 4, 5
    q, k, v, g, beta, h0 = random_inputs(B, T, H, K, V, seed=seed)
    starts = doc_start_patterns(B, T, seed)
    inputs = [q, k, v, g, beta] + ([h0] if with_initial_state else [])

    def run(fn):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, final = fn(*leaves[:5], scale=0.7, initial_state=leaves[5] if with_initial_state else None,
                      output_final_state=True, doc_starts=starts)
        gen = torch.Generator().manual_seed(99)
        loss = (o * torch.randn(o.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
        loss.backward()
        return [o.detach(), final.detach()] + [x.grad for x in leaves]

    ref = run(recurrent_gated_delta_rule)
    got = run(lambda *a, **kw: gated_delta_rule_via_varlen(recurrent_varlen, *a, **kw))
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    for name, a, b in zip(names, got, ref):
        err = (a - b).abs().max().item()
        assert err <= EXACT, f"{name}: max abs error {err:.2e} (seed {seed})"
    if with_initial_state:  # row 0 starts with a document: its initial state gets exactly no gradient
        assert got[-1][0].abs().max().item() == 0.0


def test_varlen_wrapper_without_doc_starts_and_the_cp_call():
    """No doc_starts: rows pass through. And the CP call shape: values [v | 0] from state [0 | I]."""
    B, T, H, K, V = 2, 9, 2, 4, 3
    q, k, v, g, beta, h0 = random_inputs(B, T, H, K, V, seed=5)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o, s = gated_delta_rule_via_varlen(recurrent_varlen, q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert (o - o_ref).abs().max() <= EXACT and (s - s_ref).abs().max() <= EXACT

    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[1, 4] = True
    v_aug = torch.cat([v, v.new_zeros(B, T, H, K)], -1)
    identity = torch.zeros(B, H, K, V + K)
    identity[..., V:] = torch.eye(K)
    args = dict(initial_state=identity, output_final_state=True, doc_starts=starts)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v_aug, g, beta, **args)
    o, s = gated_delta_rule_via_varlen(recurrent_varlen, q, k, v_aug, g, beta, **args)
    assert (o - o_ref).abs().max() <= EXACT and (s - s_ref).abs().max() <= EXACT
    assert s[1, ..., V:].abs().max() == 0  # a document start inside the segment: transition M = 0


def _recurrent_ops_forward(q, k, v, g, beta, start, scale, cu_seqlens, chunk_indices):
    extra = 0 if start is None else start.shape[-1] - v.shape[-1]  # [v | 0] from [S_0 | I]
    o, final = recurrent_varlen(q, k, F.pad(v, (0, extra)), g, beta, scale=scale, initial_state=start,
                                output_final_state=True, cu_seqlens=cu_seqlens)
    return o, final, (g,)


def _recurrent_ops_backward(q, k, v, beta, saved, start, d_o, d_final, scale, cu_seqlens, chunk_indices):
    (g,) = saved
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)]
    start_leaf = None if start is None else start.detach().clone().requires_grad_()
    o, final = recurrent_varlen(*leaves, scale=scale, initial_state=start_leaf, output_final_state=True,
                                cu_seqlens=cu_seqlens)
    inputs = leaves + ([start_leaf] if start_leaf is not None else [])
    grads = torch.autograd.grad((o, final), inputs, (d_o, d_final))
    return (*grads[:5], grads[5] if start_leaf is not None else None)


RECURRENT_OPS = VarlenSegmentOps(_recurrent_ops_forward, _recurrent_ops_backward, lambda cu, cu_cpu: None)
"""A pure-PyTorch stand-in for FLA's calls in titan_cp's triton segment kernel (same contract)."""


def run_segment_kernel(kernel, inputs, starts, seed=3):
    """A segment kernel on one segment: the transition forward (o, q_transition, S_local, M), the
    outputs from a random true incoming state S, and the backward from there under random
    cotangents (dq, dk, dv, dg, dbeta, dS_0); then the plain forward (the sequence's first
    segment: o, S_local) and its backward from S_0."""
    q, k, v, g, beta, h0 = inputs
    gen = torch.Generator().manual_seed(seed)
    S, d_o, T_grad = (torch.randn(*shape, generator=gen).to(q.dtype) for shape in (h0.shape, v.shape, h0.shape))
    seg = kernel.forward(q, k, v, g, beta, initial_state=h0, doc_starts=starts, with_transition=True)
    corrected = seg.o + torch.einsum("bthk,bhkv->bthv", seg.q_transition, S)
    tensors, meta = kernel.bind_incoming_state(seg.saved_tensors, seg.saved_meta, S)
    recomputed = kernel.q_transition(tensors, meta)  # what CP's backward uses (q_transition is not kept)
    grads = kernel.backward(tensors, meta, d_o, T_grad)
    plain = kernel.forward(q, k, v, g, beta, initial_state=h0, doc_starts=starts, with_transition=False)
    plain_grads = kernel.backward(*kernel.bind_incoming_state(plain.saved_tensors, plain.saved_meta, None), d_o, T_grad)
    return [y.float() for y in (seg.o, seg.q_transition, seg.S_local, seg.M, corrected, recomputed, *grads,
                                plain.o, plain.S_local, *plain_grads)]


SEGMENT_NAMES = ["o", "q_transition", "S_local", "M", "o from S_0 + S", "recomputed q_transition", "dq", "dk", "dv",
                 "dg", "dbeta", "dS_0",
                 "plain o", "plain S_local", "plain dq", "plain dk", "plain dv", "plain dg", "plain dbeta",
                 "plain dS_0"]


def test_triton_segment_kernel_plumbing_equals_the_torch_segment_kernel():
    """The varlen plumbing of the triton segment kernel (start [S_0 | I] per row, zero for later
    segments, rows' last segments; in the backward the final-state gradient to each row's last
    segment, the start gradient from its first) with a recurrent stand-in for FLA's calls, in
    float64, against the torch kernel's native segment kernel and the generic recomputing one:
    values, and every gradient of the backward from the true start."""
    B, T, H, K, V = 4, 21, 2, 4, 3
    inputs = [x.double() for x in random_inputs(B, T, H, K, V, seed=11)]
    starts = doc_start_patterns(B, T, 2)
    starts[2, 9] = True  # a start inside a row that does not begin with one: its M must be 0
    starts[3] = False  # a row with no start: a real transition
    ref = run_segment_kernel(ChunkSegmentKernel(chunk_size=8), inputs, starts)
    for name, kernel in (("varlen", VarlenSegmentKernel(RECURRENT_OPS, require_cuda=False)),
                         ("interface", RecomputingSegmentKernel(recurrent_gated_delta_rule))):
        got = run_segment_kernel(kernel, inputs, starts)
        for n, a, b in zip(SEGMENT_NAMES, got, ref):
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            assert err <= 1e-10, f"{name}: {n} relative error {err:.2e}"
    assert ref[3][:3].abs().max() == 0 and ref[3][3].abs().max() > 0  # rows with a start have M = 0


# ----------------------------------------------------------------------------------- (c)

# Max error relative to the largest entry (the same bounds as benchmarks/gpu_check.py's PARITY_TOL
# "max", which compares against a float64 truth and explains them): fp32: FLA's fp32 tl.dot runs in
# TF32 (10-bit mantissa, 2^-11 ~ 5e-4 per operand) through a few chained dots, the torch kernel in
# true fp32; bf16: both round inputs/outputs to bf16 (2^-9 ~ 2e-3 per rounding) and FLA also keeps
# its chunk states and w, u in bf16.
PARITY_REL = {torch.float32: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU with FLA (the Triton path); benchmarks/gpu_check.py "
                                          "runs the full parity suite there")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_kernel_on_gpu(dtype):
    B, T, H, K, V = 2, 200, 2, 64, 128
    q, k, v, g, beta, h0 = random_inputs(B, T, H, K, V, dtype=dtype, device="cuda")
    starts = doc_start_patterns(B, T, 0).cuda()
    results = {}
    for name in ("triton", "torch"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
        o, s = get_kernel(name)(*leaves[:5], initial_state=leaves[5], output_final_state=True, doc_starts=starts)
        gen = torch.Generator(device="cuda").manual_seed(1)
        ((o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum()
         + (s * torch.randn(s.shape, device="cuda", generator=gen)).sum()).backward()
        results[name] = [o.float(), s] + [x.grad.float() for x in leaves]
    for i, (a, b) in enumerate(zip(results["triton"], results["torch"])):
        rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert rel <= PARITY_REL[dtype], f"tensor {i}: relative error {rel:.2e} in {dtype}"


# ----------------------------------------------------------------------- FLA under the interpreter
# FLA's real Triton kernels on CPU through TRITON_INTERPRET=1 plus a two-patch shim
# (tests/support/triton_interpreter.py). Verified with its VERIFIED versions; other
# versions skip (the shim patches Triton internals). Runs in a subprocess: the interpreter must be
# chosen before FLA's kernels are decorated, and the patches are process-global.
INTERPRET_CASES = [  # (B, T, K, V, docs): varlen with document starts; two chunks with a tail; CP width V + K
    (2, 40, 16, 16, True),
    (1, 80, 16, 24, False),
]


def _interpret_main() -> None:
    """Subprocess body: FLA's kernels (interpreted) vs the recurrent kernel; prints JSON errors."""
    import json

    from tests.support.triton_interpreter import fla_gated_delta_rule_anywhere, install_interpreter_shim

    install_interpreter_shim()
    report = {}
    for B, T, K, V, docs in INTERPRET_CASES:
        q, k, v, g, beta, h0 = random_inputs(B, T, 2, K, V, seed=T)
        starts = doc_start_patterns(B, T, 0) if docs else None

        def run(fn):
            leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
            o, s = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, doc_starts=starts)
            gen = torch.Generator().manual_seed(3)
            ((o * torch.randn(o.shape, generator=gen)).sum() + (s * torch.randn(s.shape, generator=gen)).sum()).backward()
            return [o.detach(), s.detach()] + [x.grad for x in leaves]

        got, ref = run(fla_gated_delta_rule_anywhere), run(recurrent_gated_delta_rule)
        names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
        report[str((B, T, K, V, docs))] = {
            n: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for n, a, b in zip(names, got, ref)
        }
        # The CP segment kernel of triton (FLA's chunk forward at V + K, FLA's plain backward from the
        # true start) against the torch kernel's (fp32 both).
        inputs = (q, k, v, g, beta, h0)
        got = run_segment_kernel(VarlenSegmentKernel(require_cuda=False), inputs, starts)
        ref = run_segment_kernel(ChunkSegmentKernel(), inputs, starts)
        report[f"segment kernel {(B, T, K, V, docs)}"] = {
            n: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for n, a, b in zip(SEGMENT_NAMES, got, ref)
        }
    print("INTERPRET_REPORT " + json.dumps(report))


@pytest.mark.skipif(version_skip_reason() is not None, reason=str(version_skip_reason()))
def test_fla_triton_kernels_under_the_interpreter_match_recurrent():
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "tests.unit.test_triton_kernel", "--interpret"], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("INTERPRET_REPORT ")]
    assert proc.returncode == 0 and lines, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(lines[-1][len("INTERPRET_REPORT "):])
    print(report)
    bad = {(case, n): e for case, errs in report.items() for n, e in errs.items() if e > 1e-5}
    assert not bad, f"FLA (interpreted) != recurrent beyond 1e-5 relative: {bad}"


if __name__ == "__main__" and "--interpret" in __import__("sys").argv:
    _interpret_main()
