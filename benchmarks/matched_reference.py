"""The work-matched reference of a CP overhead row (benchmarks/speed.py): figures and their printed line.

The shard alone does causal attention over its own keys only; under CP a rank's queries also
attend to every earlier key (zigzag at P = 2: 2x the shard's attention work; contiguous: 1x on
rank 0, 3x on rank 1), work the one-rank run does too. So beside the overhead against the shard
alone, a row reports the overhead against

    t(matched) = t(shard alone) + sum over attention layers (t(CP attention blocks) - t(shard's causal block))

(:func:`benchmarks.timing.matched_reference`; the block times are measured in the same interleaved
rounds by :func:`benchmarks.timing.attention_kernels`). Without attention layers the two are one figure.
"""

from __future__ import annotations

import statistics

from benchmarks.timing import matched_reference


MATCHED_DEFINITION = (
    "overhead vs shard alone = (t(CP) - t(shard alone)) / t(CP); overhead vs work-matched reference = "
    "(t(CP) - t(matched)) / t(CP), t(matched) = t(shard alone) + per attention layer (t(the rank's CP attention "
    "blocks, fwd + bwd, on local tensors, no communication) - t(its shard's causal block)); "
    "both means over ranks, timed in the same interleaved rounds")
"""What the two CP overhead figures of an overhead row mean (printed with the figures and kept in the JSON)."""


def matched_figures(per_rank: list[dict], cp_wall: float, cp_cpu: float) -> dict:
    """The work-matched reference (:func:`benchmarks.timing.matched_reference`) of an overhead row, in wall
    and CPU time, mean over ranks, and the overhead against it. A model without attention layers has no
    attention work to match: its reference is the shard alone and the two overheads are one figure."""
    def reference(r, key):
        layers = r["attention_layers"]
        return matched_reference(r["alone"][key], {i: r[f"attn_cp:{i}"][key] for i in layers},
                                 {i: r[f"attn_alone:{i}"][key] for i in layers}, layers)

    wall = statistics.fmean(reference(r, "wall") for r in per_rank)
    cpu = statistics.fmean(reference(r, "cpu") for r in per_rank)
    layers = per_rank[0]["attention_layers"]
    out = {"step_matched_s": wall, "cpu_matched_s": cpu, "overhead_fraction_matched": (cp_wall - wall) / cp_wall,
           "cpu_overhead_fraction_matched": (cp_cpu - cpu) / cp_cpu, "attention_layers": sum(layers.values()),
           "matched_definition": MATCHED_DEFINITION if layers else
           "no attention layers: the work-matched reference is the shard alone (the two overheads are one figure)"}
    if layers:
        out["attention_extra_per_rank_s"] = [reference(r, "wall") - r["alone"]["wall"] for r in per_rank]
        out["attention_blocks_in_step_s"] = {"cp": [r["cp"].get("attention", 0.0) for r in per_rank],
                                             "alone": [r["alone"].get("attention", 0.0) for r in per_rank]}
    return out


def matched_line(o: dict) -> str:
    """The overhead row's two figures, with what they mean."""
    if not o["attention_layers"]:
        return (f"# P={o['P']}: CP overhead {100 * o['overhead_fraction']:+.1f}% of the step ({o['matched_definition']})")
    extra = " / ".join(f"{1e3 * x:.0f}" for x in o["attention_extra_per_rank_s"])
    return (f"# P={o['P']}: CP overhead vs shard alone {100 * o['overhead_fraction']:+.1f}%, vs work-matched reference "
            f"{100 * o['overhead_fraction_matched']:+.1f}% (CPU time {100 * o['cpu_overhead_fraction']:+.1f}% / "
            f"{100 * o['cpu_overhead_fraction_matched']:+.1f}%); attention work beyond the shard, per rank: {extra} ms "
            f"over {o['attention_layers']} attention layer(s)\n# definitions: {o['matched_definition']}")
