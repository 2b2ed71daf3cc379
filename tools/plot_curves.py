#!/usr/bin/env python
"""Render a TorchTitan run's TensorBoard scalars to one PNG.

    python -m tools.plot_curves <tb_dir_or_run_dir> --out curves.png
    python -m tools.plot_curves outputs/run1 outputs/run2 --out cmp.png   # overlay runs
    python -m tools.plot_curves outputs/run1 --tags 'loss|tps' --out x.png
    python -m tools.plot_curves outputs/run1 --list                        # print tags

Event files (``events.out.tfevents.*``) are found recursively under each path;
every directory holding one is a run (TorchTitan writes ``{dump_folder}/tb/<time>/``
on rank 0), labelled by its path relative to the argument. By default it plots
the loss, memory and CP scalars: tags matching ``loss``, ``memory/`` or
``cp/`` (TorchTitan's ``loss_metrics/global_avg_loss``, ``memory/max_active(GiB)``,
... and titan_cp's ``cp/*``); ``--tags REGEX`` picks others, ``--all`` plots
every scalar. One subplot per tag, one line per run, step on the x axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import tyro
import math
import re
import sys
from pathlib import Path

DEFAULT_TAGS = r"loss|^memory/|^cp/"
EVENT_GLOB = "events.out.tfevents.*"

Series = list[tuple[int, float]]


def find_run_dirs(path: Path) -> list[Path]:
    """Directories under ``path`` (or ``path`` itself) that contain event files, sorted."""
    path = Path(path)
    if path.is_file():
        return [path.parent]
    return sorted({f.parent for f in path.rglob(EVENT_GLOB) if f.is_file()})


def load_run(run_dir: Path) -> dict[str, Series]:
    """All scalar series of one run directory: tag -> [(step, value)] sorted by step.

    Several event files in one directory (restarts) are merged; a later value for
    a step replaces an earlier one.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for f in sorted(Path(run_dir).glob(EVENT_GLOB)):
        acc = EventAccumulator(str(f), size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = out.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                series[int(ev.step)] = float(ev.value)
    return {tag: sorted(s.items()) for tag, s in out.items()}


def load_scalars(paths: list[Path]) -> dict[str, dict[str, Series]]:
    """run label -> tag -> series, for every run found under ``paths``."""
    runs: dict[str, dict[str, Series]] = {}
    for p in paths:
        p = Path(p)
        for d in find_run_dirs(p):
            base = p if p.is_dir() else p.parent
            rel = d.relative_to(base).as_posix() if d != base else ""
            label = p.name if not rel else (rel if len(paths) == 1 else f"{p.name}/{rel}")
            runs[label or d.name] = load_run(d)
    return runs


def select_tags(runs: dict[str, dict[str, Series]], pattern: str | None) -> list[str]:
    tags = sorted({t for r in runs.values() for t in r})
    if pattern is None:
        return tags
    rx = re.compile(pattern)
    return [t for t in tags if rx.search(t)]


def plot(runs: dict[str, dict[str, Series]], tags: list[str], out: Path, title: str | None = None,
         ncols: int = 3, logy: str | None = None) -> Path:
    """One subplot per tag, one line per run; writes ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tags:
        raise ValueError("no scalar tags to plot")
    ncols = max(1, min(ncols, len(tags)))
    nrows = math.ceil(len(tags) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.4 * nrows), squeeze=False)
    logy_rx = re.compile(logy) if logy else None
    for ax, tag in zip(axes.flat, tags):
        for label, series in runs.items():
            if series.get(tag):
                steps, values = zip(*series[tag])
                ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None, linewidth=1.2)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if logy_rx and logy_rx.search(tag):
            ax.set_yscale("log")
        if len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tags):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@dataclass
class Args:
    paths: tyro.conf.Positional[tuple[Path, ...]]
    """TensorBoard dir(s) or run dump folder(s); searched recursively"""
    out: Path = Path("curves.png")
    tags: str = DEFAULT_TAGS
    """regex of tags to plot"""
    all: bool = False
    """plot every scalar tag"""
    list: bool = False
    """print runs and tags, plot nothing"""
    title: str | None = None
    ncols: int = 3
    logy: str | None = None
    """regex of tags drawn with a log y axis, e.g. 'loss'"""


def main(argv: list[str] | None = None) -> int:
    a = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])

    runs = load_scalars(a.paths)
    if not runs:
        print(f"no event files ({EVENT_GLOB}) under {[str(x) for x in a.paths]}", file=sys.stderr)
        return 1
    tags = select_tags(runs, None if a.all else a.tags)
    if a.list:
        for label, series in runs.items():
            print(label)
            for tag, s in sorted(series.items()):
                print(f"  {tag}: {len(s)} points, steps {s[0][0]}..{s[-1][0]}" if s else f"  {tag}: empty")
        return 0
    if not tags:
        all_tags = select_tags(runs, None)
        print(f"no tag matches {a.tags!r}; tags present: {all_tags}", file=sys.stderr)
        return 1
    plot(runs, tags, a.out, a.title, a.ncols, a.logy)
    print(f"wrote {a.out} ({len(tags)} tags, {len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
