"""What the benchmark scripts share: the GDN model they build, its batches and one training
step, the machine description, and the launcher (gloo ranks on CPU, one GPU per rank on GPUs).

Used by ``benchmarks/memory.py``, ``benchmarks/speed.py`` and ``benchmarks/timing.py``.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from titan_cp.testing import run_on_ranks  # noqa: E402

# --------------------------------------------------------------------------- model


@dataclass
class ModelArgs:
    """A flavor (titan_cp/models/gdn/flavors.py) with field overrides, plus the CP strategy."""

    flavor: str = "debug"
    overrides: dict = field(default_factory=dict)
    exchange: str = "allgather"
    layout: str = "contiguous"
    dtype: str = "float32"
    q_transition: str = "recompute"  # parallelism.cp_q_transition

    def config(self):
        from titan_cp.models.gdn import model_config

        return model_config(self.flavor, cp_exchange=self.exchange, cp_layout=self.layout,
                            cp_q_transition=self.q_transition, **self.overrides)

    has_estimate = True  # titan_cp.analysis.memory models this model

    def build(self, device: torch.device, cp_group, max_seq_len: int | None = None):
        return build_model(self, device, cp_group)

    @staticmethod
    def hidden(model, inputs: torch.Tensor) -> torch.Tensor:
        return decoder_hidden(model, inputs)

    @staticmethod
    def layer_kind(block) -> str:
        return "attention" if "Attention" in type(block.attention).__name__ else "gdn"

    def describe(self) -> str:
        c = self.config()
        hv = c.num_v_heads or c.num_heads
        text = (f"flavor {self.flavor}: dim {c.dim}, {c.n_layers} layers, {c.num_heads} heads x K {c.head_dim}, "
                f"{hv} value heads x V {int(c.head_dim * c.expand_v)}, MLP {c.hidden_dim}, vocab {c.vocab_size}, "
                f"kernel {c.kernel}")
        if c.layer_pattern:
            text += (f", layer_pattern {c.layer_pattern} (attention {c.attn_num_heads} q / {c.attn_num_kv_heads} kv "
                     f"heads x {c.attn_head_dim})")
        return text + f", {self.dtype}"


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class ModelFlags:
    """The model a benchmark builds (--model, --flavor, the GDN LM's shape overrides, kernel, CP strategy, dtype)."""

    model: Literal["gdn", "qwen3_5"] = "gdn"
    """gdn: titan_cp's GDN LM (a --flavor of titan_cp/models/gdn/flavors.py, the shape flags override its fields);
    qwen3_5: TorchTitan's Qwen3.5 --flavor on titan_cp's CP layers (debug / debug_moe = the CPU debug shapes,
    benchmarks/qwen3_5_memory.py; the shape flags do not apply)"""
    flavor: str = "debug"
    dim: int | None = 256
    n_layers: int | None = 2
    num_heads: int | None = 4
    head_dim: int | None = 64
    num_v_heads: int | None = None
    hidden_dim: int | None = 768
    vocab_size: int | None = 2048
    expand_v: float | None = None
    kernel: str = "torch"
    """torch | recurrent | triton"""
    exchange: str = "allgather"
    """allgather | logscan | alltoall"""
    layout: str = "contiguous"
    """contiguous | zigzag"""
    q_transition: Literal["recompute", "keep"] = "recompute"
    """state-passing CP's q M (parallelism.cp_q_transition): recomputed in the backward, or kept from the forward"""
    dtype: Literal["bfloat16", "float32", "float64"] = "float32"

    def model_args(self):
        """:class:`ModelArgs` (gdn) or :class:`benchmarks.qwen3_5_memory.QwenArgs` (qwen3_5)."""
        if self.model == "qwen3_5":
            from benchmarks.qwen3_5_memory import qwen_args_from

            return qwen_args_from(self)
        return model_args_from(self)


@dataclass
class StepFlags:
    """The measured training step and its ranks."""

    cp_sizes: tuple[int, ...] | None = None
    """CP degrees P (None: the benchmark's own list)"""
    batch: int = 1
    loss_chunks: int = 8
    """chunked loss chunks (TorchTitan default 8)"""
    threads: int = 1
    """torch threads per rank"""


@dataclass
class OutputFlags:
    """Where the result goes."""

    json: Path | None = None
    """write the result as JSON here"""
    markdown: bool = False
    """print the table as markdown"""
    plot: Path | None = None
    """save a PNG of the figure here"""
    from_json: Path | None = None
    """print / plot a saved --json result instead of running"""


def parse_flags(cls, argv, prog: str, doc: str):
    """``cls`` (a dataclass built from the flag groups above) from the command line, flags spelled with
    underscores (``--cp_sizes 1 2``), the module docstring as the help text."""
    import tyro

    return tyro.cli(cls, args=argv, prog=prog, description=doc, use_underscores=True)


def model_args_from(a: ModelFlags) -> ModelArgs:
    over = {k: getattr(a, k) for k in ("dim", "n_layers", "num_heads", "head_dim", "num_v_heads", "hidden_dim",
                                       "vocab_size", "expand_v") if getattr(a, k, None) is not None}
    over["kernel"] = a.kernel
    return ModelArgs(a.flavor, over, a.exchange, a.layout, a.dtype, a.q_transition)


def build_model(args: ModelArgs, device: torch.device, cp_group=None, seed: int = 0):
    """The model on ``device`` (same weights on every rank: same seed), CP applied when the group has > 1 rank."""
    from titan_cp.cp.context import CPContext
    from titan_cp.models.common.parallelize import apply_cp

    torch.manual_seed(seed)
    model = args.config().build()
    model.init_weights()
    model.to(device=device, dtype=DTYPES[args.dtype])
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        apply_cp(model, CPContext(group=cp_group, layout=args.layout, exchange=args.exchange,
                                  q_transition=args.q_transition))
    else:
        apply_cp(model, None)
    return model


def make_batch(vocab: int, L: int, batch: int, rank: int, P: int, layout: str, device, seed: int = 1):
    """(inputs, labels) of this rank: its shard of a random global batch, as separate storages."""
    from titan_cp.cp.layout import rank_segments

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, L + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if P > 1:
        inputs, labels = (rank_segments(t, 1, rank, P, layout) for t in (inputs, labels))
    return inputs.contiguous().to(device), labels.contiguous().to(device)


def decoder_hidden(model, inputs: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """GDNModel.forward without the lm_head: the hidden states TorchTitan's chunked loss receives."""
    seq = model.sequence_info(inputs, positions)
    h = model.tok_embeddings(inputs)
    for block in model.layers.values():
        h = block(h, seq)
    return model.norm(h)


def chunked_loss_backward(model, h: torch.Tensor, labels: torch.Tensor, n_chunks: int, global_tokens: int) -> float:
    """TorchTitan's ChunkedLossWrapper flow: lm_head + CE + backward per chunk, fp32 grad accumulator, then
    the decoder backward. Loss normalised by the global token count (so CP ranks' gradients sum).
    Chunk i takes the i-th of ``n`` equal pieces of ``labels``, which may be wider than ``h``: under TP with
    sequence parallel ``h`` is this rank's sequence piece and ``lm_head`` gathers the TP ranks' chunks."""
    T = h.shape[1]
    n = max(1, min(n_chunks, T))
    while T % n:
        n -= 1
    accum = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    total = 0.0
    step = T // n
    for i in range(n):
        sl = slice(i * step, (i + 1) * step)
        hc = h.detach()[:, sl].contiguous().requires_grad_(True)
        logits = model.lm_head(hc)
        width = labels.shape[1] // n
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, i * width:(i + 1) * width].flatten(),
                               reduction="sum") / global_tokens
        loss.backward()
        accum[:, sl] = hc.grad
        total += loss.item()
        del hc, logits, loss
    h.backward(accum.to(h.dtype))
    return total


