"""model.layer_pattern: which layers are Gated DeltaNet ('G') and which softmax attention ('A')."""

from __future__ import annotations

import pytest
import torch

from titan_cp.models.gdn import GatedDeltaNet, model_config
from titan_cp.models.gdn.attention import Attention


@pytest.mark.parametrize("pattern", ["GGXA", "gga", "G A"])
def test_bad_layer_pattern_is_rejected_naming_the_field(pattern):
    cfg = model_config("debug", layer_pattern=pattern)
    with pytest.raises(ValueError, match="model.layer_pattern"):
        cfg.layer_types()
    with pytest.raises(ValueError, match="model.layer_pattern"), torch.device("meta"):
        cfg.build()


def test_pattern_cycles_over_layers():
    cfg = model_config("debug_hybrid", n_layers=8)
    assert cfg.layer_types() == list("GGGAGGGA")
    with torch.device("meta"):
        model = cfg.build()
    attention = [i for i, block in enumerate(model.layers.values()) if isinstance(block.attention, Attention)]
    assert attention == [3, 7]
    assert all(isinstance(model.layers[str(i)].attention, GatedDeltaNet) for i in range(8) if i not in attention)
    assert model.layers["7"].attention.layer_name == "layers.7.attention"


def test_empty_pattern_is_all_gdn():
    assert model_config("debug", n_layers=3).layer_types() == ["G", "G", "G"]
