"""Incremental decoding (titan_cp.models.gdn.decode) equals full recomputation at every step.

For the GDN and the hybrid debug model (fp32): prefill a prompt (shorter than
one 64-token chunk, and longer: the chunk kernel's multi-chunk path), then feed
tokens one at a time from the carried conv history + delta-rule state (and the
KV cache of the attention layer); the logits of every step must equal the last
logits of a full forward over the whole prefix. The GDN caches keep one size
(O(1) per token); the KV cache grows by one position per token.
"""

from __future__ import annotations

import pytest
import torch

from titan_cp.models.gdn import GDNModel, model_config
from titan_cp.models.gdn.decode import DecodeCache, GDNCache, KVCache, forward_cached, generate

STEPS = 6


def _model(flavor: str) -> GDNModel:
    torch.manual_seed(0)
    model = GDNModel(model_config(flavor))
    model.init_states()
    return model.eval()


@pytest.mark.parametrize("flavor", ["debug", "debug_hybrid"])
@pytest.mark.parametrize("prompt_len", [5, 70])
def test_incremental_decoding_equals_full_recompute(flavor, prompt_len):
    model = _model(flavor)
    tokens = torch.randint(0, model.config.vocab_size, (2, prompt_len + STEPS),
                           generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = model(tokens)  # logits of every prefix at once (causal)
    cache = DecodeCache.empty(model)
    prefill = forward_cached(model, tokens[:, :prompt_len], cache)
    scale = full.abs().max().item()
    errors = [(prefill - full[:, :prompt_len]).abs().max().item()]
    gdn_shapes = [c.state_BHKV.shape + c.conv_history_BWC.shape for c in cache.layers if isinstance(c, GDNCache)]
    for t in range(prompt_len, prompt_len + STEPS):
        step = forward_cached(model, tokens[:, t:t + 1], cache)
        errors.append((step[:, 0] - full[:, t]).abs().max().item())
    print(f"{flavor} prompt {prompt_len}: max |incremental - full| per step {['%.1e' % e for e in errors]}")
    # Both fp32; the chunk kernel and the recurrence sum in different orders (~1e-7 relative).
    assert max(errors) <= 1e-5 * max(scale, 1.0), errors
    assert cache.length == prompt_len + STEPS
    assert [c.state_BHKV.shape + c.conv_history_BWC.shape for c in cache.layers
            if isinstance(c, GDNCache)] == gdn_shapes  # constant-size GDN state
    for c in cache.layers:
        if isinstance(c, KVCache):
            assert c.k_BTHD.shape[1] == prompt_len + STEPS


def test_greedy_generate_matches_argmax_of_full_forward():
    model = _model("debug_hybrid")
    prompt = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, max_new_tokens=5)
    assert out.shape == (1, 14) and torch.equal(out[:, :9], prompt)
    for t in range(9, 14):  # each generated token is the argmax of a full forward over what precedes it
        with torch.no_grad():
            assert out[0, t] == model(out[:, :t])[0, -1].argmax()
    stopped = generate(model, prompt, max_new_tokens=5, eos_id=int(out[0, 10]))
    assert torch.equal(stopped, out[:, :11])  # stops right after the EOS token


def test_generate_command_continues_the_prompt(tmp_path, capsys):
    """`python -m titan_cp.cli.generate` on a DCP checkpoint folder: [BOS] + prompt, greedy, decoded."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    from titan_cp.components.data import TOKENIZER_PATH
    from titan_cp.cli.generate import main
    from titan_cp.models.gdn.hf_folder import save_dcp

    model = _model("debug")
    save_dcp(model, tmp_path / "checkpoint" / "step-2")
    assert main(["--checkpoint", str(tmp_path / "checkpoint"), "--flavor", "debug", "--prompt", "Dear Bram,",
                 "--max_new_tokens", "8", "--temperature", "0"]) == 0
    tokenizer = HuggingFaceTokenizer(tokenizer_path=str(TOKENIZER_PATH))
    prompt = tokenizer.encode("Dear Bram,", add_bos=True, add_eos=False)
    expected = generate(model, torch.tensor([prompt]), 8, eos_id=tokenizer.eos_id)[0, len(prompt):].tolist()
    expected = [t for t in expected if t != tokenizer.eos_id]
    assert capsys.readouterr().out == "Dear Bram," + tokenizer.decode(expected) + "\n"
