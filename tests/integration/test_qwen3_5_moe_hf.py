"""HF MoE checkpoints in and out: transformers' ``Qwen3_5MoeForCausalLM`` is the independent reference.

TorchTitan's ``debugmodel_moe`` (8 routed experts, top-2, a sigmoid-gated
shared expert; 4 layers, vocab 96), routed experts ``expert_compute =
"exact"`` (fp32), at CP 1 and on 2 gloo ranks CP 2 x EP 2 (4 experts per rank,
weights read per rank through the adapter's DTensor path):

1. titan_cp weights -> ``Qwen35CPStateDictAdapter.to_hf`` -> safetensors, with the
   ``config.json`` of the model config's ``hf_config()`` -> ``AutoConfig`` reads a
   ``Qwen3_5MoeTextConfig`` with the MoE fields of transformers' own config of the shape;
   ``Qwen3_5MoeForCausalLM.from_pretrained`` (no missing / unexpected keys):
   transformers' logits equal titan_cp's at CP 1 and CP 2 x EP 2.
2. ``save_pretrained`` of a tiny random ``Qwen3_5MoeForCausalLM`` (per-expert
   ``mlp.experts.{e}.gate_proj`` ... names) loaded the way TorchTitan's
   checkpointer does: the same logits, the first-step loss equals
   transformers' loss, and after one identical SGD step the second loss too.
   The only model key the checkpoint leaves unfilled is ``moe.expert_bias_E``
   (no HF counterpart; it stays zero, so routing is transformers').

Tolerance 2e-5 of the largest value (fp32, as tests/integration/test_qwen3_5_hf.py):
the two share no code (transformers loops over experts with ``index_add_``, runs
its own chunked delta rule and eager softmax); a swapped gate/up, a transposed
expert or a missing shared-expert gate is O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from titan_cp.testing import rel_err, run_on_ranks
from tests.support.qwen35_common import hf_moe_causal_lm_class, hf_moe_config_of, load_hf_checkpoint

TOL = 2e-5
LR = 0.5
VOCAB = 96


def _config():
    from titan_cp.models.qwen3_5.flavors import torchtitan_config
    from titan_cp.models.qwen3_5.model import titan_cp_config

    return titan_cp_config(torchtitan_config("debugmodel_moe", vocab_size=VOCAB, n_layers=4),
                           cp_layout="zigzag", expert_compute="exact")


def _batch():
    torch.manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, 17))  # inputs [:, :-1] (16 tokens), labels [:, 1:]
    return tokens, torch.arange(16).expand(2, 16)


def _step_losses(model, logits_of, labels, n_labels: int, reduce=lambda t: t):
    """Two SGD steps (no momentum) on sum cross-entropy / n_labels (all ranks'): the first logits, each step's loss."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses, first_logits = [], None
    for _ in range(2):
        logits = logits_of()
        first_logits = logits.detach() if first_logits is None else first_logits
        loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        optimizer.zero_grad()
        (loss_sum / n_labels).backward()
        optimizer.step()
        losses.append(reduce(loss_sum.detach().clone()) / n_labels)
    return first_logits, torch.stack(losses)


def _save_titan_cp_as_hf(model, path) -> None:
    import json

    from safetensors.torch import save_file

    from titan_cp.models.qwen3_5.state_dict_adapter import Qwen35CPStateDictAdapter

    hf_state = Qwen35CPStateDictAdapter(model.config, None).to_hf(model.state_dict())
    hf_state = {k.replace("model.language_model.", "model."): v for k, v in hf_state.items()}  # text-only names
    save_file({k: v.detach().contiguous() for k, v in hf_state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(model.config.hf_config()))  # titan_cp's own export


def _cp2_ep2(rank: int, world: int, titan_dir, hf_dir) -> dict:
    import torch.distributed as dist
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import set_spmd_backend

    from titan_cp.components import compat
    from titan_cp.cp.layout import rank_segments
    from tests.support.qwen35_common import parallel_qwen3_5

    compat.apply()
    set_spmd_backend("partial_dtensor")
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=2, tp=1, pp=1, ep=2, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    shard = lambda t: rank_segments(t, 1, rank, world, "zigzag")  # noqa: E731
    tokens, positions = _batch()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    out = {}

    model = parallel_qwen3_5(_config(), dims)
    out["titan_missing"] = load_hf_checkpoint(model, titan_dir)
    with torch.no_grad():
        out["titan_logits"] = model(shard(inputs), positions=shard(positions))

    model = parallel_qwen3_5(_config(), dims)
    out["hf_missing"] = load_hf_checkpoint(model, hf_dir)

    def reduce(t):
        dist.all_reduce(t)
        return t

    out["hf_logits"], out["losses"] = _step_losses(
        model, lambda: model(shard(inputs), positions=shard(positions)), shard(labels), labels.numel(), reduce)
    return out


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    from titan_cp.cp.layout import reassemble

    titan_dir, hf_dir = tmp_path_factory.mktemp("titan_cp_moe_hf"), tmp_path_factory.mktemp("transformers_moe")
    tokens, positions = _batch()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    hf_cls = hf_moe_causal_lm_class()
    out = {}

    # 1. titan_cp -> HF folder -> transformers
    model = _config().build()
    torch.manual_seed(0)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # TorchTitan zero-inits OffsetRMSNorm: make them count
                p.normal_(0.0, 0.2)
    _save_titan_cp_as_hf(model, titan_dir)
    from transformers import AutoConfig

    exported, expected = AutoConfig.from_pretrained(titan_dir), hf_moe_config_of(_config())
    out["config_json"] = {k: (getattr(exported, k), getattr(expected, k)) for k in (
        "model_type", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
        "shared_expert_intermediate_size", "layer_types", "hidden_size", "linear_num_value_heads")}
    hf_model, info = hf_cls.from_pretrained(titan_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert hf_model.model.layers[0].linear_attn.chunk_gated_delta_rule.__name__ == "torch_chunk_gated_delta_rule"
    with torch.no_grad():
        out["titan_hf_logits"] = hf_model(inputs).logits
        out["titan_cp1_logits"] = model(inputs, positions=positions)

    # 2. transformers' save_pretrained -> titan_cp
    torch.manual_seed(4)
    hf_trained = hf_cls(hf_moe_config_of(_config()))
    with torch.no_grad():  # transformers zero-inits the (1 + w) norms and the router: make them count
        for name, p in hf_trained.named_parameters():
            if name.endswith(("norm.weight", "mlp.gate.weight")):
                p.normal_(0.0, 0.2)
    hf_trained.save_pretrained(hf_dir)
    out["hf_keys"] = list(hf_moe_key_sample(hf_dir))
    out["hf_logits"], out["hf_losses"] = _step_losses(hf_trained, lambda: hf_trained(inputs).logits, labels,
                                                        labels.numel())

    model = _config().build()
    out["cp1_missing"] = load_hf_checkpoint(model, hf_dir)
    out["hf_cp1_logits"], out["cp1_losses"] = _step_losses(model, lambda: model(inputs, positions=positions), labels,
                                                           labels.numel())

    ranks = run_on_ranks(_cp2_ep2, 2, args=(titan_dir, hf_dir), timeout=900, pg_timeout=300)
    out["titan_cp2_logits"] = reassemble([r["titan_logits"] for r in ranks], 1, "zigzag")
    out["hf_cp2_logits"] = reassemble([r["hf_logits"] for r in ranks], 1, "zigzag")
    out["cp2_losses"] = [r["losses"] for r in ranks]
    out["cp2_missing"] = [r["titan_missing"] + r["hf_missing"] for r in ranks]
    return out


def hf_moe_key_sample(path):
    from titan_cp.models.qwen3_5.state_dict_adapter import checkpoint_keys

    return [k for k in checkpoint_keys(str(path)) if ".mlp.experts." in k]


def test_transformers_saves_per_expert_weights(interop):
    keys = interop["hf_keys"]
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys and "model.layers.3.mlp.experts.0.down_proj.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_exported_config_json_is_transformers_moe_config(interop):
    assert interop["config_json"]["model_type"][0] == "qwen3_5_moe_text"
    assert all(got == want for got, want in interop["config_json"].values()), interop["config_json"]


def test_titan_cp_weights_give_transformers_logits_at_cp1_and_cp2_ep2(interop):
    reference = interop["titan_hf_logits"]
    assert rel_err(interop["titan_cp1_logits"], reference) < TOL
    assert rel_err(interop["titan_cp2_logits"], reference) < TOL


def test_transformers_checkpoint_gives_its_logits_at_cp1_and_cp2_ep2(interop):
    reference = interop["hf_logits"]
    assert rel_err(interop["hf_cp1_logits"], reference) < TOL
    assert rel_err(interop["hf_cp2_logits"], reference) < TOL
    only_bias = lambda keys: keys and all(k.endswith("moe.expert_bias_E") for k in keys)  # noqa: E731
    assert only_bias(interop["cp1_missing"]) and all(only_bias(m) for m in interop["cp2_missing"])


def test_transformers_checkpoint_trains_with_transformers_losses(interop):
    hf_losses = interop["hf_losses"]
    assert hf_losses[1] < hf_losses[0]  # the step did something
    for losses in [interop["cp1_losses"], *interop["cp2_losses"]]:
        assert rel_err(losses, hf_losses) < TOL, (losses, hf_losses)
