"""The speed benchmarks' statistics on hand-made timings (no timed test): the interleaving
order, min + spread of the repeats, the work-matched reference and its overhead, the five-run
summary and its flags, and the chunk kernel's FLOP count against torch's own FLOP counter."""

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from benchmarks.kernel import chunk_flops, ideal_seconds
from benchmarks.repeatability import summarize_runs
from benchmarks.matched_reference import matched_figures
from benchmarks.timing import interleaved_order, matched_reference, ring_plan, summarize
from titan_cp.ops.gated_delta_rule.chunk import chunk_gated_delta_rule


def test_interleaved_order_alternates_direction():
    assert interleaved_order(["cp", "alone", "full"], 4) == [
        ["cp", "alone", "full"], ["full", "alone", "cp"], ["cp", "alone", "full"], ["full", "alone", "cp"]]
    # every variant sits at every position equally often over an even number of rounds
    for names in (["a", "b"], ["a", "b", "c"]):
        rounds = interleaved_order(names, 6)
        for n in names:
            positions = sorted(r.index(n) for r in rounds)
            assert sum(positions) == 3 * (len(names) - 1)


def test_summarize_keeps_the_minimum_and_the_spread():
    rows = [{"wall": 1.30, "comm": 0.10}, {"wall": 1.00, "comm": 0.20}, {"wall": 1.10}]
    s = summarize(rows)
    assert s["wall"] == 1.00 and s["comm"] == 0.0  # a missing key counts as 0 (that step had none)
    assert s["walls"] == [1.30, 1.00, 1.10]
    assert abs(s["spread"] - 0.30) < 1e-12


def test_matched_reference_adds_the_attention_work_beyond_the_shard():
    # two attention shapes: 3 layers of shape 0 (CP blocks 0.30 s vs the shard's causal block 0.10 s), 1 of shape 1
    assert abs(matched_reference(2.0, {0: 0.30, 1: 0.5}, {0: 0.10, 1: 0.2}, {0: 3, 1: 1}) - 2.9) < 1e-12
    assert matched_reference(2.0, {}, {}, {}) == 2.0  # no attention layers: the shard alone


def _rank(cp, alone, attn_cp, attn_alone, layers):
    r = {"cp": {"wall": cp, "cpu": cp}, "alone": {"wall": alone, "cpu": alone}, "attention_layers": layers}
    for i in layers:
        r[f"attn_cp:{i}"] = {"wall": attn_cp, "cpu": attn_cp / 2}
        r[f"attn_alone:{i}"] = {"wall": attn_alone, "cpu": attn_alone / 2}
    return r


def test_matched_overhead_of_an_overhead_row():
    # rank 0: shard 1.0 s + 0.2 s of extra attention; rank 1: 1.2 s + 0.1 s; CP steps 1.5 and 1.5 s
    ranks = [_rank(1.5, 1.0, 0.3, 0.1, {0: 1}), _rank(1.5, 1.2, 0.2, 0.1, {0: 1})]
    m = matched_figures(ranks, 1.5, 1.5)
    assert abs(m["step_matched_s"] - 1.25) < 1e-12  # mean of 1.2 and 1.3
    assert abs(m["overhead_fraction_matched"] - (1.5 - 1.25) / 1.5) < 1e-12
    assert abs(m["cpu_matched_s"] - 1.175) < 1e-12  # CPU times: half the attention extras
    assert [round(x, 12) for x in m["attention_extra_per_rank_s"]] == [0.2, 0.1]
    assert m["attention_layers"] == 1 and "t(matched)" in m["matched_definition"]
    g = matched_figures([_rank(1.5, 1.2, 0, 0, {})], 1.5, 1.5)  # no attention layers: one figure
    assert g["overhead_fraction_matched"] == (1.5 - 1.2) / 1.5 and "no attention layers" in g["matched_definition"]


def _blocks(plan):
    return sum(t.n_blocks for step in plan for t in step)


