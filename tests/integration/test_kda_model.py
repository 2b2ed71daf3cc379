"""The KDA family as a whole model: FLA's ``KDAForCausalLM`` checkpoints in and out, CP 2, generation.

One FLA subprocess (its Triton kernels under the interpreter, tests/support/fla_reference.py's
setup) builds a tiny random hybrid ``KDAForCausalLM`` (layers K, A), ``save_pretrained``s it,
and records its logits and its greedy ids (each step a full forward: an independent
reference for titan_cp's O(1)-per-token decode); it also runs FLA on a folder titan_cp
wrote. One 2-rank launch then checks (a) the FLA folder's logits under CP 2 for every
exchange x layout, (b) a hybrid 'KA' model with packed documents: loss, every gradient
and the parameters after 2 SGD steps equal one rank (fp32 1e-5), (c) the same model under TP 2
(the KDA TP plan) equal one rank; and one KDA layer's exchange bytes do not depend on L.
A 3-rank and a 4-rank launch run (b) in float64 (one step) for every exchange x layout
(alltoall with P heads): equal one rank to 1e-10.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from titan_cp.cp.comm import comm_stats
from titan_cp.cp.context import CPContext
from titan_cp.cp.layout import rank_segments
from titan_cp.models.common.parallelize import apply_cp
from titan_cp.models.common.sequence import SequenceInfo
from titan_cp.models.gdn.layers import KimiDeltaAttention
from titan_cp.models.gdn.decode import generate
from titan_cp.models.gdn.hf_folder import load_model, save_hf
from titan_cp.models.kda.flavors import model_config
from titan_cp.testing import run_on_ranks
from tests.support.fla_reference import skip_reason
from tests.support.linear_lm import CASES, FP64_CASES, assert_compared_within, one_rank_errors, worst_over_ranks

REPO = Path(__file__).resolve().parents[2]
T, PROMPT, NEW = 24, 6, 6
pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def _fla_main(folder: str, exported: str, out: str) -> None:
    """(In the FLA subprocess) random KDAForCausalLM -> ``folder``; its logits / greedy ids; FLA on ``exported``."""
    from fla.models import KDAConfig, KDAForCausalLM

    torch.manual_seed(0)
    config = KDAConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=2.0, vocab_size=97,
                       intermediate_size=64, conv_size=4, norm_eps=1e-6, fuse_cross_entropy=False,
                       attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "qkv_bias": False,
                             "window_size": None, "rope_theta": 10000.0})
    model = KDAForCausalLM(config).float().eval()
    with torch.no_grad():  # non-trivial norms and gate bias
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("g_proj.1.bias"):
                p.normal_()
            elif "proj" in name and p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    tokens = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids = tokens[:, :PROMPT]
        for _ in range(NEW):  # greedy, each step a full forward
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        theirs = KDAForCausalLM.from_pretrained(exported, fuse_cross_entropy=False, torch_dtype=torch.float32)
        torch.save({"tokens": tokens, "logits": model(input_ids=tokens).logits.float(), "greedy": ids,
                    "exported_logits": theirs.eval()(input_ids=tokens).logits.float()}, out)


@pytest.fixture(scope="module")
def fla(tmp_path_factory):
    """FLA's folder, tokens, logits, greedy ids; a titan_cp 'KA' model exported to an FLA folder and FLA's
    logits of it."""
    tmp = tmp_path_factory.mktemp("kda")
    torch.manual_seed(3)
    ours = model_config("kda_debug", layer_pattern="KA", dim=32, hidden_dim=64, vocab_size=97, num_heads=2,
                        head_dim=8, expand_v=2.0, attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=8).build()
    ours.init_states()
    save_hf(ours.state_dict(), ours.config, tmp / "exported")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run([sys.executable, "-m", "tests.integration.test_kda_model", str(tmp / "fla"),
                           str(tmp / "exported"), str(tmp / "ref.pt")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO, check=False)
    assert proc.returncode == 0, f"FLA reference failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {"folder": tmp / "fla", "ours": ours.eval(), **torch.load(tmp / "ref.pt")}


def _close(ours, theirs, what):
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    print(f"{what}: max |titan_cp - FLA| = {err:.2e} at logits up to {scale:.1f}")
    assert err <= 1e-5 * max(scale, 1.0), f"{what}: {err:.2e}"


def test_fla_folder_loads_with_its_logits_and_greedy_ids(fla):
    model, _ = load_model(fla["folder"])
    assert model.config.layer_types() == ["K", "A"]
    with torch.no_grad():
        _close(model(fla["tokens"]), fla["logits"], "FLA folder, one rank")
    ids = generate(model, fla["tokens"][:, :PROMPT], NEW)
    assert torch.equal(ids, fla["greedy"]), f"greedy ids differ:\n{ids}\n{fla['greedy']}"


def test_titan_cp_export_gives_fla_the_same_logits(fla):
    with torch.no_grad():
        _close(fla["ours"](fla["tokens"]), fla["exported_logits"], "titan_cp -> FLA folder")


def _cp_rank(rank, P, folder, tokens, fla_logits):
    errs = {}
    for layout, exchange in CASES:  # (a) the FLA checkpoint under CP 2
        model, _ = load_model(folder)
        apply_cp(model, CPContext(group=dist.group.WORLD, layout=layout, exchange=exchange))
        with torch.no_grad():
            logits = model(rank_segments(tokens, 1, rank, P, layout))
        ref = rank_segments(fla_logits, 1, rank, P, layout)
        errs[f"fla {layout}/{exchange}"] = (logits - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)
    for layout, exchange in CASES:  # (b) a 'KA' hybrid trained 2 steps, packed documents
        errs.update({f"{layout}/{exchange} {k}": v for k, v in _train_errors(rank, P, layout, exchange).items()})
    errs.update({f"tp/None {k}": v for k, v in _train_errors(rank, P, "tp", None).items()})  # (c) TP 2
    return errs, _bytes_per_layer(rank, P, lengths=(64, 1024))


def _bytes_per_layer(rank, P, lengths):
    """Bytes one KDA layer sends / receives (forward + backward) by kind, per sequence length L."""
    out = {}
    for L in lengths:
        layer = KimiDeltaAttention(dim=32, num_heads=2, head_dim=8, expand_v=2.0, num_v_heads=None, conv_size=4,
                                   norm_eps=1e-6, kernel="torch")
        layer.init_weights(0.02)
        layer.cp = CPContext(group=dist.group.WORLD, layout="contiguous", exchange="allgather")
        x = rank_segments(torch.randn(1, L, 32), 1, rank, P, "contiguous").requires_grad_()
        comm_stats.reset()
        layer(x, SequenceInfo()).sum().backward()
        out[L] = {kind: (r.bytes_sent, r.bytes_received) for (_, kind), r in comm_stats.records.items()}
    return out


def _hybrid_config(num_heads=2):
    return model_config("kda_debug", layer_pattern="KA", dim=32, hidden_dim=64, vocab_size=97, num_heads=num_heads,
                        head_dim=8, attn_num_heads=4, attn_num_kv_heads=2, attn_head_dim=8)


def _check_tp(model):
    kda_layer = model.layers["0"].attention
    assert all(w.placements[0].is_shard() for w in (kda_layer.f_proj[1].weight, kda_layer.dt_bias))


def _train_errors(rank, P, layout, exchange, *, num_heads=2, **kw):
    return one_rank_errors(_hybrid_config(num_heads), rank, P, layout, exchange, vocab_size=97,
                           check_tp=_check_tp, **kw)


def test_cp2_matches_fla_and_one_rank(fla):
    results = run_on_ranks(_cp_rank, 2, args=(str(fla["folder"]), fla["tokens"], fla["logits"]), timeout=400)
    for rank, (_, per_length) in enumerate(results):  # exchange bytes per layer: constant in L
        print(f"rank {rank} KDA layer bytes (sent, received) by kind:", per_length)
        assert per_length[64] == per_length[1024] and per_length[64]["state_fwd"][1] > 0
    worst = worst_over_ranks(errs for errs, _ in results)
    names = [name for name, _ in _hybrid_config().build().named_parameters()]
    assert_compared_within(worst, [*CASES, ("tp", None)], ("grad1", "param"), names, ("fla", "loss", "grad", "param"),
                           1e-5, "CP 2 / TP 2")


TP_CP_CASES = [("zigzag", "allgather"), ("contiguous", "logscan")]


def _fp64_rank(rank, P):
    """The 'KA' hybrid in float64 with P KDA heads, L = 24 (whole zigzag segments for P = 3, 4), every case,
    one step; on 4 ranks also TP 2 x CP 2 (a ('cp', 'tp') mesh: heads over 'tp', the sequence over 'cp')."""
    errs = {}
    for layout, exchange in FP64_CASES:
        case = _train_errors(rank, P, layout, exchange, dtype=torch.float64, num_heads=P, L=24, steps=1)
        errs.update({f"{layout}/{exchange} {k}": v for k, v in case.items()})
    if P == 4:
        for layout, exchange in TP_CP_CASES:
            case = _train_errors(rank, P, layout, exchange, dtype=torch.float64, num_heads=P, L=24, steps=1, tp=2)
            errs.update({f"tp x cp {layout}/{exchange} {k}": v for k, v in case.items()})
    return errs


@pytest.mark.parametrize("P", [3, 4])
def test_cp3_cp4_float64_equal_one_rank(P):
    """Float64, packed documents on / around the segment boundaries: loss, every gradient and the parameters
    after one SGD step equal one rank to 1e-10 for every exchange x layout (2 steps: the fp32 CP 2 launch);
    the 4-rank launch also runs TP 2 x CP 2."""
    worst = worst_over_ranks(run_on_ranks(_fp64_rank, P, timeout=300))
    names = [name for name, _ in _hybrid_config(P).build().named_parameters()]
    cases = FP64_CASES + ([(f"tp x cp {layout}", exchange) for layout, exchange in TP_CP_CASES] if P == 4 else [])
    assert_compared_within(worst, cases, ("grad0", "param"), names, ("loss", "grad", "param"), 1e-10,
                           f"CP {P} (and TP 2 x CP 2) float64")


if __name__ == "__main__":
    from tests.support.fla_reference import setup_fla

    setup_fla()
    _fla_main(*sys.argv[1:])
