"""The Mamba-2 family as a whole model: transformers' ``Mamba2ForCausalLM`` folders in and out, CP, generation.

transformers 5.6.2 runs its Mamba-2 on CPU through ``torch_forward`` (pure PyTorch): an
independent reference. A tiny random ``Mamba2ForCausalLM`` (2 groups, tied embeddings,
non-trivial A_log / dt_bias / D / norms) is ``save_pretrained``; its logits and its greedy
``generate`` ids are the reference for titan_cp's load (one rank, CP 2) and O(1)-per-token
decode; a titan_cp model written with ``save_hf_folder`` loads into transformers with
titan_cp's logits. One 2-rank launch checks (a) the folder's logits under CP 2 for every
exchange x layout, (b) an 'MA' hybrid (Mamba-2 + softmax attention, blocks without an MLP)
with packed documents on / around the segment boundaries: loss, every gradient and the
parameters after 2 SGD steps equal one rank (fp32 1e-5), (c) one Mamba-2 layer's exchange
bytes do not depend on L. A 3-rank launch runs (b) in float64 for every case (1e-10). A 4-rank
launch checks tensor parallelism (head-parallel, titan_cp/models/gdn/mamba2_layer.py): (b) under
TP 2 x CP 2 for every fp32 case and under TP 2 alone with B / C in 2 groups (one per TP rank), in 1
(read by both) and in 3 (a rank's heads straddle two), fp32 1e-5, and TP 2 x CP 2 in float64 (1e-10); and (b) at CP 4 in float64 for every
case (1e-10).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from titan_cp.cli.trained_model import load_checkpoint
from titan_cp.cp.comm import comm_stats
from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import rank_segments
from titan_cp.errors import ConfigError
from titan_cp.models.common.parallelize import apply_cp
from titan_cp.models.common.sequence import SequenceInfo
from titan_cp.models.gdn.decode import generate
from titan_cp.models.gdn.mamba2_layer import Mamba2Mixer
from titan_cp.models.mamba2.flavors import model_config
from titan_cp.models.mamba2.hf_config import hf_config_from_model, model_fields_from_hf
from titan_cp.models.mamba2.hf_folder import load_hf_folder, save_hf_folder
from torch.distributed.tensor import DTensor, Replicate, Shard

from titan_cp.testing import run_on_ranks
from tests.support.linear_lm import CASES, FP64_CASES, assert_compared_within, one_rank_errors, worst_over_ranks

transformers = pytest.importorskip("transformers")

T, PROMPT, NEW, VOCAB = 24, 6, 8, 97
SHAPE = dict(num_heads=4, head_dim=8, ssm_state_size=8, ssm_n_groups=2, conv_size=4)  # E = 32 = 2 x dim


def _hf_model():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(hidden_size=16, num_hidden_layers=2, num_heads=4, head_dim=8, expand=2, state_size=8,
                          n_groups=2, conv_kernel=4, vocab_size=VOCAB, chunk_size=8, tie_word_embeddings=True,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Mamba2ForCausalLM(config).eval()
    with torch.no_grad():  # away from the init's symmetric values
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "D", "norm.weight", "norm_f.weight", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """transformers' folder, tokens (no special ids), logits, greedy ids; a titan_cp export and its HF logits."""
    from transformers import Mamba2ForCausalLM

    tmp = tmp_path_factory.mktemp("mamba2")
    model = _hf_model()
    model.save_pretrained(tmp / "hf")
    tokens = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    ours = model_config("mamba2_debug", dim=16, vocab_size=VOCAB, **SHAPE).build()
    ours.init_states()
    save_hf_folder(ours, tmp / "exported")
    with torch.no_grad():
        prompt = tokens[:, :PROMPT]
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                                eos_token_id=None)
        exported = Mamba2ForCausalLM.from_pretrained(tmp / "exported").eval()
        return {"folder": tmp / "hf", "tokens": tokens, "logits": model(tokens).logits, "greedy": greedy,
                "ours": ours.eval(), "exported_logits": exported(tokens).logits}


