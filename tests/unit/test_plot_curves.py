"""tools/plot_curves.py on a tiny fake TensorBoard log."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

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

# The tags a CP 2 run writes (titan_cp's per-rank memory and CP bytes, TorchTitan's counters).
CP2_SERIES = {
    "loss_metrics/global_avg_loss": [(s, 8.0 - 0.25 * s) for s in range(1, 11)],
    "loss_metrics/global_max_loss": [(s, 8.5 - 0.25 * s) for s in range(1, 11)],
    "memory/peak(GiB)/rank0": [(s, 0.5 + 0.0625 * (s % 2)) for s in range(1, 11)],
    "memory/peak(GiB)/rank1": [(s, 0.625 + 0.0625 * (s % 2)) for s in range(1, 11)],
    "memory/peak(GiB)/max": [(s, 0.6875) for s in range(1, 11)],  # constant: summarised
    "memory/num_ooms": [(s, 0.0) for s in range(1, 11)],
    "cp/bytes_sent_per_step/rank0": [(s, 188512.0 + 64 * s) for s in range(1, 11)],
    "cp/bytes_sent_per_step/rank1": [(s, 188512.0) for s in range(1, 11)],  # constant, its panel stays
    "cp/rounds_per_step/rank0": [(s, 8.0) for s in range(1, 11)],
    "cp/rounds_per_step/rank1": [(s, 8.0) for s in range(1, 11)],
    "grad_norm": [(s, 1.0 / s) for s in range(1, 11)],
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


def test_layout_loss_first_groups_and_constants():
    pc = _load_script()
    runs = {"cp2": CP2_SERIES}
    layout = pc.plan_layout(runs, pc.select_tags(runs, pc.DEFAULT_TAGS))
    assert layout.main_loss == "loss_metrics/global_avg_loss"
    assert list(layout.sections) == ["loss", "memory", "cp"]  # grad_norm is not selected by default
    titles = {s: [(p.title, p.tags) for p in panels] for s, panels in layout.sections.items()}
    assert titles["loss"] == [("loss_metrics/global_max_loss", ["loss_metrics/global_max_loss"])]
    # per-rank series share one panel; a constant member of a varying group is summarised
    assert titles["memory"] == [("memory/peak(GiB)", ["memory/peak(GiB)/rank0", "memory/peak(GiB)/rank1"])]
    assert titles["cp"] == [("cp/bytes_sent_per_step", ["cp/bytes_sent_per_step/rank0"])]
    assert layout.constants == {"cp/bytes_sent_per_step/rank1": 188512.0, "cp/rounds_per_step/rank0": 8.0,
                                "cp/rounds_per_step/rank1": 8.0, "memory/num_ooms": 0.0,
                                "memory/peak(GiB)/max": 0.6875}
    assert pc.constants_line(layout.constants) == (
        "constant in every run: cp/bytes_sent_per_step/{rank1} = 188512; cp/rounds_per_step/{rank0,rank1} = 8; "
        "memory/num_ooms = 0; memory/peak(GiB)/{max} = 0.6875")
    every = pc.plan_layout(runs, pc.select_tags(runs, None))
    assert [p.title for p in every.sections["other"]] == ["grad_norm"]


def test_constant_only_if_constant_in_every_run():
    pc = _load_script()
    other = {tag: [(s, v + (1.0 if tag == "memory/num_ooms" and s == 3 else 0.0)) for s, v in pts]
             for tag, pts in CP2_SERIES.items()}
    runs = {"a": CP2_SERIES, "b": other}
    assert pc.constant_value(runs, "memory/num_ooms") is None  # one OOM in run b: drawn
    assert pc.constant_value(runs, "cp/rounds_per_step/rank0") == 8.0
    assert pc.constant_value({"a": {"t": [(1, 2.0), (2, 2.0 + 1e-6)]}}, "t") is None
    assert pc.constant_value({"a": {}}, "t") is None
    layout = pc.plan_layout(runs, pc.select_tags(runs, pc.DEFAULT_TAGS))
    assert "memory/num_ooms" in [p.title for p in layout.sections["memory"]]


def test_overlay_png_with_labels_and_difference_panel(tmp_path, capsys):
    pc = _load_script()
    paths = []
    for name, shift in (("cp1", 0.0), ("cp2", 2.0**-20), ("tp2", -(2.0**-20))):
        series = {tag: [(s, v + shift) if "loss" in tag else (s, v) for s, v in pts] for tag, pts in CP2_SERIES.items()}
        _write_run(tmp_path / name / "tb" / "t0", series)
        paths.append(str(tmp_path / name))
    out = tmp_path / "overlay.png"
    assert pc.main([*paths, "--labels", "CP 1", "CP 2", "TP 2", "--tags", "global_avg_loss", "--out", str(out)]) == 0
    assert "1 tags in 1 panels, 0 constant, 3 run(s)" in capsys.readouterr().out
    assert out.stat().st_size > 20_000
    runs = pc.load_scalars([Path(p) for p in paths], ["CP 1", "CP 2", "TP 2"])
    assert list(runs) == ["CP 1", "CP 2", "TP 2"]
    # one label per path, each path one run
    assert pc.main([*paths, "--labels", "CP 1", "--out", str(out)]) == 1
    assert "1 labels for 3 paths" in capsys.readouterr().err
