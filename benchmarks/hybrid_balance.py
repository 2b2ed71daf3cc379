"""``benchmarks.speed --hybrid``: contiguous vs zigzag balance of the hybrid flavor under CP.

Each rank times its CP step in both layouts (GGGA: ring attention in the A layers); a row gives
the per-rank busy time (wall minus time blocked in communication) and CPU time, max / min over
ranks, and the ring's bytes.
"""

from __future__ import annotations

import torch.distributed as dist

from benchmarks.model_steps import ModelArgs, build_model, make_batch, train_step
from benchmarks.speed import _launch_per_cp_size, device_is_cpu
from benchmarks.timing import Timers, comm_per_layer, timed_steps


def _hybrid_rank(rank, P, device, margs: ModelArgs, layouts, L, warmup, repeats, loss_chunks, batch):
    from titan_cp.cp.comm import comm_stats

    timers = Timers(device)
    timers.install()
    out = {}
    for layout in layouts:
        m = ModelArgs(margs.flavor, margs.overrides, margs.exchange, layout, margs.dtype, margs.q_transition)
        model = build_model(m, device, dist.group.WORLD)
        inputs, labels = make_batch(model.config.vocab_size, L, batch, rank, P, layout, device)
        res = timed_steps(model, inputs, labels, batch * L, timers, warmup, repeats, loss_chunks)["cp"]
        comm_stats.reset()
        model.zero_grad(set_to_none=True)
        train_step(model, inputs, labels, loss_chunks, batch * L)
        out[layout] = {**res, "busy": res["wall"] - res.get("comm", 0.0), "comm_stats": comm_per_layer()}
        del model
    return out


def run_hybrid(a, margs: ModelArgs) -> dict:
    rows = []
    args = (margs, ("contiguous", "zigzag"), a.hybrid_len, a.warmup, a.repeats, a.loss_chunks, a.batch)
    for P, per_rank, load in _launch_per_cp_size(a, rows, _hybrid_rank, args):
        for layout in ("contiguous", "zigzag"):
            busy = [r[layout]["busy"] for r in per_rank]
            cpu = [r[layout]["cpu"] for r in per_rank]
            ring = {}
            for layer, kinds in per_rank[0][layout]["comm_stats"].items():
                for k, v in kinds.items():
                    if k.startswith("ring"):
                        ring[f"{layer}:{k}"] = v["sent"]
            rows.append({"P": P, "layout": layout, "L": a.hybrid_len, "step_s": max(r[layout]["wall"] for r in per_rank),
                         "busy_per_rank_s": busy, "busy_max_over_min": max(busy) / min(busy),
                         "cpu_per_rank_s": cpu, "cpu_max_over_min": max(cpu) / min(cpu),
                         "balance_max_over_min": max(cpu) / min(cpu) if device_is_cpu() else max(busy) / min(busy),
                         "balance_measure": "CPU time" if device_is_cpu() else "wall minus comm",
                         "comm_blocked_per_rank_s": [r[layout].get("comm", 0.0) for r in per_rank],
                         "ring_bytes_rank0": ring, "load_average": load,
                         "oversubscribed": P > a.cores and device_is_cpu()})
    return {"hybrid": rows}
