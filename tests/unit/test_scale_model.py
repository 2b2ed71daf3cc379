"""The analytic CP scale model against hand-computed numbers, and its monotonicity."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titan_cp.models.gdn.flops import gdn_chunk_flops_per_token, training_flops_per_token
from titan_cp.analysis.scale_model import (
    STRATEGIES,
    Compute,
    Network,
    Workload,
    allgather_exchange,
    alltoall_exchange,
    layer_compute_s,
    layer_flops_per_token,
    logscan_exchange,
    powers_of_two,
    ring_attention_exchange,
    run_model,
    scan_rounds,
    stops_hiding_at,
    summary_bytes,
    sweep,
)
from titan_cp.analysis.scale_report import markdown
from titan_cp.analysis.shape import Dims, named_shape
from titan_cp.models.gdn import GDNModel, model_config

ROOT = Path(__file__).resolve().parents[2]

# H = 2 key/value heads, K = 4, V = 8: Dk = 8, Dv = 16
TINY = Dims.of(GDNModel.Config(dim=8, n_layers=1, num_heads=2, head_dim=4, expand_v=2.0, hidden_dim=16, vocab_size=10))
PRESET_SHAPES = {name: Dims.of(named_shape(name)) for name in ("340M", "1.3B", "7B-like")}
# every hop at 1 GB/s, 1 us: easy arithmetic
FLAT = Network(inter_bw=1e9, inter_latency=1e-6, intra_bw=1e9, intra_latency=1e-6, gpus_per_node=1)


def test_scan_rounds():
    assert [scan_rounds(p) for p in (1, 2, 3, 4, 5, 8, 9, 1024, 1025)] == [0, 1, 2, 2, 3, 3, 4, 10, 11]
    assert scan_rounds(5) == math.ceil(math.log2(5)) == 3


def test_summary_bytes_by_hand():
    # [S_local | M] = Hv * K * (K + V) fp32 = 2 * 4 * 12 * 4
    assert summary_bytes(TINY) == 384
    assert summary_bytes(TINY, Workload(batch=3)) == 3 * 384
    assert summary_bytes(TINY, Workload(tp=2)) == 192
    # 340M: 6 heads * 256 * 768 * 4 bytes = 4.5 MiB
    assert summary_bytes(PRESET_SHAPES["340M"]) == 6 * 256 * 768 * 4 == 4.5 * 2**20


def test_allgather_p4_by_hand():
    ex = allgather_exchange(TINY, 4, FLAT, Compute(fold_tflops=1.0))
    assert ex.bytes_fwd == 3 * 384  # three predecessors' summaries
    assert ex.bytes_bwd == 3 * (2 * 4 * 8 * 4)  # three state gradients
    assert ex.steps_fwd == ex.steps_bwd == 3  # ring: P - 1 steps
    halo = 3 * (2 * 8 + 16) * 2  # conv-1 tokens of pre-conv q,k,v in bf16
    comm = 3 * (1e-6 + 384e-9) + 3 * (1e-6 + 256e-9) + 2 * (1e-6 + halo * 1e-9)
    assert ex.comm_s == pytest.approx(comm)
    # fold: (P-1) steps of 2 K^2 V flops per head, fwd and bwd
    assert ex.fold_s == pytest.approx(2 * 3 * 2 * 16 * 8 * 2 / 1e12)
    assert ex.time_s == pytest.approx(ex.comm_s + ex.fold_s)


def test_allgather_tree_uses_log_steps():
    net = Network(**{**FLAT.__dict__, "allgather_algo": "tree"})
    ex = allgather_exchange(TINY, 8, net)
    assert ex.steps_fwd == 3
    ring = allgather_exchange(TINY, 8, FLAT)
    assert ex.bytes_fwd == ring.bytes_fwd  # same bytes, fewer latencies
    assert ex.comm_s < ring.comm_s


def test_logscan_by_hand():
    for P in (2, 4, 5, 8, 1000):
        ex = logscan_exchange(TINY, P, FLAT)
        r = math.ceil(math.log2(P))
        assert ex.steps_fwd == ex.steps_bwd == r
        assert ex.bytes_fwd == ex.bytes_bwd == r * 384
    ex = logscan_exchange(TINY, 5, FLAT, Compute(fold_tflops=1.0))
    halo = 3 * (2 * 8 + 16) * 2
    assert ex.comm_s == pytest.approx(2 * 3 * (1e-6 + 384e-9) + 2 * (1e-6 + halo * 1e-9))
    # combine: 2 K^2 (K + V) flops per head per round, 3 rounds, fwd + bwd
    assert ex.fold_s == pytest.approx(2 * 3 * 2 * 16 * 12 * 2 / 1e12)


def test_alltoall_by_hand_and_linear_in_length():
    four = Dims.of(GDNModel.Config(dim=8, n_layers=1, num_heads=4, head_dim=4, expand_v=2.0, hidden_dim=16))
    ex = alltoall_exchange(four, 4, 100, FLAT)
    # in: q,k (2 * 16) + v (32) + a,b (2 * 4) = 72 values; out: o = 32 values; bf16; 3/4 leaves the rank
    assert ex.bytes_fwd == ex.bytes_bwd == pytest.approx(0.75 * 100 * (72 + 32) * 2)
    per_a2a = lambda vals: 3 * 1e-6 + 3 * (100 * vals * 2 / 4) / 1e9
    assert ex.comm_s == pytest.approx(2 * (per_a2a(72) + per_a2a(32)))
    for P in (2, 4):
        b = [alltoall_exchange(four, P, T, FLAT).bytes_fwd for T in (1000, 2000, 4000)]
        assert b[1] == pytest.approx(2 * b[0]) and b[2] == pytest.approx(4 * b[0])
    # summary strategies do not depend on the length at all
    assert allgather_exchange(four, 4, FLAT).bytes_fwd == allgather_exchange(four, 4, FLAT).bytes_fwd


def test_alltoall_needs_heads_divisible_by_cp_times_tp():
    six = PRESET_SHAPES["340M"]  # 6 heads
    assert alltoall_exchange(six, 2, 1024).feasible
    assert not alltoall_exchange(six, 4, 1024).feasible
    assert math.isinf(alltoall_exchange(six, 4, 1024).time_s)
    assert alltoall_exchange(six, 2, 1024, wl=Workload(tp=3)).feasible
    assert not alltoall_exchange(six, 2, 1024, wl=Workload(tp=2)).feasible


def test_ring_attention_reference_by_hand():
    ex = ring_attention_exchange(TINY, 4, 100, FLAT)
    step = 100 * 2 * 8 * 2  # K and V of 100 tokens, kv width = dim = 8, bf16
    assert ex.bytes_fwd == 3 * step and ex.bytes_bwd == 3 * 2 * step


def test_gdn_chunk_flops_formula():
    # 6 C K + 4 C V + 6 K V + C^2 / 3
    assert gdn_chunk_flops_per_token(128, 128, 64) == pytest.approx(49152 + 32768 + 98304 + 4096 / 3)
    assert gdn_chunk_flops_per_token(256, 512, 64) == pytest.approx(98304 + 131072 + 786432 + 4096 / 3)


def test_mfu_flops_and_scale_model_flops_agree_on_340m():
    """The training log's MFU (get_nparams_and_flops) and the scale model count the same FLOPs.

    Scale model: fwd FLOPs of every block (projections, convs, MLP, the chunked delta rule) and
    lm_head, times 3 for a training step; MFU: 6 x matmul params + 3 x the delta rule. They may
    differ only by the norm weights, A_log and dt_bias (counted as params by MFU, not as matmuls).
    """
    config = model_config("340M")
    with torch.device("meta"):
        model = config.build()
    nparams, mfu_flops = config.get_nparams_and_flops(model, 8192)
    d = Dims.of(config)
    scale_fwd = d.n_layers * sum(layer_flops_per_token(d).values()) + 2 * d.dim * d.vocab
    non_matmul = d.n_layers * (2 * d.dim + d.V + 2 * d.Hv) + d.dim
    assert mfu_flops == pytest.approx(3 * scale_fwd + 6 * non_matmul, abs=1)
    assert mfu_flops == pytest.approx(3 * scale_fwd, rel=2e-4)  # the old model.py count: +3.5%
    # the kernel term both use is the chunked count: 6 C K + 4 C V + 6 K V + C^2 / 3 per value head
    kernel = 3 * d.n_layers * d.Hv * gdn_chunk_flops_per_token(256, 512, 64)
    assert mfu_flops - 6 * (nparams - d.vocab * d.dim) == pytest.approx(kernel, abs=1)
    assert training_flops_per_token(config, 0, 8192) == pytest.approx(kernel)


def test_default_kernel_rate_reproduces_fla_pr_691():
    # 32K tokens, 64 heads of K = V = 128 took 15.56 ms fwd + bwd on one H800
    flops = 32768 * 64 * gdn_chunk_flops_per_token(128, 128, 64) * (1 + Compute().kernel_bwd_factor)
    assert flops / (Compute().kernel_tflops * 1e12) == pytest.approx(15.56e-3, rel=0.02)


def test_layer_compute_by_hand():
    f = layer_flops_per_token(TINY, C=64)
    assert f["proj"] == 2 * 8 * (2 * 8 + 2 * 16 + 2 * 2) + 2 * 16 * 8
    assert f["mlp"] == 6 * 8 * 16
    assert f["conv"] == 2 * 4 * (2 * 8 + 16)
    assert f["kernel"] == 2 * gdn_chunk_flops_per_token(4, 8, 64)
    comp = Compute(matmul_tflops=1.0, kernel_tflops=2.0)
    t = layer_compute_s(TINY, 1000, comp)
    want = 1000 * ((f["proj"] + f["conv"] + f["mlp"]) * 3 / 1e12 + f["kernel"] * 3.5 / 2e12)
    assert t == pytest.approx(want)
    assert layer_compute_s(TINY, 1000, comp, Workload(tp=2)) == pytest.approx(t / 2)
    assert layer_compute_s(TINY, 1000, comp, Workload(batch=2)) == pytest.approx(2 * t)


@pytest.mark.parametrize("name", sorted(PRESET_SHAPES))
def test_monotone_in_p(name):
    shape = PRESET_SHAPES[name]
    Ps = powers_of_two(2, 1024)
    fixed_t = sweep(shape, Ps, tokens_per_rank=8192)
    fixed_l = sweep(shape, Ps, global_len=1 << 20)
    for rows in (fixed_t, fixed_l):
        for s in ("allgather", "logscan", "ring_attn"):
            times = [r.exchanges[s].time_s for r in rows]
            assert times == sorted(times) and times[-1] > times[0], s
        # bytes received: allgather grows linearly in P, logscan as log P
        ag = [r.exchanges["allgather"].bytes_fwd for r in rows]
        assert ag == [(P - 1) * ag[0] for P in Ps]
        ls = [r.exchanges["logscan"].bytes_fwd for r in rows]
        assert ls == [scan_rounds(P) * ls[0] for P in Ps]
    assert len({r.compute_s for r in fixed_t}) == 1
    comp = [r.compute_s for r in fixed_l]
    assert all(b == pytest.approx(a / 2) for a, b in itertools.pairwise(comp))
    # logscan never loses to allgather from P = 4 on (same rounds at P = 2)
    for r in fixed_t[1:]:
        assert r.exchanges["logscan"].time_s <= r.exchanges["allgather"].time_s


def test_faster_links_never_hurt():
    shape = PRESET_SHAPES["1.3B"]
    slow = Network(inter_bw=25e9)
    fast = Network(inter_bw=100e9)
    for P in powers_of_two(2, 256):
        for fn in (allgather_exchange, logscan_exchange):
            assert fn(shape, P, fast).time_s <= fn(shape, P, slow).time_s


def test_stops_hiding_at():
    shape = PRESET_SHAPES["1.3B"]
    rows = sweep(shape, powers_of_two(2, 1024), tokens_per_rank=8192)
    for s in STRATEGIES:
        P, _ = stops_hiding_at(rows, s, 0.10)
        if P is None:
            assert all(r.exchanges[s].time_s <= 0.1 * r.compute_s for r in rows)
            continue
        before = [r for r in rows if r.P < P]
        assert all(r.exchanges[s].feasible and r.exchanges[s].time_s <= 0.1 * r.compute_s for r in before)
    assert stops_hiding_at(rows, "alltoall", 0.10) == (4, "infeasible")  # 6 heads
    assert stops_hiding_at(rows, "logscan", 1e9) == (None, "")
    # a looser threshold never makes a strategy stop earlier
    for s in ("allgather", "logscan"):
        strict, loose = (stops_hiding_at(rows, s, x)[0] or 10**9 for x in (0.05, 0.5))
        assert strict <= loose


def test_markdown_and_cli(tmp_path):
    result = run_model([("tiny", TINY)], [2, 4], 1024, 8192, 0.1)
    md = markdown(result)
    assert "| P | tokens/rank | compute |" in md and "First P" in md
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.scale_tables", "--markdown", "--json", str(out), "--max-p", "64"],
        capture_output=True, text=True, check=True, timeout=60, cwd=ROOT,
    )
    assert "### 340M" in proc.stdout and "### 7B-like" in proc.stdout
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["models"]] == ["340M", "1.3B", "7B-like"]
    rows = data["models"][0]["modes"]["fixed_tokens_per_rank"]["rows"]
    assert [r["P"] for r in rows] == [2, 4, 8, 16, 32, 64]
    assert rows[1]["exchanges"]["allgather"]["bytes_fwd"] == 3 * 6 * 256 * 768 * 4
