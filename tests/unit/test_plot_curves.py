"""tools/plot_curves.py on a tiny fake TensorBoard log."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

ROOT = Path(__file__).resolve().parents[2]
def _load_script():
    from tools import plot_curves

    return plot_curves


# float32-exact values: TensorBoard stores scalars as float32
SERIES = {
    "loss_metrics/global_avg_loss": [(s, 8.0 - 0.25 * s) for s in range(1, 21)],
    "memory/max_active(GiB)": [(s, 1.5 + 0.125 * (s % 3)) for s in range(1, 21)],
    "cp/state_bytes": [(s, 4096.0 * s) for s in range(1, 21)],
    "grad_norm": [(s, 1.0 / s) for s in range(1, 21)],  # not selected by default
}


def _write_run(log_dir: Path, series=SERIES) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(log_dir=str(log_dir))
    for tag, points in series.items():
        for step, value in points:
            w.add_scalar(tag, value, step)
    w.close()


@pytest.fixture
def run_dir(tmp_path):
    # the layout TorchTitan writes: {dump_folder}/tb/<time>/events.out.tfevents.*
    run = tmp_path / "outputs" / "run1"
    _write_run(run / "tb" / "20261101-1200")
    return run


def test_series_read_back_equal(run_dir):
    pc = _load_script()
    dirs = pc.find_run_dirs(run_dir)
    assert dirs == [run_dir / "tb" / "20261101-1200"]
    runs = pc.load_scalars([run_dir])
    assert list(runs) == ["tb/20261101-1200"]
    got = runs["tb/20261101-1200"]
    for tag, points in SERIES.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points]
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6)
    assert pc.select_tags(runs, pc.DEFAULT_TAGS) == [
        "cp/state_bytes", "loss_metrics/global_avg_loss", "memory/max_active(GiB)"
    ]


def test_png_written(run_dir, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert _load_script().main([str(run_dir), "--out", str(out)]) == 0  # the CLI entry point, in-process
    assert "3 tags" in capsys.readouterr().out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # three panels with lines and labels, not an empty canvas
    # the image is not blank: many distinct pixel values
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.shape[0] > 200 and img.shape[1] > 600
    assert len({tuple(px) for px in img.reshape(-1, img.shape[-1])[::97]}) > 20


def test_overlay_two_runs_and_all_tags(tmp_path):
    pc = _load_script()
    a, b = tmp_path / "a", tmp_path / "b"
    _write_run(a / "tb" / "t0")
    _write_run(b / "tb" / "t0", {"loss_metrics/global_avg_loss": [(1, 3.0), (2, 2.5)]})
    runs = pc.load_scalars([a, b])
    assert set(runs) == {"a/tb/t0", "b/tb/t0"}
    assert runs["b/tb/t0"]["loss_metrics/global_avg_loss"] == [(1, 3.0), (2, 2.5)]
    out = pc.plot(runs, pc.select_tags(runs, None), tmp_path / "all.png")
    assert out.stat().st_size > 20_000
    assert pc.main([str(tmp_path / "nothing_here"), "--out", str(tmp_path / "x.png")]) == 1
    assert pc.main([str(a), "--tags", "no_such_tag", "--out", str(tmp_path / "x.png")]) == 1
