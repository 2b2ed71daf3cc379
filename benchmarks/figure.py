"""The figure-saving tail the benchmark scripts share."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: Path, footer: str) -> None:
    """Write ``fig`` to ``path`` (PNG, 120 dpi) with ``footer`` (model, machine) in small print at the bottom."""
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.005, footer, fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
