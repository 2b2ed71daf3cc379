"""``hf_config()`` of Qwen3.5 configs: transformers' dense or MoE ``config.json``, refusals naming the field.

(transformers loading the exported MoE folder with the same logits: tests/integration/test_qwen3_5_moe_hf.py.)
"""

from __future__ import annotations

import pytest
from transformers import Qwen3_5MoeTextConfig

from titan_cp.errors import ConfigError
from titan_cp.models.qwen3_5.config_registry import model_spec


def test_dense_and_moe_flavors():
    assert model_spec("debugmodel").model.hf_config()["architectures"] == ["Qwen3_5ForCausalLM"]
    fields = model_spec("35B-A3B").model.hf_config()
    assert fields["architectures"] == ["Qwen3_5MoeForCausalLM"] and fields["model_type"] == "qwen3_5_moe_text"
    config = Qwen3_5MoeTextConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
    # the released Qwen3.5-35B-A3B text config
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.shared_expert_intermediate_size, config.num_hidden_layers) == (256, 8, 512, 512, 40)


def test_routing_transformers_cannot_express_is_refused():
    config = model_spec("debugmodel_moe").model
    config.layers[1].moe.router.score_func = "sigmoid"
    with pytest.raises(ConfigError, match=r"model\.layers\[1\]\.moe\.router\.score_func = 'sigmoid'.*'softmax'"):
        config.hf_config()
    config = model_spec("debugmodel_moe").model
    config.layers[2].moe.router.top_k = 3
    with pytest.raises(ConfigError, match=r"model\.layers\[2\]\.moe .*same MoE config"):
        config.hf_config()
