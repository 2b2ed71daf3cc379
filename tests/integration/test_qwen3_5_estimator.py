"""The Qwen3.5 estimator against measurement: benchmarks/memory.py on 2 CPU ranks (debug dense shape, CP 2),
peak and activation bytes per rank within 10% (the full table, dense and MoE, CP 1/2/4: docs/max_context.md)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("flavor", ["debug", "debug_moe"])
def test_estimate_within_10_percent_of_measured(tmp_path, flavor):
    from benchmarks.memory import main

    out = tmp_path / "mem.json"
    assert main(["--model", "qwen3_5", "--flavor", flavor, "--cp_sizes", "2", "--seq_lens", "2048",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok"
    for key in ("peak_bytes", "activation_bytes"):
        assert abs(row["estimate"][key] / row[key] - 1) < 0.10, (key, row["estimate"][key], row[key])
