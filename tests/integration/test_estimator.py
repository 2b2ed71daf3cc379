"""The memory estimator: parameter counts by hand, activation counts against autograd."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from titan_cp.analysis.memory import (
    Parallelism,
    TrainSetup,
    estimate_memory,
    layer_activation_terms,
    max_seq_len,
)
from titan_cp.analysis.shape import Dims, fla_mlp_hidden, layer_param_counts, named_shape, param_counts, parse_shape
from titan_cp.models.gdn import GDNModel, model_config

ROOT = Path(__file__).resolve().parents[2]

# dim 8, 2 layers, H = Hv = 2 heads, K = 4, V = 8 (Dk = 8, Dv = 16), conv 4, MLP 16, vocab 10
TINY = GDNModel.Config(dim=8, n_layers=2, num_heads=2, head_dim=4, expand_v=2.0, hidden_dim=16, vocab_size=10)
PRESETS = {name: named_shape(name) for name in ("340M", "1.3B", "7B-like")}


def test_param_count_by_hand():
    per_layer = (
        8  # attention_norm
        + 8 * 8 + 8 * 8  # q_proj, k_proj: 8 -> 8
        + 8 * 16  # v_proj: 8 -> 16
        + 8 * 2 + 8 * 2  # a_proj, b_proj: 8 -> 2
        + 8 * 16  # g_proj
        + 4 * (8 + 8 + 16)  # depthwise convs, kernel 4, no bias
        + 2 + 2  # A_log, dt_bias
        + 8  # o_norm weight (V, shared by heads)
        + 16 * 8  # o_proj
        + 8  # ffn_norm
        + 3 * 8 * 16  # w1, w3, w2
    )
    assert per_layer == 1084
    c = param_counts(TINY)
    assert c["layer"] == sum(layer_param_counts(TINY).values()) == 1084
    assert c["total"] == 2 * 1084 + 10 * 8 + 8 + 8 * 10 == 2336
    assert param_counts(replace(TINY, tie_embeddings=True))["total"] == 2336 - 80
    assert c["tp_replicated"] == 2 * (8 + 8 + 8) + 8


def test_fla_mlp_rule_and_presets():
    assert PRESETS["340M"].hidden_dim == fla_mlp_hidden(1024) == 2816  # int(1024 * 4 * 2/3) = 2730 -> 2816
    assert PRESETS["1.3B"].hidden_dim == fla_mlp_hidden(2048) == 5632
    assert PRESETS["7B-like"].hidden_dim == 11008
    assert Dims.of(PRESETS["340M"]).V == 512 and Dims.of(PRESETS["340M"]).key_dim == 1536
    assert 1.3e9 < param_counts(PRESETS["1.3B"])["total"] < 1.45e9
    name, s = parse_shape("340M:dim=512,n_layers=4,num_heads=4,head_dim=64,expand_v=1.5,vocab_size=1000")
    d = Dims.of(s)
    assert (d.dim, d.n_layers, d.H, d.K, d.V, d.vocab) == (512, 4, 4, 64, 96, 1000) and name.startswith("340M:")
    with pytest.raises(ValueError, match="340M"):
        parse_shape("nope")
    with pytest.raises(ValueError, match="layer_pattern"):
        Dims.of(model_config("debug_hybrid"))


def test_param_counts_match_the_built_model():
    """The analytic counts are those of the model the config builds (on meta: no memory)."""
    for config in (model_config("debug"), model_config("340M", num_v_heads=12)):
        with torch.device("meta"):
            model = config.build()
        assert param_counts(config)["total"] == sum(p.numel() for p in model.parameters())
        block = model.layers["0"]
        assert param_counts(config)["layer"] == sum(p.numel() for p in block.parameters())


# ----------------------------------------------------------------------------- a reference block


class _Kernel(torch.autograd.Function):
    """Stands in for the gated delta rule: saves exactly its inputs, nothing private."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta):
        ctx.save_for_backward(q, k, v, g, beta)
        return v * 1.0

    @staticmethod
    def backward(ctx, go):
        q, k, _v, g, beta = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), go, torch.zeros_like(g), torch.zeros_like(beta)