def train_step(model, inputs, labels, n_chunks: int, global_tokens: int, hidden=decoder_hidden) -> float:
    """Forward to the decoder output (``hidden(model, inputs)``: the model args' ``hidden``), chunked loss, backward."""
    h = hidden(model, inputs)
    return chunked_loss_backward(model, h, labels, n_chunks, global_tokens)


# --------------------------------------------------------------------------- launching ranks


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, nccl"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, gloo; "
            f"load average {load:.1f} at start")


KEEP_FREED_MEMORY = "glibc.malloc.trim_threshold=4000000000:glibc.malloc.mmap_threshold=4000000000"
"""GLIBC_TUNABLES for CPU timing runs: glibc's malloc keeps freed blocks instead of returning
them to the OS, so a step reuses the previous step's memory as a caching allocator (CUDA's,
jemalloc, tcmalloc) does. With glibc's defaults every large tensor is a fresh mmap and its
first touch costs page faults (0-20K per kernel call measured, ~2 us each), which made
step times random by +-10%."""


def keep_freed_memory(enabled: bool = True) -> str:
    """Set GLIBC_TUNABLES (:data:`KEEP_FREED_MEMORY`) for the processes started from here on
    (glibc reads it at process start). Returns a line for the report."""
    if not enabled or sys.platform != "linux":
        return "glibc malloc defaults (freed memory returned to the OS)"
    os.environ["GLIBC_TUNABLES"] = KEEP_FREED_MEMORY
    return f"GLIBC_TUNABLES={KEEP_FREED_MEMORY} (freed memory reused, as a caching allocator does)"


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def can_launch(P: int) -> tuple[bool, str]:
    if torch.cuda.is_available() and P > torch.cuda.device_count():
        return False, f"needs {P} GPUs, {torch.cuda.device_count()} visible"
    return True, ""


def _on_device(rank, world, fn, *args):
    """Rank body under :func:`titan_cp.testing.run_on_ranks`: pick this rank's device, run ``fn``."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    return fn(rank, world, torch.device("cuda", rank) if cuda else torch.device("cpu"), *args)


def launch(fn, world: int, args=(), *, threads: int = 1, timeout: float = 3600.0, pg_timeout: float = 900.0):
    """Run ``fn(rank, world, device, *args)`` on ``world`` fresh processes (gloo on CPU, NCCL on GPUs).

    ``fn`` must be a module-level function. Returns the results by rank; raises
    (titan_cp.testing.RankFailure) with the tracebacks if any rank fails, or on ``timeout``.
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return run_on_ranks(_on_device, world, (fn, *args), timeout=timeout, pg_timeout=pg_timeout, backend=backend,
                        threads=threads)
