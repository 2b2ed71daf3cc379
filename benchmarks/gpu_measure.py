"""The measure section of benchmarks/gpu_check.py: one CP shard's time and memory vs P, in one process.

The 340M flavor in bf16, one shard simulated in one process (:class:`LoopbackGroup`:
the CP code runs for rank r of P, every collective returns local data, so compute
and memory are exactly a real rank's and communication time is excluded; bytes are
counted): peak memory and fwd+bwd time per shard vs P, the CP overhead over running
the same shard alone, and per-shard GDN op time of titan_cp's CP vs FLA's op-level
CP (fla.ops.cp, same loopback) and vs FLA without CP. Run it through
``python -m benchmarks.gpu_check --sections measure``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.gpu_common import MODEL_SPECS, build_model, gdn_inputs, sync, timed_ms


# ------------------------------------------------------------------------------- collectives
# The cp section needs nothing here: titan_cp's CP collectives (titan_cp/cp/comm.py) stage
# CUDA tensors through host memory by themselves on a gloo group (HostStagedComm). The
# measure section simulates one rank of P in a single process: a loopback group that
# torch.distributed is taught for the duration (FLA's op-level CP calls torch.distributed
# itself, so this one stays a patch).


class _DoneWork:
    """A finished Work handle."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


@dataclass(frozen=True)
class LoopbackGroup:
    """Rank ``rank`` of a ``size``-rank group, simulated in one process (no communication).

    Under :func:`loopback_collectives`, torch.distributed treats it as a group:
    get_rank / get_world_size / get_global_rank answer for it; all-gathers fill
    every rank's slot with the local tensor, received point-to-point buffers
    are zeros, all-to-all returns the input, all-reduce is the identity. Shapes,
    kernels and memory are exactly a real rank's; only the data from other
    ranks is fake (fine for timing and memory, never for correctness).
    """

    size: int
    rank: int
    group_name: str = "loopback"


class _LoopbackP2POp:
    def __init__(self, op, tensor, peer=None, group=None, tag=0, group_peer=None):
        self.op, self.tensor, self.peer, self.group, self.tag = op, tensor, peer, group, tag


@contextlib.contextmanager
def loopback_collectives():
    """Patch torch.distributed so that :class:`LoopbackGroup` works; other groups are untouched."""
    names = ("get_rank", "get_world_size", "get_global_rank", "all_gather_into_tensor", "all_gather_single",
             "all_gather", "all_reduce", "all_to_all_single", "batch_isend_irecv", "P2POp")
    saved = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def is_loop(group):
        return isinstance(group, LoopbackGroup)

    def get_rank(group=None):
        return group.rank if is_loop(group) else saved["get_rank"](group)

    def get_world_size(group=None):
        return group.size if is_loop(group) else saved["get_world_size"](group)

    def get_global_rank(group, group_rank):
        return group_rank if is_loop(group) else saved["get_global_rank"](group, group_rank)

    def gather_like(name):
        def gather(output_tensor, input_tensor, group=None, async_op=False):
            if not is_loop(group):
                return saved[name](output_tensor, input_tensor, group=group, async_op=async_op)
            flat = input_tensor.reshape(1, -1)
            output_tensor.view(group.size, -1).copy_(flat.expand(group.size, flat.shape[1]))
            return _DoneWork() if async_op else None
        return gather

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if not is_loop(group):
            return saved["all_gather"](tensor_list, tensor, group=group, async_op=async_op)
        for t in tensor_list:
            t.copy_(tensor)
        return _DoneWork() if async_op else None

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not is_loop(group):
            return saved["all_reduce"](tensor, op=op, group=group, async_op=async_op)
        return _DoneWork() if async_op else None

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if not is_loop(group):
            return saved["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group=group,
                                              async_op=async_op)
        output.copy_(input.reshape(output.shape))
        return _DoneWork() if async_op else None

    def P2POp(op, tensor, peer=None, group=None, tag=0, group_peer=None):
        if is_loop(group):
            return _LoopbackP2POp(op, tensor, peer, group, tag, group_peer)
        return saved["P2POp"](op, tensor, peer, group, tag, group_peer)

    def batch_isend_irecv(p2p_op_list):
        if not p2p_op_list or not isinstance(p2p_op_list[0], _LoopbackP2POp):
            return saved["batch_isend_irecv"](p2p_op_list)
        for op in p2p_op_list:
            if getattr(op.op, "__name__", "") == "irecv":
                op.tensor.zero_()
        return [_DoneWork() for _ in p2p_op_list]

    patched = dict(get_rank=get_rank, get_world_size=get_world_size, get_global_rank=get_global_rank,
                   all_gather=all_gather, all_reduce=all_reduce, all_to_all_single=all_to_all_single,
                   batch_isend_irecv=batch_isend_irecv, P2POp=P2POp)
    patched.update({n: gather_like(n) for n in ("all_gather_into_tensor", "all_gather_single") if n in saved})
    for n, f in patched.items():
        setattr(dist, n, f)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)