class _Block(nn.Module):
    """The block of the module docstring in plain PyTorch ops."""

    def __init__(self, config: GDNModel.Config):
        super().__init__()
        s = Dims.of(config)
        d, Dk, Dv, Hv = s.dim, s.key_dim, s.value_dim, s.Hv
        self.s = s
        self.attention_norm, self.ffn_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_proj, self.k_proj = nn.Linear(d, Dk, bias=False), nn.Linear(d, Dk, bias=False)
        self.v_proj, self.g_proj = nn.Linear(d, Dv, bias=False), nn.Linear(d, Dv, bias=False)
        self.a_proj, self.b_proj = nn.Linear(d, Hv, bias=False), nn.Linear(d, Hv, bias=False)
        self.o_proj = nn.Linear(Dv, d, bias=False)
        conv = lambda n: nn.Conv1d(n, n, s.conv_size, groups=n, padding=s.conv_size - 1, bias=False)
        self.q_conv, self.k_conv, self.v_conv = conv(Dk), conv(Dk), conv(Dv)
        self.A_log, self.dt_bias = nn.Parameter(torch.zeros(Hv)), nn.Parameter(torch.zeros(Hv))
        self.o_norm = nn.Parameter(torch.ones(s.V))
        self.w1, self.w3 = nn.Linear(d, s.hidden, bias=False), nn.Linear(d, s.hidden, bias=False)
        self.w2 = nn.Linear(s.hidden, d, bias=False)

    def _conv(self, conv, x):
        T = x.shape[1]
        return F.silu(conv(x.transpose(1, 2))[..., :T].transpose(1, 2))

    def forward(self, x):
        s, (B, T, _) = self.s, x.shape
        xn = self.attention_norm(x)
        q = self._conv(self.q_conv, self.q_proj(xn)).view(B, T, s.H, s.K)
        k = self._conv(self.k_conv, self.k_proj(xn)).view(B, T, s.H, s.K)
        v = self._conv(self.v_conv, self.v_proj(xn)).view(B, T, s.Hv, s.V)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.b_proj(xn))
        g = -self.A_log.exp() * F.softplus(self.a_proj(xn).float() + self.dt_bias)
        o = _Kernel.apply(q, k, v, g, beta)
        gate = self.g_proj(xn).view(B, T, s.Hv, s.V)
        o = F.rms_norm(o, (s.V,), self.o_norm) * F.silu(gate)
        x = x + self.o_proj(o.reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


@contextlib.contextmanager
def _saved_storages(module: nn.Module):
    """Yields {storage: bytes}, filled with the distinct non-parameter storages autograd saves inside."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    with _saved_storages(module) as seen:
        module(x).sum().backward()
    return sum(seen.values())


def test_reference_block_params_match_formula():
    blk = _Block(TINY)
    assert sum(p.numel() for p in blk.parameters()) == param_counts(TINY)["layer"]


GVA = GDNModel.Config(dim=16, n_layers=1, num_heads=2, head_dim=8, expand_v=1.5, num_v_heads=4, hidden_dim=40)


@pytest.mark.parametrize("shape", [TINY, GVA])
def test_activation_terms_match_autograd(shape):
    """Default per-layer counts = what autograd saves for the plain-PyTorch block (fp32)."""
    torch.manual_seed(0)
    T = 256
    blk = _Block(shape)
    measured = _saved_bytes(blk, torch.randn(1, T, shape.dim, requires_grad=True))
    d = Dims.of(shape)
    setup = TrainSetup(seq_len=T, act_dtype="fp32", kernel_saved_per_head_token=0)
    est = estimate_memory(shape, setup, Parallelism())
    # the only difference: the conv's padded output keeps (conv-1) extra positions
    assert est.layer_activation_bytes == pytest.approx(measured, rel=0.01)
    terms = {t.name: t.elems_per_token for t in layer_activation_terms(d, setup, Parallelism())}
    d, H, Hv, Dk, Dv, hid = d.dim, d.H, d.Hv, d.key_dim, d.value_dim, d.hidden
    act = sum(e for n, e in terms.items() if n not in ("attn_norm_rstd", "ffn_norm_rstd", "qk_l2_norms", "gates"))
    assert act == 6 * d + 8 * Dk + 9 * Dv + 4 * hid
    assert terms["gates"] + terms["qk_l2_norms"] + terms["attn_norm_rstd"] + terms["ffn_norm_rstd"] == 5 * Hv + 4 * H + 2


# ----------------------------------------------------------------------------- scaling


def test_hand_computed_estimate():
    setup = TrainSetup(seq_len=64, param_dtype="fp32", act_dtype="fp32", kernel_saved_per_head_token=0,
                       loss_chunks=1, workspace_fraction=0.0, kernel_workspace_states=0)
    est = estimate_memory(TINY, setup)
    assert est.params == est.grads == 2336 * 4
    assert est.optimizer == 2336 * 8
    assert est.fsdp_buffers == 0
    per_token = (6 * 8 + 8 * 8 + 9 * 16 + 4 * 16) * 4 + (5 * 2 + 4 * 2 + 2) * 4
    assert est.layer_activation_bytes == 64 * per_token
    assert est.activations == 2 * 64 * per_token
    assert est.model_activations == 64 * (8 + 3 * 8 * 4 + 4)
    assert est.loss_phase == 64 * 8 * 4 + 64 * 10 * 12  # grad accumulator + full fp32/bf16 logits work
    assert est.total == est.static + est.activations + est.model_activations + max(est.loss_phase, est.backward_phase)


def test_scaling_with_parallelism():
    s = PRESETS["1.3B"]
    base = estimate_memory(s, TrainSetup(seq_len=16384))
    double = estimate_memory(s, TrainSetup(seq_len=32768))
    assert double.activations == pytest.approx(2 * base.activations)
    cp = estimate_memory(s, TrainSetup(seq_len=32768, cp_extra=False), Parallelism(cp=2))
    assert cp.activations == pytest.approx(base.activations)  # same tokens per rank
    assert cp.params == pytest.approx(base.params / 2)  # FSDP over dp x cp
    cp_trick = estimate_memory(s, TrainSetup(seq_len=32768), Parallelism(cp=2))
    assert "cp_q_transition" not in cp_trick.layer_terms  # recomputed in the backward, not kept (the default)
    kept = estimate_memory(s, TrainSetup(seq_len=32768, cp_q_transition="keep"), Parallelism(cp=2))
    Hv_K = Dims.of(s).Hv * Dims.of(s).K
    assert kept.layer_terms["cp_q_transition"] == 16384 * Hv_K * 4  # tokens per rank x Hv K fp32
    assert kept.activations - cp_trick.activations == pytest.approx(Dims.of(s).n_layers * 16384 * Hv_K * 4)
    for unused in (Parallelism(cp=1), Parallelism(cp=2, tp=1)):  # no CP, or head-parallel: no q M
        exchange = "alltoall" if unused.cp > 1 else "allgather"
        setup = TrainSetup(seq_len=32768, cp_q_transition="keep", cp_exchange=exchange)
        assert "cp_q_transition" not in estimate_memory(s, setup, unused).layer_terms
    assert cp_trick.layer_terms["kernel_internal"] == 0  # the recomputing segment kernel saves none of FLA's
    # under CP the recomputing kernel keeps none of FLA's A and q M is recomputed: less than without the CP terms
    assert cp_trick.activations < cp.activations
    dp = estimate_memory(s, TrainSetup(seq_len=16384), Parallelism(dp=8))
    assert dp.params == pytest.approx(base.params / 8) and dp.fsdp_buffers > 0
    tp = estimate_memory(s, TrainSetup(seq_len=16384), Parallelism(tp=2))
    assert base.activations / 2 < tp.activations < base.activations  # gathered linear inputs stay whole
    assert tp.layer_terms["mlp_hidden"] == pytest.approx(base.layer_terms["mlp_hidden"] / 2)
    assert tp.layer_terms["mixer_input"] == base.layer_terms["mixer_input"]
    ac = estimate_memory(s, TrainSetup(seq_len=16384, ac="full"))
    assert ac.activations == 21 * 16384 * 2048 * 2 and ac.total < base.total
    cal = estimate_memory(s, TrainSetup(seq_len=16384), calibration={"mlp_hidden": 0.5})
    assert base.layer_activation_bytes - cal.layer_activation_bytes == pytest.approx(base.layer_terms["mlp_hidden"] / 2)
    bf16 = estimate_memory(s, TrainSetup(seq_len=16384, param_dtype="bf16", master_weights=True))
    assert bf16.params == pytest.approx(base.params / 2) and bf16.optimizer == pytest.approx(base.optimizer * 1.5)
    with pytest.raises(ValueError, match="full"):
        estimate_memory(s, TrainSetup(seq_len=16384, ac="some"))


def test_max_seq_len():
    s = PRESETS["340M"]
    par = Parallelism(dp=2, cp=4)
    setup = TrainSetup(seq_len=0)
    budget = 40 * 2**30
    L = max_seq_len(budget, s, setup, par)
    step = 128 * 4
    assert L > 0 and L % step == 0
    assert estimate_memory(s, replace(setup, seq_len=L), par).total <= budget
    assert estimate_memory(s, replace(setup, seq_len=L + step), par).total > budget
    assert max_seq_len(budget, s, replace(setup, ac="full"), par) > 4 * L
    assert max_seq_len(1.0, s, setup, par) == 0
    assert max_seq_len(budget, s, setup, Parallelism(dp=2, cp=8)) > L


def test_cli(tmp_path):
    out = tmp_path / "mem.json"
    proc = subprocess.run(
        [sys.executable, "-m", "titan_cp.cli.estimate", "--shape", "340M", "--seq-len", "8192",
         "--cp", "2", "--budget-gib", "80", "--terms", "--json", str(out), "--calibrate", "mlp_hidden=0.9"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    assert "TOTAL (peak)" in proc.stdout and "mlp_hidden" in proc.stdout
    data = json.loads(out.read_text())
    assert data["param_counts"]["total"] == param_counts(PRESETS["340M"])["total"]
    proc = subprocess.run(
        [sys.executable, "-m", "titan_cp.cli.estimate", "--shape", "debug", "--num-heads", "2",
         "--vocab-size", "2000", "--seq-len", "2048", "--act-dtype", "fp32"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    assert "dim 64, 2 layers, 2 heads x K 16" in proc.stdout and "vocab 2000" in proc.stdout
    assert data["max_seq_len"] > 8192 and data["calibration"] == {"mlp_hidden": 0.9}


# ----------------------------------------------------------------------------- calibration for titan_cp's kernel


def _model_saved_bytes(rank: int, P: int, overrides: dict, T: int, q_transition: str = "recompute") -> tuple[int, int]:
    """Saved-tensor bytes (+ decoder output) of titan_cp's GDN model forward on this rank's shard, and T_local."""
    import torch.distributed as dist

    from titan_cp.cp.context import CPContext
    from titan_cp.cp.layout import rank_segments
    from titan_cp.models.gdn import model_config
    from titan_cp.models.common.parallelize import apply_cp

    torch.manual_seed(0)
    model = model_config("debug", kernel="torch", **overrides).build()
    model.init_weights()
    apply_cp(model, CPContext(group=dist.group.WORLD, q_transition=q_transition) if P > 1 else None)
    tokens = torch.randint(0, overrides["vocab_size"], (1, T))
    if P > 1:
        tokens = rank_segments(tokens, 1, rank, P, "contiguous")
    tokens = tokens.contiguous()
    with _saved_storages(model) as seen:
        seq = model.sequence_info(tokens, None)
        h = model.tok_embeddings(tokens)
        for block in model.layers.values():
            h = block(h, seq)
        h = model.norm(h)
    h.sum().backward()
    return sum(seen.values()) + h.numel() * h.element_size(), tokens.shape[1]


_CAL_MODEL = dict(dim=48, n_layers=2, num_heads=2, num_v_heads=4, head_dim=16, expand_v=2.0, hidden_dim=96,
                  vocab_size=50)
# a hybrid: GDN, attention (ring attention under CP), GDN
_CAL_HYBRID = dict(_CAL_MODEL, n_layers=3, layer_pattern="GAG", attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=16)


def _torch_profile_estimate(T: int, P: int, overrides: dict = _CAL_MODEL, q_transition: str = "recompute"):
    from titan_cp.analysis.profiles import kernel_profile

    shape = model_config("debug", kernel="torch", **overrides)
    prof = kernel_profile("torch", shape, "fp32")
    setup = TrainSetup(seq_len=T, act_dtype="fp32", cp_q_transition=q_transition, **prof.setup)
    est = estimate_memory(shape, setup, Parallelism(cp=P, fsdp_over_cp=False), calibration=prof.calibration)
    return est.activations + est.model_activations


@pytest.mark.parametrize("overrides", [_CAL_MODEL, _CAL_HYBRID], ids=["gdn", "hybrid"])
def test_torch_kernel_profile_matches_the_real_model(overrides):
    """The 'torch' profile predicts what titan_cp's own model saves (GVA shape, 640 tokens) within 2%,
    attention blocks of a hybrid included."""
    measured, _ = _model_saved_bytes(0, 1, overrides, 640)
    assert _torch_profile_estimate(640, 1, overrides) == pytest.approx(measured, rel=0.02)


def _cp_saved(rank, world):
    return {mode: [_model_saved_bytes(rank, world, overrides, 1280, mode)[0] for overrides in (_CAL_MODEL, _CAL_HYBRID)]
            for mode in ("recompute", "keep")}


def test_torch_kernel_profile_matches_the_real_model_under_cp():
    """The estimate is the worst rank's within 2%, for both ``cp_q_transition`` modes. With
    'recompute' the two ranks save the same within 1% (a later segment's rank keeps no q M, it is
    recomputed in the backward; the first segment's rank keeps the later segment's M for the reverse
    fold); 'keep' adds exactly q M, Hv K fp32 per token and GDN layer, on the rank with a predecessor."""
    from titan_cp.testing import run_on_ranks

    per_rank = run_on_ranks(_cp_saved, 2, timeout=300)
    for i, overrides in enumerate((_CAL_MODEL, _CAL_HYBRID)):
        recompute = [r["recompute"][i] for r in per_rank]
        keep = [r["keep"][i] for r in per_rank]
        assert _torch_profile_estimate(1280, 2, overrides) == pytest.approx(max(recompute), rel=0.02)
        assert _torch_profile_estimate(1280, 2, overrides, "keep") == pytest.approx(max(keep), rel=0.02)
        assert recompute[0] == pytest.approx(recompute[1], rel=0.01)
        n_gdn = overrides.get("layer_pattern", "G" * overrides["n_layers"]).count("G")
        q_m = n_gdn * 640 * overrides["num_v_heads"] * overrides["head_dim"] * 4
        assert (keep[0], keep[1] - recompute[1]) == (recompute[0], q_m)  # rank 0 holds segment 0: no q M


def test_replicated_params_buffers_and_grads_at_peak():
    s = PRESETS["340M"]
    setup = TrainSetup(seq_len=8192)
    sharded = estimate_memory(s, setup, Parallelism(cp=4))
    replicated = estimate_memory(s, setup, Parallelism(cp=4, fsdp_over_cp=False))
    assert replicated.params == pytest.approx(4 * sharded.params) and replicated.fsdp_buffers == 0
    assert replicated.activations == pytest.approx(sharded.activations)
    # the fixed CP buffers: allgather keeps P summaries per layer, logscan one
    ag = estimate_memory(s, setup, Parallelism(cp=8)).layer_terms["cp_state_buffers"]
    ls = estimate_memory(s, replace(setup, cp_exchange="logscan"), Parallelism(cp=8)).layer_terms["cp_state_buffers"]
    assert ag > ls > 0
    assert "cp_state_buffers" not in estimate_memory(s, replace(setup, cp_exchange="alltoall"),
                                                     Parallelism(cp=8)).layer_terms
    # grads_at_peak < 1 lowers the peak by that share of the gradients, never below params + all grads
    base = estimate_memory(s, setup)
    cal = estimate_memory(s, setup, calibration={"grads_at_peak": 0.25})
    assert base.total - cal.total == pytest.approx(0.75 * base.grads)
    tiny = estimate_memory(s, TrainSetup(seq_len=128, loss_chunks=1), calibration={"grads_at_peak": 0.0})
    assert tiny.total >= tiny.params + tiny.grads + tiny.optimizer
