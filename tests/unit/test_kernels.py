"""The chunked kernel (kernels/chunk.py) against the step-by-step recurrence.

Ground truth: ``titan_cp.ops.gated_delta_rule.recurrent.recurrent_gated_delta_rule`` (autograd
through a Python loop), plus one comparison with FLA's own pure-PyTorch
``naive_recurrent_gated_delta_rule``. Every comparison covers the output, the
final state and the gradients of q, k, v, g, beta and initial_state under a loss
that depends on both the output and the final state (random weights).
Error measure: max|a - b| / max|b| per tensor (max|a - b| where b is all zeros).
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

from titan_cp.ops.gated_delta_rule import get_kernel
from titan_cp.ops.gated_delta_rule.chunk import chunk_gated_delta_rule
from titan_cp.ops.gated_delta_rule.recurrent import recurrent_gated_delta_rule


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread. On a busy 2-core machine every parallel region of a
    tiny op can wait milliseconds for a second core (seen: 17 ms per 8x8 bmm)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NAMES = ("o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "d_initial_state")
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_inputs(B=2, T=37, H=3, K=8, V=12, dtype=torch.float64, seed=0):
    """Realistic inputs: q, k L2-normalised, g = logsigmoid(randn) < 0, beta = sigmoid(randn)."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    h0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    w_o = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    w_state = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    inputs = [x.to(dtype) for x in (q, k, v, g, beta, h0)]
    return inputs, (w_o, w_state)