# ------------------------------------------------------------------------------- section: measure


def forward_hidden(model, tokens, positions=None):
    """GDNModel.forward without lm_head (the loss below applies it in chunks, like TorchTitan's chunked loss)."""
    seq = model.sequence_info(tokens, positions)
    h = model.tok_embeddings(tokens)
    for block in model.layers.values():
        h = block(h, seq)
    return model.norm(h)


def chunked_loss(h, weight, labels, chunk: int = 8192):
    """Mean cross-entropy with logits formed chunk by chunk and recomputed in backward (never all at once)."""
    from torch.utils.checkpoint import checkpoint

    def piece(h_part, labels_part):
        return F.cross_entropy((h_part @ weight.t()).float(), labels_part, reduction="sum")

    h, labels = h.flatten(0, 1), labels.flatten()
    total = sum(checkpoint(piece, h[i:i + chunk], labels[i:i + chunk], use_reentrant=False)
                for i in range(0, h.shape[0], chunk))
    return total / labels.numel()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _measured_row(row: dict, device, cleanup=lambda: None):
    """One measurement row: ``status`` 'ok', or 'oom' if the device ran out of memory (other errors
    propagate); then ``cleanup()`` and the device's memory freed."""
    try:
        yield
        row["status"] = "ok"
    except Exception as error:  # noqa: BLE001
        if not _is_oom(error):
            raise
        row["status"] = "oom"
    finally:
        cleanup()
        _free(device)


