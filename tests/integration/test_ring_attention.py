"""Ring attention (titan_cp.cp.ring_attention) against single-process causal attention.

One process launch per CP degree P (2, 3, 4); the rank function checks every
case (layouts, GQA, document masking, bf16, sub-groups, block skipping,
communication counters, bad input) and returns its measurements.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan_cp.cp import layout as cp_layout
from titan_cp.cp import block_attention
from titan_cp.cp.block_attention import block_attention_backward, block_attention_forward
from titan_cp.cp.ring_attention import block_counts, plan_step, ring_attention
from titan_cp.cp.comm import comm_stats
from titan_cp.cp.context import CPContext
from titan_cp.testing import rel_err, run_on_ranks


TOL = 1e-5
B, HQ, HKV, D = 2, 4, 2, 16


def _reference(q, k, v, doc_ids=None, scale=None):
    """Full-sequence causal attention: SDPA, or an explicit masked softmax with documents."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    T = q.shape[2]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (doc_ids[:, :, None] == doc_ids[:, None, :])
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _doc_ids(T: int, seg: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """[B, T] document ids, non-decreasing; 'random' crosses segment boundaries."""
    if kind == "aligned":  # documents of two segments each: whole blocks can be skipped
        return (torch.arange(T) // (2 * seg)).expand(B, T).clone()
    rows = []
    for _ in range(B):
        starts = torch.zeros(T, dtype=torch.bool)
        starts[torch.randint(1, T, (max(1, T // 6),), generator=gen)] = True
        starts[0] = True
        rows.append(torch.cumsum(starts.long(), 0) - 1)
    ids = torch.stack(rows)
    crossing = any(ids[b, s * seg - 1] == ids[b, s * seg] for b in range(B) for s in range(1, T // seg))
    assert crossing, "test data should have a document crossing a segment boundary"
    return ids


def _run_case(rank, P, group, layout, seg, *, docs=None, dtype=torch.float32, seed=0, scale=None, hq=HQ):
    """Ring attention on this rank's shard vs. the reference on the full sequence."""
    n = cp_layout.num_segments(P, layout)
    T = n * seg
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, T, D, generator=gen).to(dtype)
    k = torch.randn(B, HKV, T, D, generator=gen).to(dtype)
    v = torch.randn(B, HKV, T, D, generator=gen).to(dtype)
    dout = torch.randn(B, hq, T, D, generator=gen).to(dtype)
    doc_ids = _doc_ids(T, seg, docs, gen) if docs else None

    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref = _reference(q32, k32, v32, doc_ids, scale)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), dout.float())

    def shard(x):
        return cp_layout.rank_segments(x, 2, rank, P, layout)

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    docs_local = cp_layout.rank_segments(doc_ids, 1, rank, P, layout) if doc_ids is not None else None
    out = ring_attention(ql, kl, vl, CPContext(group=group, layout=layout), scale=scale, doc_ids=docs_local,
                         layer_name=f"case.{layout}")
    assert out.dtype == dtype and out.shape == ql.shape
    grads = torch.autograd.grad(out, (ql, kl, vl), shard(dout))

    full = [cp_layout.unshard_sequence(t.detach(), 2, group, layout) for t in (out, *grads)]
    errors = {name: rel_err(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), full, (ref, *ref_grads))}
    tol = TOL if dtype == torch.float32 else 3e-2
    case = f"P={P} rank={rank} layout={layout} seg={seg} docs={docs} dtype={dtype} hq={hq}"
    assert max(errors.values()) <= tol, f"{case}: relative errors {errors} > {tol}"
    return errors


def _rank_main(rank: int, P: int) -> dict:
    world = dist.group.WORLD
    errors = {}

    # Outputs and gradients vs. the single-process reference.
    for layout, docs, seg in itertools.product(cp_layout.LAYOUTS, (None, "random", "aligned"), (8,)):
        errors[(layout, docs, seg)] = _run_case(rank, P, world, layout, seg, docs=docs, seed=P)
    for layout in cp_layout.LAYOUTS:
        errors[(layout, "odd-seg")] = _run_case(rank, P, world, layout, 5, docs="random", seed=1, scale=0.3)
        errors[(layout, "mha")] = _run_case(rank, P, world, layout, 4, hq=HKV, seed=2)
        errors[(layout, "bf16")] = _run_case(rank, P, world, layout, 8, dtype=torch.bfloat16, seed=3)

    # A sub-group whose ranks are not 0..P'-1 (group ranks != global ranks).
    if P == 4:
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        sub = groups[rank % 2]
        for layout in cp_layout.LAYOUTS:
            errors[(layout, "subgroup")] = _run_case(dist.get_rank(sub), 2, sub, layout, 8, docs="random", seed=4)

    # Block skipping and communication counters for one call per layout.
    counts, comm = {}, {}
    seg = 8
    for layout in cp_layout.LAYOUTS:
        block_counts.clear()
        comm_stats.reset()
        _run_case(rank, P, world, layout, seg, seed=5)
        counts[layout] = dict(block_counts)
        comm[layout] = {kind: vars(r) for (_, kind), r in comm_stats.records.items()}

    # Whole blocks of other documents are skipped too.
    block_counts.clear()
    _run_case(rank, P, world, "contiguous", seg, docs="aligned", seed=6)
    counts["contiguous-aligned-docs"] = dict(block_counts)

    # Bad input fails fast with a message naming the field (before any communication).
    bad = torch.randn(B, HQ, 7, D)
    bad_kv = torch.randn(B, HKV, 7, D)
    try:
        ring_attention(bad, bad_kv, bad_kv, CPContext(group=world, layout="zigzag"))
    except ValueError as e:
        bad_input_message = str(e)
    else:
        raise AssertionError("zigzag with an odd local length should raise ValueError")
    dist.barrier()
    return {"errors": errors, "counts": counts, "comm": comm, "bad_input": bad_input_message}


@pytest.mark.parametrize("P", [2, 3, 4])
def test_ring_attention_matches_reference(P):
    results = run_on_ranks(_rank_main, P, timeout=240)
    seg = 8
    for rank, res in enumerate(results):
        worst = max(max(e.values()) for e in res["errors"].values())
        assert worst <= 3e-2  # fp32 cases already checked at 1e-5 inside the ranks

        # contiguous: rank r computes the r+1 past/diagonal blocks, skips the P-1-r future ones.
        c = res["counts"]["contiguous"]
        assert c["fwd_blocks"] == rank + 1 and c["bwd_blocks"] == rank + 1, (rank, c)
        assert c["fwd_skipped"] == P - 1 - rank, (rank, c)
        # zigzag: balanced, 2P+1 of the 4P segment blocks each, in P-1 merged calls for the other
        # ranks' blocks plus 3 for its own (two diagonals, late queries x early keys).
        z = res["counts"]["zigzag"]
        assert z["fwd_blocks"] == 2 * P + 1 and z["bwd_blocks"] == 2 * P + 1, (rank, z)
        assert z["fwd_skipped"] == 2 * P - 1 and z["fwd_calls"] == P + 2, (rank, z)
        # aligned two-segment documents: past blocks of earlier documents are skipped too.
        a = res["counts"]["contiguous-aligned-docs"]
        assert a["fwd_blocks"] == (2 if rank % 2 else 1), (rank, a)

        for layout, n_local in (("contiguous", seg), ("zigzag", 2 * seg)):
            kv_bytes = 2 * B * HKV * n_local * D * 4
            fwd, bwd = res["comm"][layout]["ring_fwd"], res["comm"][layout]["ring_bwd"]
            assert fwd["rounds"] == P - 1 and bwd["rounds"] == P, (layout, fwd, bwd)
            assert fwd["bytes_sent"] == fwd["bytes_received"] == (P - 1) * kv_bytes
            assert bwd["bytes_sent"] == (P - 1) * kv_bytes + P * kv_bytes  # k/v + fp32 dk/dv

        msg = res["bad_input"]
        assert "q.shape[2] = 7" in msg and "zigzag" in msg and "training.seq_len" in msg, msg


@pytest.mark.parametrize("layout", cp_layout.LAYOUTS)
def test_single_process_equals_causal_attention(layout):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, 12, D, generator=gen, requires_grad=True)
    k = torch.randn(B, HKV, 12, D, generator=gen, requires_grad=True)
    v = torch.randn(B, HKV, 12, D, generator=gen, requires_grad=True)
    dout = torch.randn(B, HQ, 12, D, generator=gen)
    comm_stats.reset()
    for doc_ids in (None, torch.tensor([[0] * 5 + [1] * 7, [0] * 11 + [1]])):
        out = ring_attention(q, k, v, CPContext(group=None, layout=layout), doc_ids=doc_ids)
        ref = _reference(q, k, v, doc_ids)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
        assert rel_err(out, ref) <= TOL
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) <= TOL
    assert not comm_stats.records  # nothing sent, nothing recorded


def test_float64_inputs_accumulate_in_float64():
    """float64 q/k/v: output and gradients match a float64 masked softmax to float64 rounding (1e-12)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(B, h, 12, D, generator=gen, dtype=torch.float64) for h in (HQ, HKV, HKV, HQ))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 11 + [1]])
    out = ring_attention(q, k, v, None, doc_ids=doc_ids)
    ref = _reference(q, k, v, doc_ids)
    assert out.dtype == torch.float64 and rel_err(out, ref) <= 1e-12
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert g.dtype == torch.float64 and rel_err(g, r) <= 1e-12


@pytest.mark.parametrize("layout", cp_layout.LAYOUTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4, 7])
def test_plan_covers_each_causal_block_once(P, layout):
    for rank in range(P):
        q_segs = cp_layout.segments_of_rank(rank, P, layout)
        seen = {}
        for step in range(P):
            src = (rank - step) % P
            k_segs = cp_layout.segments_of_rank(src, P, layout)
            tasks, skipped = plan_step(q_segs, k_segs)
            assert skipped + sum(t.n_blocks for t in tasks) == len(q_segs) * len(k_segs)
            for t in tasks:
                for i, j in itertools.product(range(t.q_lo, t.q_hi), range(t.k_lo, t.k_hi)):
                    a, b = q_segs[i], k_segs[j]
                    assert b <= a and t.causal == (a == b) and (a, b) not in seen
                    seen[(a, b)] = True
        assert set(seen) == {(a, b) for a in q_segs for b in range(a + 1)}


def test_bad_input_names_the_field():
    q, kv = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8)
    with pytest.raises(ValueError, match=r"q\.shape\[2\] = 7.*zigzag"):
        ring_attention(q, kv, kv, CPContext(group=None, layout="zigzag"))
    with pytest.raises(ValueError, match=r"q\.shape\[1\] = 4 .*k\.shape\[1\] = 3"):
        ring_attention(q, torch.randn(1, 3, 7, 8), torch.randn(1, 3, 7, 8), None)
    with pytest.raises(ValueError, match="doc_ids"):
        ring_attention(q, kv, kv, None, doc_ids=torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="parallelism.cp_layout"):
        ring_attention(q, kv, kv, CPContext(group=None, layout="zigzig"))


def _masked_attention(q, k, v, allowed, scale):
    """float64 softmax attention over the allowed (query, key) pairs [B, 1, Tq, Tk]; GQA by repeating k/v."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v, torch.logsumexp(s, dim=-1)


@pytest.mark.parametrize("path", ["fused", "explicit"])
@pytest.mark.parametrize("tq, tk, causal, docs", [(8, 8, True, False), (5, 7, True, False), (7, 5, True, False),
                                                 (6, 9, False, True), (9, 9, True, True)])
def test_block_ops_equal_masked_softmax(monkeypatch, path, tq, tk, causal, docs):
    """Each block op against float64 attention on awkward blocks (tq != tk, rows with no allowed key).

    The block under test (keys kb) sits after a block of earlier keys ka that every query may see, so the
    final lse and delta are those of a ring: the backward's dq for the block, summed with the earlier
    block's, and its dk / dv equal autograd through the whole attention. ``path`` runs the fused CPU
    kernel or the explicit math that serves other devices.
    """
    monkeypatch.setattr(block_attention, "_uses_fused_kernel", lambda q: path == "fused")
    gen = torch.Generator().manual_seed(tq * 10 + tk)
    q, dout = (torch.randn(B, HQ, tq, D, generator=gen, dtype=torch.float64) for _ in range(2))
    ka, va, kb, vb = (torch.randn(B, HKV, n, D, generator=gen, dtype=torch.float64) for n in (4, 4, tk, tk))
    q_doc = k_doc = None
    allowed = torch.ones(B, 1, tq, tk, dtype=torch.bool)
    if causal:  # bottom-right aligned: with tq > tk the first tq - tk queries see no key of the block
        allowed &= torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    if docs:  # row 0: query 0's document (0) has no key in the block; row 1: one document
        q_doc = torch.tensor([[0] + [1] * (tq - 1), [2] * tq])
        k_doc = torch.tensor([[1] * tk, [2] * tk])
        allowed &= (q_doc[:, :, None] == k_doc[:, None, :])[:, None]
    if docs or tq > tk:
        assert not allowed.any(dim=-1).all(), "the case should have a query with no allowed key in the block"
    scale = 0.3

    out, lse = block_attention_forward(q, kb, vb, scale=scale, causal=causal, q_doc=q_doc, k_doc=k_doc)
    ref_out, ref_lse = _masked_attention(q, kb, vb, allowed, scale)
    assert out.dtype == lse.dtype == torch.float64 and out.shape == q.shape and lse.shape == q.shape[:3]
    assert rel_err(out, ref_out) <= 1e-12
    empty = ~allowed.any(dim=-1).expand_as(lse)
    assert torch.equal(lse[empty], ref_lse[empty]) and bool((lse[empty] == float("-inf")).all())
    assert (out[empty] == 0).all() and rel_err(lse[~empty], ref_lse[~empty]) <= 1e-12

    # Backward with the lse / delta of the attention over [ka, kb].
    qr, kar, var, kbr, vbr = (t.clone().requires_grad_() for t in (q, ka, va, kb, vb))
    full_allowed = torch.cat([torch.ones(B, 1, tq, 4, dtype=torch.bool), allowed], dim=-1)
    full_out, full_lse = _masked_attention(qr, torch.cat([kar, kbr], 2), torch.cat([var, vbr], 2), full_allowed, scale)
    dq_ref, dka_ref, dva_ref, dkb_ref, dvb_ref = torch.autograd.grad(full_out, (qr, kar, var, kbr, vbr), dout)
    delta = (dout * full_out.detach()).sum(dim=-1)
    full_lse = full_lse.detach()
    dq_a, dk_a, dv_a = block_attention_backward(q, ka, va, dout, full_lse, delta, scale=scale, causal=False)
    dq_b, dk_b, dv_b = block_attention_backward(q, kb, vb, dout, full_lse, delta, scale=scale, causal=causal,
                                                q_doc=q_doc, k_doc=k_doc)
    for got, ref in ((dq_a + dq_b, dq_ref), (dk_a, dka_ref), (dv_a, dva_ref), (dk_b, dkb_ref), (dv_b, dvb_ref)):
        assert got.dtype == torch.float64 and got.shape == ref.shape and rel_err(got, ref) <= 1e-12


def test_block_ops_on_float32_and_bfloat16_run_in_float32():
    """float32 / bf16 blocks: float32 results within float32 rounding of the float64 math (bf16 inputs exact)."""
    gen = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(B, HQ, 16, D, generator=gen) for _ in range(2))
    k, v = (torch.randn(B, HKV, 16, D, generator=gen) for _ in range(2))
    allowed = torch.ones(16, 16, dtype=torch.bool).tril()
    for dtype in (torch.float32, torch.bfloat16):
        qd, kd, vd, dod = (t.to(dtype) for t in (q, k, v, dout))
        out, lse = block_attention_forward(qd, kd, vd, scale=0.25, causal=True)
        q64, k64, v64 = (t.double().requires_grad_() for t in (qd, kd, vd))
        ref_out, ref_lse = _masked_attention(q64, k64, v64, allowed, 0.25)
        assert out.dtype == lse.dtype == torch.float32
        assert rel_err(out, ref_out) <= 1e-6 and rel_err(lse, ref_lse) <= 1e-6
        delta = (dod.double() * ref_out.detach()).sum(-1)
        grads = block_attention_backward(qd, kd, vd, dod, ref_lse.detach().float(), delta.float(), scale=0.25,
                                         causal=True)
        for g, r in zip(grads, torch.autograd.grad(ref_out, (q64, k64, v64), dod.double())):
            assert g.dtype == torch.float32 and rel_err(g, r) <= 1e-5
