#!/usr/bin/env python
"""Render TorchTitan runs' TensorBoard scalars to one PNG a user reads at a glance.

    python -m tools.plot_curves <tb_dir_or_run_dir> --out curves.png
    python -m tools.plot_curves outputs/cp1 outputs/cp2 outputs/tp2 --labels "CP 1" "CP 2" "TP 2" \\
        --tags loss --out cmp.png                                          # overlay runs
    python -m tools.plot_curves outputs/run1 --tags 'loss|tps' --out x.png
    python -m tools.plot_curves outputs/run1 --list                        # print tags

Event files (``events.out.tfevents.*``) are found recursively under each path;
every directory holding one is a run (TorchTitan writes ``{dump_folder}/tb/<time>/``
on rank 0), labelled by its path relative to the argument (or ``--labels``). By
default it plots the loss, memory and CP scalars: tags matching ``loss``,
``memory/`` or ``cp/`` (TorchTitan's ``loss_metrics/global_avg_loss``,
``memory/max_active(GiB)``, ... and titan_cp's ``cp/*``); ``--tags REGEX`` picks
others, ``--all`` plots every scalar.

The page (:func:`plan_layout`):

- the loss first and large: the main loss tag (``loss_metrics/global_avg_loss``, else the
  first tag matching ``loss``) across the whole width, one line per run; with several runs
  a thin panel under it with each run's loss minus the first run's (the picture that shows
  whether a layout changes anything);
- then one row per section, ``loss`` (the other loss tags), ``memory``, ``cp``, ``other``:
  per-rank series (``.../rank0``, ``.../rank1``, ``.../max``) share one panel, so memory
  per rank and CP bytes sit together;
- series that are constant in every run (``memory/num_ooms`` = 0, ``cp/rounds_per_step``)
  get no panel: one text line at the bottom lists them with their value.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

DEFAULT_TAGS = r"loss|^memory/|^cp/"
EVENT_GLOB = "events.out.tfevents.*"
MAIN_LOSS_TAG = "loss_metrics/global_avg_loss"
PER_RANK_SUFFIX = re.compile(r"/(rank\d+|max)$")
SECTIONS = ("loss", "memory", "cp", "other")

Series = list[tuple[int, float]]
Runs = dict[str, dict[str, Series]]  # run label -> tag -> [(step, value)]


# --------------------------------------------------------------------------------------
# Reading event files
# --------------------------------------------------------------------------------------


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


def load_scalars(paths: list[Path], labels: list[str] | None = None) -> Runs:
    """run label -> tag -> series, for every run found under ``paths``.

    ``labels`` (one per path, each path holding exactly one run) replaces the path labels.
    """
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} labels for {len(paths)} paths; give one label per path")
    runs: Runs = {}
    for i, p in enumerate(paths):
        p = Path(p)
        dirs = find_run_dirs(p)
        if labels is not None and len(dirs) > 1:
            raise ValueError(f"--labels: {p} holds {len(dirs)} runs; give one path per run")
        for d in dirs:
            base = p if p.is_dir() else p.parent
            rel = d.relative_to(base).as_posix() if d != base else ""
            label = p.name if not rel else (rel if len(paths) == 1 else f"{p.name}/{rel}")
            runs[labels[i] if labels is not None else (label or d.name)] = load_run(d)
    return runs


def select_tags(runs: Runs, pattern: str | None) -> list[str]:
    tags = sorted({t for r in runs.values() for t in r})
    if pattern is None:
        return tags
    rx = re.compile(pattern)
    return [t for t in tags if rx.search(t)]


# --------------------------------------------------------------------------------------
# Layout: which tags go where
# --------------------------------------------------------------------------------------


@dataclass
class Panel:
    """One axis: ``tags`` drawn together (one line per run and tag)."""

    title: str
    tags: list[str]


@dataclass
class Layout:
    main_loss: str | None
    """the tag drawn large across the top (None: no loss tag selected)"""
    sections: dict[str, list[Panel]] = field(default_factory=dict)
    """section name (``SECTIONS``) -> its panels, in order; empty sections left out"""
    constants: dict[str, float] = field(default_factory=dict)
    """tag -> its value, for tags constant in every run (summarised in a text line, no panel)"""


def constant_value(runs: Runs, tag: str, rel_tol: float = 1e-9) -> float | None:
    """The value of ``tag`` if every point of every run that has it equals it, else None."""
    values = [v for r in runs.values() for _, v in r.get(tag, [])]
    if not values:
        return None
    first = values[0]
    if all(math.isclose(v, first, rel_tol=rel_tol, abs_tol=0.0) or (math.isnan(v) and math.isnan(first))
           for v in values):
        return first
    return None


def panel_title(tag: str) -> str:
    """A per-rank tag's panel: ``memory/peak(GiB)/rank1`` -> ``memory/peak(GiB)``; others keep their tag."""
    return PER_RANK_SUFFIX.sub("", tag)


def section_of(tag: str) -> str:
    if "loss" in tag:
        return "loss"
    head = tag.split("/", 1)[0]
    return head if head in ("memory", "cp") else "other"


def plan_layout(runs: Runs, tags: list[str]) -> Layout:
    """The page for ``tags`` (module docstring): main loss, sections of grouped panels, constants."""
    losses = [t for t in tags if "loss" in t]
    main_loss = MAIN_LOSS_TAG if MAIN_LOSS_TAG in losses else (losses[0] if losses else None)
    layout = Layout(main_loss)
    panels: dict[str, Panel] = {}
    for tag in tags:
        if tag == main_loss:
            continue
        value = constant_value(runs, tag)
        if value is not None:
            layout.constants[tag] = value
            continue
        title = panel_title(tag)
        panels.setdefault(title, Panel(title, [])).tags.append(tag)
    for section in SECTIONS:
        chosen = [p for p in panels.values() if section_of(p.title) == section]
        if chosen:
            layout.sections[section] = chosen
    return layout


