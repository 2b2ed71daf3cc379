"""The keep / recompute A/B of state-passing CP's q M (``--ab_q_transition`` of benchmarks/speed.py).

Beside a launch's CP step in its ``--q_transition`` mode, every CP rank also times the CP step in
the other mode (variant ``cp_other``) in the same interleaved rounds (benchmarks/timing.py), so a
load change hits both alike. Figures of the other mode, next to the launch's own:
overhead = (t(CP other) - t(shard alone)) / t(CP other) in wall and CPU time, mean over ranks (and in
wall time against the row's work-matched reference, benchmarks/matched_reference.py ``matched_figures``);
same-load scaling = t(whole L alone) / t(CP other step), slowest rank.
"""

from __future__ import annotations

import statistics

OTHER = {"recompute": "keep", "keep": "recompute"}


def other_variant(model, margs, P: int):
    """The ``cp_other`` variant: CP of degree P with the other q M mode."""
    from benchmarks.timing import set_cp

    return lambda: set_cp(model, margs, P, q_transition=OTHER[margs.q_transition])


def other_figures(per_rank: list[dict], alone_wall: float, alone_cpu: float, full_wall: float | None,
                  q_transition: str, matched_wall: float) -> dict:
    """The other mode's keys for the overhead row (``per_rank``: each rank's timed variants; ``matched_wall``:
    the work-matched reference of the row, benchmarks/matched_reference.py ``matched_figures``)."""
    wall = statistics.fmean(r["cp_other"]["wall"] for r in per_rank)
    cpu = statistics.fmean(r["cp_other"]["cpu"] for r in per_rank)
    out = {"other_q_transition": OTHER[q_transition], "step_cp_other_s": wall, "cpu_cp_other_s": cpu,
           "overhead_fraction_other": (wall - alone_wall) / wall, "cpu_overhead_fraction_other": (cpu - alone_cpu) / cpu,
           "overhead_fraction_matched_other": (wall - matched_wall) / wall}
    if full_wall is not None:
        out["same_load_speedup_other"] = full_wall / max(r["cp_other"]["wall"] for r in per_rank)
    return out


def summary_line(o: dict) -> str:
    """One line of an overhead row with the A/B."""
    return (f"# P={o['P']}: q M {o['q_transition']}: CP step {o['step_cp_s']:.3f} s, overhead "
            f"{100 * o['overhead_fraction']:+.1f}%; {o['other_q_transition']} (same rounds): {o['step_cp_other_s']:.3f} s, "
            f"{100 * o['overhead_fraction_other']:+.1f}%; CPU-time overhead {100 * o['cpu_overhead_fraction']:+.1f}% / "
            f"{100 * o['cpu_overhead_fraction_other']:+.1f}%")