def measure_model(args, device, spec, dtype) -> list[dict]:
    from titan_cp.cp.context import CPContext
    from titan_cp.cp.comm import comm_stats
    from titan_cp.models.common.parallelize import apply_cp

    cuda = torch.device(device).type == "cuda"
    model = build_model(spec, args.kernel, dtype, device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    sync(device)
    static_bytes = torch.cuda.memory_allocated() if cuda else None  # parameters + gradients
    rows = []
    for L in args.seq_lens:
        for P in args.measure_sizes:
            row = {"L": L, "P": P, "shard": L // P, "model": spec, "dtype": str(dtype).replace("torch.", ""),
                   "params_and_grads_gib": None if static_bytes is None else static_bytes / 2**30}
            if L % P:
                row["status"] = "skipped: L not divisible by P"
                rows.append(row)
                continue
            gen = torch.Generator().manual_seed(L + P)
            tokens = torch.randint(0, model.config.vocab_size, (1, L // P + 1), generator=gen).to(device)
            inputs, labels = tokens[:, :-1], tokens[:, 1:]
            rank = P // 2

            def step(inputs=inputs, labels=labels):
                loss = chunked_loss(forward_hidden(model, inputs), model.lm_head.weight, labels)
                loss.backward()

            with _measured_row(row, device, cleanup=lambda: apply_cp(model, None)), loopback_collectives():
                cp = None if P == 1 else CPContext(group=LoopbackGroup(P, rank), layout="contiguous",
                                                   exchange=args.exchange)
                apply_cp(model, cp)
                comm_stats.reset()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                step()  # warm-up (autotuning, allocator) and the memory peak
                sync(device)
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                sent, received = comm_stats.total().bytes_sent, comm_stats.total().bytes_received
                row["comm_bytes_sent_per_step"], row["comm_bytes_received_per_step"] = sent, received
                row["fwd_bwd_ms"] = timed_ms(step, device, args.iters, warmup=0)
                apply_cp(model, None)  # the same shard as an independent sequence: no CP machinery
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                row["alone_ms"] = timed_ms(step, device, args.iters, warmup=1)
                row["alone_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                row["cp_overhead_ms"] = row["fwd_bwd_ms"] - row["alone_ms"]
            rows.append(row)
    # memory target: activations scale as 1/P from the smallest P that fits at each L
    for L in args.seq_lens:
        fits = [r for r in rows if r["L"] == L and r.get("status") == "ok" and r.get("peak_mem_gib") is not None]
        if not fits or static_bytes is None:
            continue
        base = min(fits, key=lambda r: r["P"])
        act = base["peak_mem_gib"] - base["params_and_grads_gib"]
        for r in fits:
            target = act * base["P"] / r["P"] + r["params_and_grads_gib"]
            r["mem_baseline_P"] = base["P"]
            r["mem_target_gib"] = 1.10 * target
            r["mem_target_met"] = r["peak_mem_gib"] <= 1.10 * target
    return rows


def titan_cp_gdn_op(kernel_name, cp):
    """Steps c-d of titan_cp.cp.state_passing.mix_state_passing (segment kernel, exchange,
    correction; backward from the true start), no conv: the same call, delta_rule_over_segments."""
    from titan_cp.cp.state_passing import delta_rule_over_segments

    def op(q, k, v, g, beta):
        return delta_rule_over_segments(q, k, v, g, beta, cp, kernel_name, "op")

    return op


def fla_cp_op(P, rank, shard, device):
    """FLA's op-level CP for rank ``rank`` of P (loopback group), or None if FLA's CP cannot run here."""
    try:
        from fla.ops.cp import build_cp_context
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001
        return None
    cu = torch.tensor([0, shard * P], dtype=torch.long, device=device)
    context = build_cp_context(cu, group=LoopbackGroup(P, rank), cu_seqlens_cpu=cu.cpu())

    def op(q, k, v, g, beta):
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cp_context=context)
        return o

    return op


def fla_local_op():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # noqa: BLE001
        return None

    def op(q, k, v, g, beta):
        return chunk_gated_delta_rule(q, k, v, g, beta)[0]

    return op


def measure_kernels(args, device, H, K, V, dtype) -> list[dict]:
    from titan_cp.cp.context import CPContext

    cuda = torch.device(device).type == "cuda"
    rows = []
    for L in args.seq_lens:
        for P in [p for p in args.measure_sizes if p > 1]:
            shard = L // P
            row = {"L": L, "P": P, "shard": shard, "H": H, "K": K, "V": V, "dtype": str(dtype).replace("torch.", "")}
            with _measured_row(row, device):
                tensors, _, _ = gdn_inputs(1, shard, H, K, V, seed=0, device=device, dtype=dtype)
                q, k, v, g, beta = [t.requires_grad_() for t in tensors[:5]]
                grad_o = torch.randn(1, shard, H, V, device=device, dtype=dtype)

                def fwd_bwd(op, inputs=(q, k, v, g, beta), grad_o=grad_o):
                    def run():
                        op(*inputs).backward(grad_o)
                    return run

                with loopback_collectives():
                    per_rank_titan, per_rank_fla = [], []
                    for rank in range(P):
                        cp = CPContext(group=LoopbackGroup(P, rank), layout="contiguous", exchange=args.exchange)
                        per_rank_titan.append(timed_ms(fwd_bwd(titan_cp_gdn_op(args.kernel, cp)), device, args.iters))
                        fla = fla_cp_op(P, rank, shard, device) if cuda else None
                        if fla is not None:
                            per_rank_fla.append(timed_ms(fwd_bwd(fla), device, args.iters))
                    local = fla_local_op() if cuda else None
                row["titan_cp_ms_per_rank"] = per_rank_titan
                row["titan_cp_ms"] = max(per_rank_titan)
                row["fla_cp_ms_per_rank"] = per_rank_fla or None
                row["fla_cp_ms"] = max(per_rank_fla) if per_rank_fla else None
                row["fla_local_ms"] = timed_ms(fwd_bwd(local), device, args.iters) if local is not None else None
                row["within_5pct"] = (row["titan_cp_ms"] <= 1.05 * row["fla_cp_ms"]) if row["fla_cp_ms"] else None
                if not cuda:
                    row["note"] = "FLA's CP needs CUDA: titan_cp timed alone"
            rows.append(row)
    return rows


def measure(args, device) -> dict:
    from titan_cp.ops.gated_delta_rule import get_kernel

    get_kernel(args.kernel)
    spec = "debug" if args.quick else "340M"
    from titan_cp.models.gdn import model_config

    cfg = model_config(MODEL_SPECS[spec][0], **MODEL_SPECS[spec][1])
    K, V, H = cfg.head_dim, int(cfg.head_dim * cfg.expand_v), cfg.num_v_heads or cfg.num_heads
    dtype = torch.bfloat16
    model_rows = measure_model(args, device, spec, dtype)
    _free(device)  # the model is gone
    kernel_rows = measure_kernels(args, device, H, K, V, dtype)
    mem = [r["mem_target_met"] for r in model_rows if "mem_target_met" in r]
    speed = [r["within_5pct"] for r in kernel_rows if r.get("within_5pct") is not None]
    return {"status": "done", "model": spec, "dtype": "bfloat16", "exchange": args.exchange,
            "method": "one shard per row, rank P//2 of P simulated in one process (LoopbackGroup): "
                      "compute and memory of a real rank, communication time excluded (bytes counted)",
            "targets": {"memory_within_10pct": (all(mem) if mem else None),
                        "gdn_op_within_5pct_of_fla_cp": (all(speed) if speed else None)},
            "model_rows": model_rows, "kernel_rows": kernel_rows}