def _close(ours, theirs, what):
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    print(f"{what}: max |titan_cp - transformers| = {err:.2e} at logits up to {scale:.1f}")
    assert err <= 1e-5 * max(scale, 1.0), f"{what}: {err:.2e}"


def test_hf_folder_loads_with_its_logits_and_greedy_ids(hf):
    model, _ = load_checkpoint(hf["folder"])  # the generate / evaluate commands' loader
    assert model.config.layer_types() == ["M", "M"] and model.config.tie_embeddings
    assert model.layers["0"].feed_forward is None
    with torch.no_grad():
        _close(model(hf["tokens"]), hf["logits"], "transformers folder, one rank")
    ids = generate(model, hf["tokens"][:, :PROMPT], NEW)
    assert torch.equal(ids, hf["greedy"]), f"greedy ids differ:\n{ids}\n{hf['greedy']}"


def test_titan_cp_export_gives_transformers_the_same_logits(hf, tmp_path):
    with torch.no_grad():
        _close(hf["ours"](hf["tokens"]), hf["exported_logits"], "titan_cp -> transformers folder")
    from titan_cp.models.gdn.hf_folder import write_hf_config  # what complete_hf_save writes after training

    write_hf_config(hf["ours"].config, tmp_path)
    assert (tmp_path / "config.json").read_text() == (hf["folder"].parent / "exported" / "config.json").read_text()
    assert '"model_type": "mamba2"' in (tmp_path / "config.json").read_text()


def test_toml_takes_the_shape_from_a_transformers_config(hf, tmp_path):
    from titan_cp.train.toml_config import config_from_args

    toml = tmp_path / "m.toml"
    toml.write_text(f'[model]\nname = "mamba2"\nhf_config = "{hf["folder"]}"\n[training]\nseq_len = 64\n')
    config = config_from_args(["--job.config_file", str(toml)], world_size=1, check_runtime=False)
    model = config.model_spec.model
    assert (model.dim, model.vocab_size, model.ssm_n_groups, model.tie_embeddings) == (16, VOCAB, 2, True)
    assert model.hf_config()["model_type"] == "mamba2"


def test_unsupported_options_are_refused_naming_the_field():
    base = hf_config_from_model(model_config("mamba2_debug"))
    assert model_config("mamba2_debug", **model_fields_from_hf(base)) == model_config("mamba2_debug")
    for key, value in (("use_conv_bias", False), ("use_bias", True), ("hidden_act", "gelu"),
                       ("time_step_limit", [0.0, 0.1]), ("expand", 3)):
        with pytest.raises(ConfigError, match=key):
            model_fields_from_hf({**base, key: value})
    with pytest.raises(ConfigError, match="model.layer_pattern"):
        hf_config_from_model(model_config("mamba2_debug_hybrid"))
    from titan_cp.models.gdn.flavors import model_config as gdn_model_config
    from titan_cp.models.gdn.hf_config import hf_config_from_model as fla_hf_config

    with pytest.raises(ConfigError, match="model.layer_pattern = 'GM' has Mamba-2"):  # not written as FLA's GDN
        fla_hf_config(gdn_model_config("debug", layer_pattern="GM"))
    from titan_cp.models.common.preflight import validate
    from titan_cp.models.mamba2.config_registry import config_for_flavor

    job = config_for_flavor("mamba2_debug")  # 4 heads: TP 2 runs, TP 3 does not divide them
    job.parallelism.tensor_parallel_degree = 2
    validate(job, world_size=2, check_runtime=False)
    job.parallelism.tensor_parallel_degree = 3
    with pytest.raises(ConfigError, match="model.num_heads = 4 is not divisible by parallelism.tensor_parallel_deg"):
        validate(job, world_size=3, check_runtime=False)


def _hybrid_config(num_heads=4, n_groups=2):
    return model_config("mamba2_debug", layer_pattern="MA", dim=16, vocab_size=VOCAB,
                        **{**SHAPE, "num_heads": num_heads, "ssm_n_groups": n_groups},
                        attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=4)


