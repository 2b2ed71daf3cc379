"""FLA 0.6.0's own Hugging Face model as a reference, run on CPU (a subprocess helper for the tests).

``python tests/support/fla_reference.py logits <hf_folder> <tokens.pt> <out.pt> [<hf_folder> ...]`` loads each
folder with ``fla.models.GatedDeltaNetForCausalLM.from_pretrained`` and saves its fp32 logits for the
tokens (one process for several models: FLA's import and the interpreter's start are the slow part);
``python tests/support/fla_reference.py loss <hf_folder> <batch.pt> <out.pt>`` saves FLA's mean cross-entropy
of a packed batch (``tokens``, ``positions``, ``labels`` [B, T]): the rows are concatenated into one
varlen sequence cut at every row start and document start (``cu_seqlens``, FLA's packed-documents
mode), which is what titan_cp's document masking computes.

FLA's Triton kernels run under ``TRITON_INTERPRET=1`` with titan_cp's shim
(tests/support/triton_interpreter.py), FLA's fused
cross-entropy (GPU only) is off, and FLA's attention layer gets a stand-in for
``flash_attn`` (a CUDA-only package): ``flash_attn_func`` as PyTorch's causal
SDPA with grouped kv heads, which is what flash-attn computes for
``causal=True, window_size=(-1, -1)``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tests.support.triton_interpreter import version_skip_reason

VERIFIED = {"triton": "3.9.", "fla-core": "0.6.0", "transformers": "5.6.2"}


def skip_reason() -> str | None:
    return version_skip_reason(VERIFIED, "the FLA reference")


def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1), **kwargs):
    """flash-attn's [B, T, H, D] causal attention with GQA, in PyTorch (window_size must be unlimited)."""
    assert causal and tuple(window_size) == (-1, -1), "the stand-in covers causal attention without a window"
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def setup_fla() -> None:
    """Interpreter shim (before FLA's kernels are decorated), then the flash_attn stand-in."""
    from tests.support.triton_interpreter import install_interpreter_shim

    install_interpreter_shim()
    import fla.layers.attn

    fla.layers.attn.flash_attn_func = flash_attn_func  # read at call time; None without flash-attn


def _logits(*paths: str) -> None:
    from fla.models import GatedDeltaNetForCausalLM

    for i in range(0, len(paths), 3):
        folder, tokens_path, out_path = paths[i:i + 3]
        model = GatedDeltaNetForCausalLM.from_pretrained(folder, fuse_cross_entropy=False,
                                                         torch_dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.load(tokens_path)).logits
        torch.save(logits.float(), out_path)


def _loss(folder: str, batch_path: str, out_path: str) -> None:
    from fla.models import GatedDeltaNetForCausalLM

    model = GatedDeltaNetForCausalLM.from_pretrained(folder, fuse_cross_entropy=False,
                                                     torch_dtype=torch.float32).eval()
    batch = torch.load(batch_path)
    tokens, positions, labels = batch["tokens"], batch["positions"], batch["labels"]
    starts = positions == 0
    starts[:, 0] = True  # every row is its own sequence
    cu_seqlens = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([tokens.numel()])]).to(torch.int32)
    with torch.no_grad():
        logits = model(input_ids=tokens.reshape(1, -1), cu_seqlens=cu_seqlens).logits.float()
    torch.save(F.cross_entropy(logits[0], labels.flatten()), out_path)


if __name__ == "__main__":
    setup_fla()
    {"logits": _logits, "loss": _loss}[sys.argv[1]](*sys.argv[2:])
