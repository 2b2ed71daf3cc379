"""The 'K' layers of the GDN LM on one process: O(1)-per-token decoding and FLA kda config.json round trip.

(FLA's own KDAForCausalLM, CP and training: tests/integration/test_kda_model.py.)
"""

from __future__ import annotations

import pytest
import torch

from titan_cp.errors import ConfigError
from titan_cp.models.gdn.decode import DecodeCache, forward_cached
from titan_cp.models.gdn.hf_config import hf_config_from_model, model_config_from_hf, same_shape
from titan_cp.models.kda.flavors import model_config
from titan_cp.testing import rel_err


def test_cached_decoding_equals_the_full_forward():
    model = model_config("kda_debug", layer_pattern="KA", num_v_heads=8).build()  # grouped value heads too
    model.init_states()
    model.eval()
    tokens = torch.randint(0, 2048, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
    cache = DecodeCache.empty(model)
    steps = [forward_cached(model, tokens[:, :17], cache)]  # a prompt over one 16-token chunk, then steps
    steps += [forward_cached(model, tokens[:, t:t + 1], cache) for t in range(17, 21)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


@pytest.mark.parametrize("pattern", ["K", "KKA"])
def test_fla_kda_config_round_trip(pattern):
    config = model_config("kda_debug", layer_pattern=pattern, n_layers=3, attn_num_heads=4, attn_head_dim=16)
    hf = hf_config_from_model(config)
    assert hf["model_type"] == "kda" and hf["architectures"] == ["KDAForCausalLM"]
    assert same_shape(model_config_from_hf(hf), config)


def test_mixed_gdn_and_kda_layers_have_no_fla_format():
    with pytest.raises(ConfigError, match="model.layer_pattern = 'GK'"):
        hf_config_from_model(model_config("kda_debug", layer_pattern="GK"))
    with pytest.raises(ConfigError, match="lower_bound"):
        model_config_from_hf({**hf_config_from_model(model_config("kda_debug")), "lower_bound": -5.0})