def _train_errors(rank, P, layout, exchange, *, num_heads=4, n_groups=2, **kw):
    """The 'MA' hybrid under CP over P ranks (or TP, ``tp``) vs one rank: loss, every gradient per step, params
    after."""
    return one_rank_errors(_hybrid_config(num_heads, n_groups), rank, P, layout, exchange, vocab_size=VOCAB, **kw)


def _bytes_per_layer(rank, P, lengths):
    """Bytes one Mamba-2 layer sends / receives (forward + backward) by kind, per sequence length L."""
    out = {}
    for L in lengths:
        layer = Mamba2Mixer(dim=16, num_heads=4, head_dim=8, state_size=8, n_groups=2, conv_size=4, norm_eps=1e-5,
                            kernel="torch")
        layer.init_weights(0.02)
        layer.cp = CPContext(group=dist.group.WORLD, layout="contiguous", exchange="allgather")
        x = rank_segments(torch.randn(1, L, 16), 1, rank, P, "contiguous").requires_grad_()
        comm_stats.reset()
        layer(x, SequenceInfo()).sum().backward()
        out[L] = {kind: (r.bytes_sent, r.bytes_received) for (_, kind), r in comm_stats.records.items()}
    return out


def _cp_rank(rank, P, folder, tokens, hf_logits):
    errs = {}
    for layout, exchange in CASES:  # (a) the transformers checkpoint under CP 2
        model = load_hf_folder(folder)
        apply_cp(model, CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange))
        with torch.no_grad():
            logits = model(rank_segments(tokens, 1, rank, P, layout))
        ref = rank_segments(hf_logits, 1, rank, P, layout)
        errs[f"hf {layout}/{exchange}"] = (logits - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
    for layout, exchange in CASES:  # (b) an 'MA' hybrid trained 2 steps, packed documents
        errs.update({f"{layout}/{exchange} {k}": v for k, v in _train_errors(rank, P, layout, exchange).items()})
    return errs, _bytes_per_layer(rank, P, lengths=(64, 1024))


def test_cp2_matches_transformers_and_one_rank(hf):
    results = run_on_ranks(_cp_rank, 2, args=(str(hf["folder"]), hf["tokens"], hf["logits"]), timeout=400)
    for rank, (_, per_length) in enumerate(results):  # exchange bytes per layer: constant in L
        print(f"rank {rank} Mamba-2 layer bytes (sent, received) by kind:", per_length)
        assert per_length[64] == per_length[1024]
        # the forward summary: one decay scalar per head + the N x P local state, float32, B = 1
        assert per_length[64]["state_fwd"][1] == 4 * (1 + 8 * 8) * 4
    worst = worst_over_ranks(errs for errs, _ in results)
    names = [name for name, _ in _hybrid_config().build().named_parameters()]
    assert not any("feed_forward" in n for n in names)
    assert_compared_within(worst, CASES, ("grad0", "grad1", "param"), names, ("hf", "loss", "grad", "param"), 1e-5,
                           "CP 2")


def _fp64_rank(rank, P):
    errs = {}
    for layout, exchange in FP64_CASES:  # P Mamba-2 heads (alltoall moves whole heads), L = 24
        case = _train_errors(rank, P, layout, exchange, dtype=torch.float64, num_heads=2 * P, L=24)
        errs.update({f"{layout}/{exchange} {k}": v for k, v in case.items()})
    return errs


def test_cp3_float64_equals_one_rank():
    """Float64, packed documents on / around the segment boundaries, every exchange x layout: 1e-10."""
    worst = worst_over_ranks(run_on_ranks(_fp64_rank, 3, timeout=300))
    names = [name for name, _ in _hybrid_config(6).build().named_parameters()]
    assert_compared_within(worst, FP64_CASES, ("grad0", "grad1", "param"), names, ("loss", "grad", "param"), 1e-10,
                           "CP 3 float64")


def _check_tp(model):
    """The head-parallel layout of titan_cp/models/gdn/mamba2_layer.py on the 2 TP ranks (4 heads of 8 channels)."""
    mixer = model.layers["0"].attention
    for p in (mixer.in_proj.weight, mixer.conv1d.weight, mixer.conv1d.bias):
        assert isinstance(p, DTensor) and p.placements == (Replicate(),)
    for p, local in ((mixer.A_log, 2), (mixer.dt_bias, 2), (mixer.D, 2), (mixer.norm.weight, 16)):
        assert p.placements == (Shard(0),) and p.to_local().shape == (local,)
    assert mixer.out_proj.weight.placements == (Shard(1),)
    weights = mixer.local_weights()  # 2 heads, 1 group (G = 2: its own; G = 1: the one both ranks read)
    assert (weights.num_heads, weights.n_groups) == (2, 1)
    assert weights.in_proj_weight.shape[0] == 2 * 16 + 2 * 8 + 2 and weights.conv_weight.shape[0] == 16 + 2 * 8


def _tp_rank(rank, P):
    """4 ranks: TP 2 x CP 2 ('cp', 'tp' mesh) for every fp32 case, TP 2 alone (2 rows of 2) with B / C in 2 groups
    and in 1 (and 3 groups of 2 heads over 6 heads: a rank's 3 heads straddle two), TP 2 x CP 2 in float64 with 1 group, and CP 4 in float64 for every case (8 heads: alltoall moves
    whole heads, L = 32: 8 zigzag segments of 4 tokens, at least the conv's W - 1 = 3)."""
    tp_cp, tp, fp64 = {}, {}, {}
    for layout, exchange in CASES:
        case = _train_errors(rank, P, layout, exchange, tp=2, check_tp=_check_tp)
        tp_cp.update({f"{layout}/{exchange} {k}": v for k, v in case.items()})
    for n_groups in (2, 1):
        case = _train_errors(rank, P, "tp", None, tp=2, n_groups=n_groups, check_tp=_check_tp)
        tp.update({f"tp/G{n_groups} {k}": v for k, v in case.items()})
    case = _train_errors(rank, P, "tp", None, tp=2, num_heads=6, n_groups=3)  # rank 0's heads 0-2 straddle 2 groups
    tp.update({f"tp/G3 {k}": v for k, v in case.items()})
    # float64 (A_log's fp32 gradient is ~1e-9 with cancellation: one rank's fp32 is itself ~1e-5 off float64)
    case = _train_errors(rank, P, "zigzag", "allgather", tp=2, n_groups=1, dtype=torch.float64, check_tp=_check_tp)
    fp64.update({f"tp x cp/G1 {k}": v for k, v in case.items()})
    for layout, exchange in FP64_CASES:
        case = _train_errors(rank, P, layout, exchange, dtype=torch.float64, num_heads=2 * P, L=32)
        fp64.update({f"{layout}/{exchange} {k}": v for k, v in case.items()})
    return tp_cp, tp, fp64


def test_tp2_cp2_tp2_and_cp4_float64_equal_one_rank():
    results = run_on_ranks(_tp_rank, 4, timeout=600)
    tp_cp, tp, fp64 = (worst_over_ranks(r[i] for r in results) for i in range(3))
    names = [name for name, _ in _hybrid_config().build().named_parameters()]
    assert_compared_within(tp_cp, CASES, ("grad0", "grad1", "param"), names, ("loss", "grad", "param"), 1e-5,
                           "TP 2 x CP 2")
    assert_compared_within(tp, [("tp", "G2"), ("tp", "G1"), ("tp", "G3")], ("grad0", "grad1", "param"), names,
                           ("loss", "grad", "param"), 1e-5, "TP 2")
    assert_compared_within(fp64, [*FP64_CASES, ("tp x cp", "G1")], ("grad0", "grad1", "param"), names,
                           ("loss", "grad", "param"), 1e-10, "CP 4 and TP 2 x CP 2 float64")
