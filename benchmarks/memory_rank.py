"""What one rank of ``benchmarks/memory.py`` runs: for every layout of its world size in turn, build the
model (:func:`_build`), then per sequence length one forward + chunked-loss backward under the two probes
of benchmarks/memory_probes.py (saved-tensor tally, tracked-allocator peak). Returns one row per
(layout, L); benchmarks/memory.py keeps the worst rank."""

from __future__ import annotations

import contextlib
import gc
import time

import torch
import torch.distributed as dist

from benchmarks.memory_probes import AllocationTracker, SavedTensorTally, is_oom, local_tensor
from benchmarks.model_steps import chunked_loss_backward, make_batch
from benchmarks.qwen3_5_memory import Layout


def _build(margs, layout: Layout, device, max_seq_len: int):
    """(model, CP rank, data-parallel rank): CP-only layouts through the model's ``build`` (the whole world is
    the CP group), TP / EP layouts through :meth:`~benchmarks.qwen3_5_memory.QwenArgs.build_parallel`."""
    if layout.cp_only:
        return margs.build(device, dist.group.WORLD if layout.cp > 1 else None, max_seq_len), dist.get_rank(), 0
    model, dims = margs.build_parallel(device, layout, max_seq_len)
    cp_rank = dims.get_mesh("cp").get_local_rank() if dims.cp_enabled else 0
    dp_rank = dims.get_mesh("batch").get_local_rank() if layout.dp > 1 else 0
    return model, cp_rank, dp_rank


def _rank_labels(labels: torch.Tensor, layout: Layout, loss_chunks: int) -> torch.Tensor:
    """Labels in the order the chunked loss meets the tokens: under TP + SP chunk i of the lm_head's input
    gathers chunk i of every TP rank's sequence piece ([B, tp, chunks, step] -> [B, chunks, tp, step])."""
    if not (layout.sp and layout.tp > 1):
        return labels
    B, T = labels.shape
    if T % (layout.tp * loss_chunks):
        raise ValueError(f"--seq_lens: {T} tokens per CP rank do not split into tp {layout.tp} x --loss_chunks "
                         f"{loss_chunks}")
    return labels.view(B, layout.tp, loss_chunks, -1).transpose(1, 2).reshape(B, T).contiguous()


def measure_rank(rank, world, device, margs, layouts, seq_lens, batch, loss_chunks, skip, peak=True):
    """Every layout of this world size in turn: one row per (layout, L) for this rank."""
    rows = []
    for layout in layouts:
        rows += _layout_rows(device, margs, layout, seq_lens, batch, loss_chunks, skip.get(str(layout), {}), peak)
        gc.collect()
    return rows


def _layout_rows(device, margs, layout: Layout, seq_lens, batch, loss_chunks, skip_lens, peak):
    model, cp_rank, dp_rank = _build(margs, layout, device, max(seq_lens))
    cfg = model.config
    param_bytes = sum(local_tensor(p).numel() * p.element_size() for p in model.parameters())
    rows = []
    failed = False
    for L in seq_lens:
        row = {"layout": str(layout), "P": layout.cp, "tp": layout.tp, "sp": layout.sp, "ep": layout.ep,
               "dp": layout.dp, "seq_len": L, "tokens_per_rank": batch * L // layout.cp, "param_bytes": param_bytes}
        if L in skip_lens:
            row.update(status="skipped", note=skip_lens[L])
            rows.append(row)
            continue
        if failed:
            row.update(status="skipped", note="a shorter sequence already failed")
            rows.append(row)
            continue
        inputs, labels = make_batch(cfg.vocab_size, L, batch, cp_rank, layout.cp, margs.layout, device,
                                    seed=1 + dp_rank)
        labels = _rank_labels(labels, layout, loss_chunks)
        model.zero_grad(set_to_none=True)
        gc.collect()
        t0 = time.perf_counter()
        try:
            tally = SavedTensorTally(model, margs.layer_kind)
            with AllocationTracker(device) if peak else contextlib.nullcontext() as tracker:
                with tally:
                    h = margs.hidden(model, inputs)
                if tracker is not None:
                    tracker.mark_forward_done()
                chunked_loss_backward(model, h, labels, loss_chunks, batch * L * layout.dp)
                hidden_bytes = h.numel() * h.element_size()
                del h
        except Exception as exc:
            if not is_oom(exc):
                raise
            failed = True
            row.update(status="OOM", note=str(exc).splitlines()[0][:120])
            rows.append(row)
            continue
        if tracker is not None:
            row.update(live_after_forward_bytes=tracker.after_forward, peak_delta_bytes=tracker.peak_delta,
                       peak_bytes=tracker.peak_absolute if tracker.peak_absolute is not None
                       else param_bytes + tracker.peak_delta)
        row.update(
            status="ok",
            saved_bytes=tally.bytes,
            saved_by_kind=tally.by_kind,
            hidden_bytes=hidden_bytes,
            activation_bytes=tally.bytes + hidden_bytes,
            step_s=time.perf_counter() - t0,
        )
        rows.append(row)
        del inputs, labels, tally, tracker
    model.zero_grad(set_to_none=True)
    del model
    return rows