def run_with_grads(kernel, inputs, weights, *, use_initial_state=True, doc_starts=None, **kwargs):
    """Output, final state and the gradients of q, k, v, g, beta, initial_state (float64)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = xs
    o, state = kernel(
        q, k, v, g, beta,
        initial_state=h0 if use_initial_state else None,
        output_final_state=True,
        doc_starts=doc_starts,
        **kwargs,
    )
    loss = (o.double() * weights[0]).sum() + (state.double() * weights[1]).sum()
    loss.backward()
    grads = [x.grad for x in xs[:5]] + [h0.grad if use_initial_state else None]
    return [o, state] + grads


def relative_errors(got, want, names=NAMES):
    errors = {}
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        scale = b.double().abs().max().item()  # 0 when the true gradient vanishes (e.g. a start at t=0)
        errors[name] = (a.double() - b.double()).abs().max().item() / (scale if scale > 0 else 1.0)
    return errors


def assert_close(got, want, tol, names=NAMES):
    errors = relative_errors(got, want, names)
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol:g}: {bad} (all: {errors})"


def reference(inputs, weights, **kwargs):
    """The recurrence in float64: the exact answer for inputs of any precision."""
    return run_with_grads(recurrent_gated_delta_rule, [x.double() for x in inputs], weights, **kwargs)


# ---------------------------------------------------------------------------------------
# Without document starts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("use_initial_state", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("T,chunk_size", [(37, 16), (100, 16), (100, 64)])
def test_chunk_matches_recurrent(T, chunk_size, use_initial_state, dtype):
    inputs, weights = make_inputs(T=T, dtype=dtype)
    got = run_with_grads(
        chunk_gated_delta_rule, inputs, weights, use_initial_state=use_initial_state, chunk_size=chunk_size
    )
    want = reference(inputs, weights, use_initial_state=use_initial_state)
    assert got[0].dtype == dtype and tuple(got[0].shape) == tuple(inputs[2].shape)
    assert got[1].dtype == dtype  # float32, float64 for float64 inputs
    for x, grad in zip(inputs, got[2:]):
        assert grad is None or (grad.dtype == x.dtype and grad.shape == x.shape)
    assert_close(got, want, TOL[dtype])


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
def test_chunk_size_does_not_change_results(chunk_size):
    """Padding (T not a multiple of the chunk) and the chunking itself are invisible."""
    inputs, weights = make_inputs(T=23, H=2)
    got = run_with_grads(chunk_gated_delta_rule, inputs, weights, chunk_size=chunk_size)
    want = run_with_grads(chunk_gated_delta_rule, inputs, weights, chunk_size=23)
    assert_close(got, want, 1e-12)


def test_only_output_or_only_final_state_in_the_loss():
    """Backward works when one of the two outputs gets no gradient."""
    inputs, _ = make_inputs(T=20)
    for use_output in (True, False):
        xs = [x.clone().requires_grad_() for x in inputs]
        o, state = chunk_gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True, chunk_size=8)
        (o.sum() if use_output else state.sum()).backward()
        ys = [x.clone().requires_grad_() for x in inputs]
        o_ref, state_ref = recurrent_gated_delta_rule(*ys[:5], initial_state=ys[5], output_final_state=True)
        (o_ref.sum() if use_output else state_ref.sum()).backward()
        for name, x, y in zip(NAMES[2:], xs, ys):  # the reference leaves None where the loss ignores x
            want = torch.zeros_like(y) if y.grad is None else y.grad
            assert_close([x.grad], [want], 1e-10, names=[name])


def test_no_final_state_requested():
    inputs, _ = make_inputs(T=20)
    o, state = chunk_gated_delta_rule(*inputs[:5], chunk_size=8)
    assert state is None
    o_ref, _ = recurrent_gated_delta_rule(*inputs[:5])
    assert_close([o], [o_ref], 1e-10)


def test_low_precision_inputs_keep_their_dtypes():
    inputs, weights = make_inputs(T=20, dtype=torch.bfloat16)
    inputs[5] = inputs[5].float()  # the state is float32
    got = run_with_grads(chunk_gated_delta_rule, inputs, weights, chunk_size=8)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert [x.dtype for x in got[2:]] == [torch.bfloat16] * 5 + [torch.float32]
    want = reference(inputs, weights)
    assert_close(got, want, 2e-2)  # bf16 rounding of o and of the gradients


def test_gradcheck_small():
    """Finite differences of the chunk kernel itself (independent of the reference)."""
    inputs, _ = make_inputs(B=1, T=10, H=1, K=3, V=2)
    doc_starts = torch.zeros(1, 10, dtype=torch.bool)
    doc_starts[0, 6] = True
    xs = [x.clone().requires_grad_() for x in inputs]

    def fn(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, doc_starts=doc_starts, chunk_size=4
        )

    assert torch.autograd.gradcheck(fn, xs)


# ---------------------------------------------------------------------------------------
# Document starts
# ---------------------------------------------------------------------------------------


def doc_starts_cases(B, T):
    """name -> doc_starts [B, T]: resets at t=0, at chunk boundaries (chunk 16),
    several per chunk, consecutive ones, the last token, and random ones."""
    cases = {}

    def starts(*rows):
        x = torch.zeros(B, T, dtype=torch.bool)
        for b, positions in enumerate(rows):
            x[b, list(positions)] = True
        return x

    cases["t0"] = starts([0], [0])
    cases["chunk_boundaries"] = starts([16, 32], [16])
    cases["several_per_chunk"] = starts([3, 9, 13, 20, 27], [1, 5, 17, 18, 30])
    cases["consecutive"] = starts([5, 6, 7, 15, 16], [0, 1, 31, 32, 33])
    cases["last_token_and_t0"] = starts([0, T - 1], [T - 2, T - 1])
    cases["every_token"] = torch.ones(B, T, dtype=torch.bool)
    cases["random"] = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.15
    return cases


DOC_CASES = list(doc_starts_cases(2, 37))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", DOC_CASES)
def test_doc_starts_match_recurrent(case, dtype):
    T = 37
    doc_starts = doc_starts_cases(2, T)[case]
    inputs, weights = make_inputs(T=T, dtype=dtype, seed=2)
    got = run_with_grads(chunk_gated_delta_rule, inputs, weights, doc_starts=doc_starts, chunk_size=16)
    want = reference(inputs, weights, doc_starts=doc_starts)
    assert_close(got, want, TOL[dtype])


def test_doc_starts_with_default_chunk_and_no_initial_state():
    T = 150
    inputs, weights = make_inputs(T=T, seed=3)
    doc_starts = torch.zeros(2, T, dtype=torch.bool)
    doc_starts[0, [0, 63, 64, 65, 100]] = True
    doc_starts[1, [64, 127, 128, 149]] = True
    for use_initial_state in (True, False):
        got = run_with_grads(
            chunk_gated_delta_rule, inputs, weights, use_initial_state=use_initial_state, doc_starts=doc_starts
        )
        want = reference(inputs, weights, use_initial_state=use_initial_state, doc_starts=doc_starts)
        assert_close(got, want, 1e-10)


def test_doc_start_forgets_everything_before_it():
    """Tokens after a start do not depend on anything before it (grads exactly 0)."""
    inputs, _ = make_inputs(B=1, T=40)
    doc_starts = torch.zeros(1, 40, dtype=torch.bool)
    doc_starts[0, 21] = True
    xs = [x.clone().requires_grad_() for x in inputs]
    o, state = chunk_gated_delta_rule(
        *xs[:5], initial_state=xs[5], output_final_state=True, doc_starts=doc_starts, chunk_size=16
    )
    (o[:, 21:].sum() + state.sum()).backward()
    for name, x in zip(("q", "k", "v", "g", "beta"), xs[:5]):
        assert x.grad[:, :21].abs().max() == 0, name
    assert xs[3].grad[:, 21].abs().max() == 0  # the decay at the start itself is dropped
    assert xs[5].grad.abs().max() == 0


# ---------------------------------------------------------------------------------------
# Extreme decays: float32 against the float64 recurrence
# ---------------------------------------------------------------------------------------

EXTREME_SHAPE = dict(B=1, T=128, H=2, K=16, V=16)  # two chunks of the default 64
EXTREME_TOL = 2e-6  # float32 rounding; before the fixes: dg 1.4 (g = -20), 2.7e-5 (half strong), NaN (-inf)


def extreme_case(g_of, doc_starts=None):
    """float32 chunk kernel vs the float64 recurrence, g replaced by g_of(g)."""
    inputs, weights = make_inputs(**EXTREME_SHAPE, dtype=torch.float32, seed=5)
    inputs[3] = g_of(inputs[3])
    got = run_with_grads(chunk_gated_delta_rule, inputs, weights, doc_starts=doc_starts)
    want = reference(inputs, weights, doc_starts=doc_starts)
    assert all(torch.isfinite(x).all() for x in want)
    return got, want


@pytest.mark.parametrize("g_value", [-5.0, -10.0, -20.0])
def test_strong_decay_gradient_of_g(g_value):
    """dg_j sums only decays that span j: no O(1) terms that cancel when every decay is tiny."""
    got, want = extreme_case(lambda g: torch.full_like(g, g_value))
    assert_close(got, want, EXTREME_TOL)


def test_strong_then_no_decay_in_each_chunk():
    """g = -20 on the first half of every chunk, then -1e-3: the in-chunk log decay reaches -640,
    where a float32 cumulative sum loses ~1e-4 of every later exp(G_t - G_s)."""
    def half_strong(g):
        first_half = torch.arange(g.shape[1]) % 64 < 32
        return torch.where(first_half[None, :, None], -20.0, -1e-3).to(g.dtype).expand_as(g).clone()

    got, want = extreme_case(half_strong)
    assert_close(got, want, EXTREME_TOL)


@pytest.mark.parametrize("at_document_start", [False, True], ids=["no_documents", "at_document_start"])
def test_minus_infinity_log_decay(at_document_start):
    """g = -inf is a_t = 0 (the state is wiped, not reset): finite, and equal to the recurrence.
    At a document start g is unused and must not turn the chunk into NaN."""
    def minus_inf(g):
        g = g.clone()
        g[:, [40, 100]] = float("-inf")
        return g

    doc_starts = None
    if at_document_start:
        doc_starts = torch.zeros(1, EXTREME_SHAPE["T"], dtype=torch.bool)
        doc_starts[0, [40, 100]] = True
    got, want = extreme_case(minus_inf, doc_starts)
    assert all(torch.isfinite(x).all() for x in got)
    assert_close(got, want, EXTREME_TOL)
    assert (got[5][:, [40, 100]] == 0).all()  # dg at a -inf decay: exp'(-inf) = 0


# ---------------------------------------------------------------------------------------
# The segment kernel of context parallelism: transition forward, plain backward from the
# true incoming state
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_documents", [False, True], ids=["one_document", "documents"])
def test_segment_kernels_match_the_recurrence(with_documents):
    """Reference, float64: the recurrence with values [v | 0] from state [S_0 | I] gives outputs
    [o | q M] and final state [S_local | M]; the segment's true outputs and final state are the
    recurrence's from S_0 + S, so its gradients (under cotangents dO, T) are those of that run.
    Both segment kernels (native torch, and the recomputing one over the recurrent kernel) must
    give both, and the true outputs o + (q M) S must be the recurrence's from S_0 + S."""
    from titan_cp.ops.gated_delta_rule.chunk import ChunkSegmentKernel
    from titan_cp.ops.gated_delta_rule.transition import RecomputingSegmentKernel

    B, T, H, K, V = 2, 37, 2, 4, 6
    inputs, _ = make_inputs(B=B, T=T, H=H, K=K, V=V, seed=6)
    q, k, v, g, beta, _ = inputs
    doc_starts = doc_starts_cases(B, T)["several_per_chunk"] if with_documents else None
    gen = torch.Generator().manual_seed(7)
    S_0, S, d_o, T_grad = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                           for shape in ((B, H, K, V), (B, H, K, V), (B, T, H, V), (B, H, K, V)))

    v_padded = torch.cat([v, v.new_zeros(B, T, H, K)], -1)
    start = torch.cat([S_0, torch.eye(K, dtype=v.dtype).expand(B, H, K, K)], -1)
    o_pad, final_pad = recurrent_gated_delta_rule(q, k, v_padded, g, beta, initial_state=start,
                                                  output_final_state=True, doc_starts=doc_starts)
    want_forward = [o_pad[..., :V], o_pad[..., V:], final_pad[..., :V], final_pad[..., V:]]
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    true_start = (S_0 + S).requires_grad_()
    o_true, final_true = recurrent_gated_delta_rule(*leaves, initial_state=true_start, output_final_state=True,
                                                    doc_starts=doc_starts)
    torch.autograd.backward((o_true, final_true), (d_o, T_grad))
    want_backward = [x.grad for x in leaves] + [true_start.grad]

    for kernel in (ChunkSegmentKernel(chunk_size=8), RecomputingSegmentKernel(recurrent_gated_delta_rule)):
        seg = kernel.forward(q, k, v, g, beta, initial_state=S_0, doc_starts=doc_starts, with_transition=True)
        names = ("o", "q_transition", "S_local", "M")
        assert_close([seg.o, seg.q_transition, seg.S_local, seg.M], want_forward, 1e-10, names=names)
        corrected = seg.o + torch.einsum("bthk,bhkv->bthv", seg.q_transition, S)
        assert_close([corrected], [o_true.detach()], 1e-10, names=("o from S_0 + S",))
        tensors, meta = kernel.bind_incoming_state(seg.saved_tensors, seg.saved_meta, S)
        # CP's backward recomputes q_transition from the bound context (it is not kept)
        assert_close([kernel.q_transition(tensors, meta)], want_forward[1:2], 1e-10, names=("recomputed q M",))
        grads = kernel.backward(tensors, meta, d_o, T_grad)
        assert_close(list(grads), want_backward, 1e-10, names=("dq", "dk", "dv", "dg", "dbeta", "dS_0"))