def _format_value(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


def constants_line(constants: dict[str, float]) -> str:
    """One line: per-rank tags of one value folded, ``cp/rounds_per_step/{rank0,rank1,max} = 4``."""
    groups: dict[tuple[str, float], list[str]] = {}
    for tag, value in constants.items():
        m = PER_RANK_SUFFIX.search(tag)
        key = (panel_title(tag), value) if m else (tag, value)
        groups.setdefault(key, []).append(m.group(1) if m else "")
    parts = []
    for (base, value), suffixes in groups.items():
        name = base if suffixes == [""] else f"{base}/{{{','.join(suffixes)}}}"
        parts.append(f"{name} = {_format_value(value)}")
    return "constant in every run: " + "; ".join(parts)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------

LINE_STYLES = ("-", "--", ":", "-.")


def _draw(ax, runs: Runs, tags: list[str], logy: bool, many_points: bool) -> int:
    """One line per run and tag on ``ax``; returns the number of lines drawn."""
    lines = 0
    for i, (label, series) in enumerate(runs.items()):
        for tag in tags:
            if not series.get(tag):
                continue
            steps, values = zip(*series[tag])
            name = label if len(tags) == 1 else (f"{label}: {tag.rsplit('/', 1)[-1]}" if len(runs) > 1
                                                 else tag.rsplit("/", 1)[-1])
            ax.plot(steps, values, label=name, linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                    color=None if len(tags) > 1 else f"C{i}", marker=None if many_points else ".", linewidth=1.4)
            lines += 1
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if logy:
        ax.set_yscale("log")
    if lines > 1:
        ax.legend(fontsize=7)
    return lines


def _loss_difference(ax, runs: Runs, tag: str) -> None:
    """Each later run's ``tag`` minus the first run's, on the steps both have."""
    (first_label, first), *others = runs.items()
    reference = dict(first.get(tag, []))
    for i, (label, series) in enumerate(others, start=1):
        points = [(s, v - reference[s]) for s, v in series.get(tag, []) if s in reference]
        if points:
            steps, diffs = zip(*points)
            ax.plot(steps, diffs, label=f"{label} - {first_label}", linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                    color=f"C{i}", marker=".", linewidth=1.2)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_title(f"{tag}: difference from {first_label}", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(fontsize=7)


def plot(runs: Runs, tags: list[str], out: Path, title: str | None = None,
         ncols: int = 3, logy: str | None = None) -> Path:
    """Draw :func:`plan_layout` of ``tags`` into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tags:
        raise ValueError("no scalar tags to plot")
    layout = plan_layout(runs, tags)
    logy_rx = re.compile(logy) if logy else None
    ncols = max(1, ncols)
    with_difference = layout.main_loss is not None and len(runs) > 1
    # Grid rows: main loss (height 2.4), its difference (1.2), then each section's panel rows (1).
    heights: list[float] = []
    if layout.main_loss:
        heights.append(2.4)
    if with_difference:
        heights.append(1.2)
    section_rows = {s: math.ceil(len(p) / ncols) for s, p in layout.sections.items()}
    heights += [1.0] * sum(section_rows.values())
    if not heights:  # every selected tag is constant: the text line alone
        heights = [0.3]
    text_height = 0.5 if layout.constants else 0.0
    fig = plt.figure(figsize=(5.0 * ncols, 3.2 * sum(heights) + text_height))
    grid = fig.add_gridspec(len(heights), ncols, height_ratios=heights)
    row = 0
    if layout.main_loss:
        ax = fig.add_subplot(grid[row, :])
        _draw(ax, runs, [layout.main_loss], bool(logy_rx and logy_rx.search(layout.main_loss)), False)
        ax.set_title(layout.main_loss, fontsize=12)
        row += 1
    if with_difference:
        _loss_difference(fig.add_subplot(grid[row, :]), runs, layout.main_loss)
        row += 1
    for section, panels in layout.sections.items():
        for i, panel in enumerate(panels):
            ax = fig.add_subplot(grid[row + i // ncols, i % ncols])
            many = max(len(s.get(t, [])) for s in runs.values() for t in panel.tags) >= 30
            _draw(ax, runs, panel.tags, bool(logy_rx and logy_rx.search(panel.title)), many)
            ax.set_title(f"[{section}] {panel.title}", fontsize=10)
        row += section_rows[section]
    if title:
        fig.suptitle(title)
    bottom = 0.0
    if layout.constants:
        fig.text(0.01, 0.005, constants_line(layout.constants), fontsize=8, va="bottom", wrap=True)
        bottom = text_height / (3.2 * sum(heights) + text_height) + 0.01
    fig.tight_layout(rect=(0, bottom, 1, 1))
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
    labels: tuple[str, ...] | None = None
    """one legend label per path (each path one run), e.g. "CP 1" "CP 2" "TP 2\""""
    title: str | None = None
    ncols: int = 3
    """panels per row below the loss"""
    logy: str | None = None
    """regex of tags drawn with a log y axis, e.g. 'loss'"""


def main(argv: list[str] | None = None) -> int:
    a = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])

    try:
        runs = load_scalars(list(a.paths), None if a.labels is None else list(a.labels))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 1
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
    layout = plan_layout(runs, tags)
    plot(runs, tags, a.out, a.title, a.ncols, a.logy)
    panels = sum(len(p) for p in layout.sections.values()) + (layout.main_loss is not None)
    print(f"wrote {a.out} ({len(tags)} tags in {panels} panels, {len(layout.constants)} constant, "
          f"{len(runs)} run(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
