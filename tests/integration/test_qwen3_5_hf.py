"""Round trips with transformers' independent Qwen3.5 (pure-PyTorch path), at CP 1 and CP 2.

1. titan_cp-initialised weights -> TorchTitan's HF adapter -> safetensors ->
   ``Qwen3_5ForCausalLM.from_pretrained``: the same logits as titan_cp at CP 1
   and CP 2 (the CP 2 ranks read the weights back through the adapter).
2. A checkpoint written by transformers (``save_pretrained`` of a tiny random
   ``Qwen3_5ForCausalLM``, text-only key names) loaded the way TorchTitan's
   checkpointer does (``to_hf`` -> ``dcp.load`` with the adapter's HF reader ->
   ``from_hf``) trains under CP 2: the first-step loss equals transformers'
   loss on the same batch, and after one identical AdamW step on both sides
   the second-step loss agrees too.

Tolerance (fp32, relative to the largest value): 2e-5. The two
implementations share no code: transformers runs the delta rule in 64-token
chunks with a sequential in-chunk solve and eager softmax; titan_cp runs its
own WY/UT chunk kernel (and, at CP 2, the state exchange and ring attention).
Measured differences are ~1e-7 of the logits' scale (fp32 rounding through 4
layers); a wrong head grouping, RoPE convention or norm offset is O(1).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan_cp.testing import rel_err, run_on_ranks
from tests.support.qwen35_common import hf_causal_lm_class, hf_config_of_tiny, tiny_config, tiny_model

TOL = 2e-5
LR = 1e-2


def _batch():
    torch.manual_seed(3)
    return torch.randint(0, 96, (2, 25))  # inputs [:, :-1] (24 tokens), labels [:, 1:]


def _save_titan_cp_as_hf(model, path) -> None:
    from safetensors.torch import save_file

    from titan_cp.models.qwen3_5.state_dict_adapter import Qwen35CPStateDictAdapter

    hf_state = Qwen35CPStateDictAdapter(model.config, None).to_hf(model.state_dict())
    save_file({k: v.detach().contiguous() for k, v in hf_state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    hf_config_of_tiny().save_pretrained(path)


def _load_hf_into(model, path) -> None:
    """TorchTitan's checkpointer's HF load (components/checkpointer/dcp.py: dcp_load with from_hf)."""
    import torch.distributed.checkpoint as dcp

    from titan_cp.models.qwen3_5.state_dict_adapter import Qwen35CPStateDictAdapter

    adapter = Qwen35CPStateDictAdapter(model.config, str(path))
    hf_state = adapter.to_hf(model.state_dict())
    dcp.load(hf_state, storage_reader=adapter.get_hf_storage_reader(str(path)))
    missing, unexpected = model.load_state_dict(adapter.from_hf(hf_state), strict=True)
    assert not missing and not unexpected


def _cp2(rank: int, world: int, titan_dir, hf_dir) -> dict:
    from titan_cp.cp.context import CPContext
    from titan_cp.cp.layout import rank_segments
    from titan_cp.models.common.parallelize import apply_cp

    tokens = _batch()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    shard = lambda t: rank_segments(t, 1, rank, world, "zigzag")  # noqa: E731
    out = {}

    model = tiny_config(cp_layout="zigzag").build()
    _load_hf_into(model, titan_dir)
    apply_cp(model, CPContext(group=dist.group.WORLD, layout="zigzag"))
    with torch.no_grad():
        out["logits"] = model(shard(inputs))

    model = tiny_config(cp_layout="zigzag").build()
    _load_hf_into(model, hf_dir)
    apply_cp(model, CPContext(group=dist.group.WORLD, layout="zigzag"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for _ in range(2):
        loss_sum = F.cross_entropy(model(shard(inputs)).flatten(0, 1), shard(labels).flatten(), reduction="sum")
        optimizer.zero_grad()
        (loss_sum / labels.numel()).backward()
        for p in model.parameters():  # what FSDP's reduce-scatter does over the CP ranks
            dist.all_reduce(p.grad)
        optimizer.step()
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        losses.append(total / labels.numel())
    out["losses"] = torch.stack(losses)
    return out


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    from titan_cp.cp.layout import reassemble

    titan_dir, hf_dir = tmp_path_factory.mktemp("titan_cp_hf"), tmp_path_factory.mktemp("transformers_hf")
    tokens = _batch()
    inputs = tokens[:, :-1]

    model = tiny_model(fla_decay=False)  # TorchTitan's own init (HF's too)
    _save_titan_cp_as_hf(model, titan_dir)
    hf_cls = hf_causal_lm_class()
    hf_model, info = hf_cls.from_pretrained(titan_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert hf_model.model.layers[0].linear_attn.chunk_gated_delta_rule.__name__ == "torch_chunk_gated_delta_rule"
    with torch.no_grad():
        hf_logits, titan_logits = hf_model(inputs).logits, model(inputs)

    torch.manual_seed(4)
    hf_trained = hf_cls(hf_config_of_tiny())
    hf_trained.save_pretrained(hf_dir)
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "qwen3_5_text"
    optimizer = torch.optim.AdamW(hf_trained.parameters(), lr=LR, weight_decay=0.0)
    hf_losses = []
    for _ in range(2):
        loss = hf_trained(input_ids=tokens, labels=tokens).loss  # transformers shifts labels itself
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hf_losses.append(loss.detach())

    ranks = run_on_ranks(_cp2, 2, args=(titan_dir, hf_dir), timeout=600, pg_timeout=300)
    cp2_logits = reassemble([r["logits"] for r in ranks], 1, "zigzag")
    return {"hf_logits": hf_logits, "cp1_logits": titan_logits, "cp2_logits": cp2_logits,
            "hf_losses": torch.stack(hf_losses), "cp2_losses": [r["losses"] for r in ranks]}


def test_titan_cp_weights_give_transformers_logits_at_cp1_and_cp2(round_trip):
    assert rel_err(round_trip["cp1_logits"], round_trip["hf_logits"]) < TOL
    assert rel_err(round_trip["cp2_logits"], round_trip["hf_logits"]) < TOL


def test_transformers_checkpoint_trains_under_cp2_with_transformers_losses(round_trip):
    hf_losses = round_trip["hf_losses"]
    assert hf_losses[1] < hf_losses[0]  # the step did something
    for losses in round_trip["cp2_losses"]:
        assert rel_err(losses[0], hf_losses[0]) < TOL
        assert rel_err(losses[1], hf_losses[1]) < TOL