# ---------------------------------------------------------------------------------------
# FLA's own reference
# ---------------------------------------------------------------------------------------


def load_fla_naive():
    """fla/ops/gated_delta_rule/naive.py loaded as a file (the package __init__ pulls Triton)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention (fla) is not installed: no FLA reference to compare with")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "ops" / "gated_delta_rule" / "naive.py"
    if not path.exists():
        pytest.skip(f"FLA is installed but has no {path}")
    file_spec = importlib.util.spec_from_file_location("fla_gated_delta_rule_naive", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


def test_chunk_matches_fla_naive_recurrent():
    naive = load_fla_naive()
    inputs, weights = make_inputs(T=45, dtype=torch.float32, seed=4)

    def fla_kernel(q, k, v, g, beta, *, initial_state, output_final_state, doc_starts):
        assert doc_starts is None
        # FLA: (q, k, v, beta, g), layout [B, T, H, *], state [B, H, K, V], fp32 inside.
        return naive.naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, initial_state=initial_state, output_final_state=output_final_state
        )

    got = run_with_grads(chunk_gated_delta_rule, inputs, weights, chunk_size=16)
    want = run_with_grads(fla_kernel, inputs, weights)
    assert_close(got, want, 1e-5)


# ---------------------------------------------------------------------------------------
# Bad inputs, through get_kernel
# ---------------------------------------------------------------------------------------


def _good_inputs():
    inputs, _ = make_inputs(B=2, T=10, H=3, K=4, V=5, dtype=torch.float32)
    q, k, v, g, beta, h0 = inputs
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta}, h0


@pytest.mark.parametrize(
    "field,bad,match",
    [
        ("k", lambda x: x[:, :, :, :3], r"\bk has shape"),
        ("v", lambda x: x[:, :9], r"\bv has shape"),
        ("g", lambda x: x[:, :, :2], r"\bg has shape"),
        ("beta", lambda x: x[:, :9], r"\bbeta has shape"),
        ("k", lambda x: x.double(), r"k is torch\.float64"),
        ("v", lambda x: x.half(), r"v is torch\.float16"),
        ("q", lambda x: x[0], r"q must be \[B, T, H, K\]"),
        ("g", lambda x: (x * 0).long(), r"\bg must be floating point"),
    ],
)
def test_bad_inputs_name_the_tensor(field, bad, match):
    kernel = get_kernel("torch")
    tensors, _ = _good_inputs()
    tensors[field] = bad(tensors[field])
    with pytest.raises(ValueError, match=match):
        kernel(tensors["q"], tensors["k"], tensors["v"], tensors["g"], tensors["beta"])


def test_bad_initial_state_and_doc_starts_are_named():
    kernel = get_kernel("torch")
    tensors, h0 = _good_inputs()
    args = (tensors["q"], tensors["k"], tensors["v"], tensors["g"], tensors["beta"])
    with pytest.raises(ValueError, match=r"initial_state has shape"):
        kernel(*args, initial_state=h0[:, :, :, :4])
    with pytest.raises(ValueError, match=r"doc_starts must be a bool tensor"):
        kernel(*args, doc_starts=torch.zeros(2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"doc_starts must be a bool tensor"):
        kernel(*args, doc_starts=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"chunk_size"):
        kernel(*args, chunk_size=0)


def test_unknown_kernel_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"model\.kernel = 'torhc'.*Did you mean 'torch'"):
        get_kernel("torhc")
    with pytest.raises(ValueError, match=r"model\.kernel = 'cuda' is not one of \['recurrent', 'torch', 'triton'\]"):
        get_kernel("cuda")


def test_get_kernel_returns_the_chunk_kernel():
    assert get_kernel("torch") is chunk_gated_delta_rule
    assert get_kernel("recurrent") is recurrent_gated_delta_rule
