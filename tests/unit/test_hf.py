"""FLA Hugging Face checkpoints in and out (titan_cp.hf, titan_cp.cli.convert).

(a) DCP -> HF -> DCP through the converter CLI is bit-exact (GDN, hybrid, tied
    embeddings) and config.json gives back the same model shape.
(b) The HF export of the debug and the debug_hybrid flavor loads into FLA
    0.6.0's own ``GatedDeltaNetForCausalLM`` (its Triton kernels under the Triton
    interpreter, tests/support/fla_reference.py) with the same logits in fp32, for a
    sequence longer than FLA's 64-token chunk.
(c) FLA options titan_cp cannot run are refused with the field named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titan_cp.cli.convert import main as convert_main
from titan_cp.errors import ConfigError
from titan_cp.cli.trained_model import load_checkpoint
from titan_cp.models.gdn.hf_folder import load_model, save_dcp, save_hf
from titan_cp.models.gdn.hf_config import hf_config_from_model, model_config_from_hf, same_shape
from titan_cp.models.gdn import GDNModel, model_config

REPO = Path(__file__).resolve().parents[2]
from tests.support.fla_reference import skip_reason  # noqa: E402

CASES = {"debug": ("debug", {}), "debug_hybrid": ("debug_hybrid", {}), "tied": ("debug", {"tie_embeddings": True})}


def _model(flavor: str, seed: int = 0, **overrides) -> GDNModel:
    torch.manual_seed(seed)
    model = GDNModel(model_config(flavor, **overrides))
    model.init_states()
    with torch.no_grad():  # non-trivial norms (init_states sets them to 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _toml(tmp_path, model_section: str):
    path = tmp_path / "train.toml"
    path.write_text(f"[model]\n{model_section}\n")
    return path


def _fla_env() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    return env


def run_fla(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.support.fla_reference", *args], env=_fla_env(),
                          capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert proc.returncode == 0, f"FLA reference failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_dcp_to_hf_to_dcp_is_bit_exact(case, tmp_path):
    flavor, overrides = CASES[case]
    model = _model(flavor, **overrides)
    save_dcp(model, tmp_path / "run" / "checkpoint" / "step-3")
    argv = ["to-hf", "--checkpoint", str(tmp_path / "run" / "checkpoint"), "--out", str(tmp_path / "hf")]
    if overrides:  # a training config with the override, as a user would have it
        toml = tmp_path / "train.toml"
        toml.write_text(f'[model]\nflavor = "{flavor}"\ntie_embeddings = true\n')
        argv += ["--config_file", str(toml)]
    else:
        argv += ["--flavor", flavor]
    assert convert_main(argv) == 0
    assert convert_main(["to-dcp", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "dcp")]) == 0

    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["model_type"] == "gated_deltanet" and hf_config["intermediate_size"] == model.config.hidden_dim
    assert same_shape(model_config_from_hf(hf_config), model.config)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    shape = {"config_file": tmp_path / "train.toml"} if overrides else {"flavor": flavor}
    back, _ = load_checkpoint(tmp_path / "dcp", **shape)
    original, loaded = model.state_dict(), back.state_dict()
    assert list(original) == list(loaded)
    for name in original:
        assert torch.equal(original[name], loaded[name]), name
    if overrides:
        assert back.lm_head.weight is back.tok_embeddings.weight


@pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
def test_hf_export_loads_into_fla_with_the_same_logits(tmp_path):
    flavors = ["debug", "debug_hybrid"]
    models = {flavor: _model(flavor, seed=1) for flavor in flavors}
    tokens = torch.randint(0, 2048, (1, 70), generator=torch.Generator().manual_seed(0))  # > one 64-token chunk
    torch.save(tokens, tmp_path / "tokens.pt")
    args = []
    for flavor, model in models.items():
        save_hf(model.state_dict(), model.config, tmp_path / flavor)
        args += [str(tmp_path / flavor), str(tmp_path / "tokens.pt"), str(tmp_path / f"{flavor}.pt")]
    run_fla("logits", *args)
    for flavor, model in models.items():
        fla_logits = torch.load(tmp_path / f"{flavor}.pt")
        with torch.no_grad():
            ours = model(tokens)
        err = (fla_logits - ours).abs().max().item()
        scale = ours.abs().max().item()
        print(f"{flavor}: max |FLA - titan_cp| = {err:.2e} at logits up to {scale:.1f}")
        # fp32 on both sides; FLA's chunk kernels and fused norms sum in another order (~1e-6 relative)
        assert err <= 1e-5 * max(scale, 1.0), f"{flavor}: logits differ by {err:.2e} (max logit {scale:.1f})"


def test_unsupported_fla_options_are_refused():
    hf = hf_config_from_model(model_config("debug"))
    for key, value in (("allow_neg_eigval", True), ("use_short_conv", False), ("use_gate", False)):
        with pytest.raises(ConfigError, match=f"model.hf_config: {key} = {value!r}"):
            model_config_from_hf({**hf, key: value})
    with pytest.raises(ConfigError, match="model_type"):
        model_config_from_hf({**hf, "model_type": "llama"})
    hybrid = hf_config_from_model(model_config("debug_hybrid"))
    with pytest.raises(ConfigError, match="attn.window_size"):
        model_config_from_hf({**hybrid, "attn": {**hybrid["attn"], "window_size": 16}})
    with pytest.raises(ConfigError, match="head_dim = hidden_size / num_heads"):
        hf_config_from_model(model_config("debug_hybrid", attn_head_dim=8))


def test_model_shape_from_hf_config_in_toml_and_config_function(tmp_path):
    from titan_cp.models.gdn.config_registry import gdn_from_hf
    from titan_cp.train.toml_config import config_from_args

    shape = model_config("debug_hybrid", dim=96, num_heads=3, num_v_heads=6, hidden_dim=160, attn_num_heads=6,
                         attn_num_kv_heads=3, layer_pattern="GA", n_layers=4, vocab_size=1024)
    hf = hf_config_from_model(shape)
    del hf["intermediate_size"]  # as some hub configs: FLA's rule from hidden_ratio (4) applies
    (tmp_path / "config.json").write_text(json.dumps(hf))
    expected = model_config("debug_hybrid", dim=96, num_heads=3, num_v_heads=6, hidden_dim=256, attn_num_heads=6,
                            attn_num_kv_heads=3, layer_pattern="GA", n_layers=4, vocab_size=1024)
    from_toml = config_from_args(["--model.hf_config", str(tmp_path / "config.json"), "--model.kernel", "recurrent"],
                                 world_size=1).model_spec.model
    from_function = gdn_from_hf(str(tmp_path / "config.json")).model_spec.model
    for got in (from_toml, from_function):
        assert same_shape(got, expected), got
    assert from_toml.kernel == "recurrent" and from_toml.layer_types() == ["G", "A", "G", "A"]
    with pytest.raises(ConfigError, match=r"model.hf_config.*no config.json"):
        config_from_args(["--model.hf_config", str(tmp_path / "missing")], world_size=1)


def test_dcp_checkpoint_with_another_shape_is_refused(tmp_path):
    save_dcp(_model("debug_hybrid"), tmp_path / "step-1")
    with pytest.raises(ConfigError, match="not the one that was trained"):  # layer 3 is attention there
        load_model(tmp_path / "step-1", flavor="debug", **{})
    save_dcp(_model("debug"), tmp_path / "step-2")
    with pytest.raises(ConfigError, match=r"layers.0.attention.q_proj.weight is \(64, 64\) there but \(32, 64\)"):
        load_checkpoint(tmp_path / "step-2", config_file=_toml(tmp_path, 'flavor = "debug"\nhead_dim = 8'))
    with pytest.raises(ConfigError, match="pass the training config"):
        load_model(tmp_path / "step-2")