def test_ring_plan_is_the_ring_attention_work_of_each_layout():
    """ring_attention's docstring: contiguous rank r computes r + 1 segment blocks, zigzag 2P + 1 (of L / 2P)."""
    for P in (2, 4):
        assert [_blocks(ring_plan(r, P, "contiguous")) for r in range(P)] == list(range(1, P + 1))
        assert [_blocks(ring_plan(r, P, "zigzag")) for r in range(P)] == [2 * P + 1] * P
        assert [len(step) > 0 for step in ring_plan(0, P, "contiguous")] == [True] + [False] * (P - 1)
    assert ring_plan(1, 1, "zigzag") == ring_plan(0, 1, "contiguous") and _blocks(ring_plan(0, 1, "zigzag")) == 1


def _row(model, run, overhead, scaling, quiet=True, matched=None):
    return {"model": model, "run": run, "overhead_pct": overhead, "scaling": scaling, "quiet": quiet,
            "matched_overhead_pct": overhead if matched is None else matched}


def test_five_run_summary_spread_and_targets():
    rows = [_row("gdn", i, o, s) for i, (o, s) in enumerate([(3.0, 1.92), (4.0, 1.95), (5.5, 1.91),
                                                             (3.5, 1.93), (4.2, 1.96)])]
    rows += [_row("qwen3_5", i, o, s, quiet=i != 2, matched=o - 6.0) for i, (o, s) in
             enumerate([(1.0, 1.5), (9.0, 1.7), (2.0, 1.6), (1.5, 1.5), (1.0, 1.5)])]
    s = summarize_runs(rows)
    g = s["gdn"]["figures"]
    assert g["overhead_pct"]["half_range"] == 1.25 and g["overhead_pct"]["within_spread"]
    assert not g["overhead_pct"]["target_met_every_run"]  # 5.5% > 5% in run 2
    assert abs(g["scaling"]["half_range"] - 0.025) < 1e-12 and g["scaling"]["target_met_every_run"]
    assert s["gdn"]["all_runs_quiet"]
    q = s["qwen3_5"]["figures"]
    assert q["overhead_pct"]["half_range"] == 4.0 and not q["overhead_pct"]["within_spread"]
    assert not q["scaling"]["within_spread"] and not q["scaling"]["target_met_every_run"]
    assert not s["qwen3_5"]["all_runs_quiet"]
    m = q["matched_overhead_pct"]
    assert m["values"] == [-5.0, 3.0, -4.0, -4.5, -5.0] and m["half_range"] == 4.0 and m["target_met_every_run"]


def test_flop_count_matches_torch_flop_counter():
    """chunk_flops' matmul terms (all but the solve) equal what torch counts in a fwd + bwd."""
    B, T, H, K, V, C = 1, 128, 2, 8, 16, 32  # C^2 K, C^2 V and C K V all differ
    gen = torch.Generator().manual_seed(0)
    q, k = (F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen).requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen)).requires_grad_()
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen)).requires_grad_()
    h0 = torch.randn(B, H, K, V, generator=gen).requires_grad_()
    counts = {}
    for phase in ("fwd", "bwd"):
        # the kernel's in-place baddbmm_ counted as torch counts baddbmm
        def baddbmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
            (n, m, inner), p = a_shape, b_shape[-1]
            return 2 * n * m * inner * p

        with flop_counter.FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: baddbmm}) as counter:
            if phase == "fwd":
                o, s = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                              chunk_size=C)
            else:
                (o.sum() + s.sum()).backward()
        counts[phase] = counter.get_total_flops()
    flops = chunk_flops(C, K, V)
    chunks = B * H * T // C
    for phase in ("fwd", "bwd"):
        assert counts[phase] == chunks * (sum(flops[phase].values()) - flops[phase]["ccc"]), phase


def test_ideal_seconds_sums_flops_over_rates():
    assert ideal_seconds({"ckv": 100, "ccc": 50}, {"ckv": 10.0, "ccc": 5.0}, chunks=2) == 40.0
