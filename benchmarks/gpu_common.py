"""Shared by benchmarks/gpu_check.py and benchmarks/gpu_measure.py: inputs, models, timing, error metrics."""

from __future__ import annotations

import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]

# ------------------------------------------------------------------------------- error metrics


def errors(a: torch.Tensor, truth: torch.Tensor) -> dict:
    a, truth = a.double(), truth.double()
    diff = a - truth
    return {
        "max_abs": diff.abs().max().item(),
        "max": (diff.abs().max() / truth.abs().max().clamp_min(1e-30)).item(),
        "rms": (diff.norm() / truth.norm().clamp_min(1e-30)).item(),
    }


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device, iters: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms (synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]

def gdn_inputs(B, T, H, K, V, seed, device, dtype):
    """Inputs like the layer's: unit q, k (dtype), v (dtype), g, beta, h0 in float32; doc starts."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 3)  # decays ~0.95: long memory
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) * 0.1
    starts = torch.rand(B, T, generator=gen) < 1.0 / 300
    starts[0, 0] = True  # row 0 drops its initial state
    if B > 1:
        starts[1, 0] = False
        starts[1, [T // 2, T // 2 + 1]] = True  # consecutive
        starts[1, T - 1] = True  # last token
    w_o = torch.randn(B, T, H, V, generator=gen)
    w_s = torch.randn(B, H, K, V, generator=gen)
    tensors = [q.to(dtype), k.to(dtype), v.to(dtype), g, beta, h0]
    return [t.to(device) for t in tensors], starts.to(device), (w_o.to(device), w_s.to(device))


def run_kernel(kernel, tensors, starts, weights, compute_dtype=None):
    """fwd + bwd of one kernel; returns o, final_state and the six gradients as float64 on CPU."""
    leaves = [(t if compute_dtype is None else t.to(compute_dtype)).detach().clone().requires_grad_() for t in tensors]
    o, s = kernel(*leaves[:5], initial_state=leaves[5], output_final_state=True, doc_starts=starts)
    w_o, w_s = weights
    ((o.double() * w_o.double()).sum() + (s.double() * w_s.double()).sum()).backward()
    return [x.detach().double().cpu() for x in [o, s] + [leaf.grad for leaf in leaves]]

# ------------------------------------------------------------------------------- models


MODEL_SPECS = {
    # name: (flavor, overrides)
    "debug": ("debug", {}),
    "340M-2L": ("340M", {"n_layers": 2, "vocab_size": 4096}),  # 340M's layer shapes, 2 layers, small vocab
    "340M": ("340M", {}),
}


def build_model(spec: str, kernel: str, dtype: torch.dtype, device, seed: int = 0, **extra):
    from titan_cp.models.gdn import model_config

    flavor, overrides = MODEL_SPECS[spec]
    torch.manual_seed(seed)
    model = model_config(flavor, kernel=kernel, **overrides, **extra).build()
    model.init_weights()  # on CPU, seeded: identical in every process
    return model.to(device=device, dtype=dtype)


def cp_batch(vocab: int, B: int, T: int, seed: int):
    """Tokens, labels and positions: row 1 holds three documents (positions restart at 0)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=gen)
    positions = torch.arange(T).repeat(B, 1)
    if B > 1:
        a, b = T // 3, 2 * T // 3 + 1
        positions[1, a:] -= a
        positions[1, b:] = torch.arange(T - b)
    return tokens[:, :-1], tokens[:, 1:], positions


def loss_and_grads(model, inputs, labels, positions, total_tokens: int):
    """Backward of (sum of this shard's token losses, fp32) / total_tokens.

    Returns (that loss part as a float64 scalar tensor, fp32 gradients by name):
    summed over CP ranks both give the full sequence's mean loss and its gradients.
    """
    model.zero_grad(set_to_none=True)
    logits = model(inputs, positions)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum") / total_tokens
    loss.backward()
    return loss.detach().double(), {n: p.grad.detach().float() for n, p in model.named_parameters()}
