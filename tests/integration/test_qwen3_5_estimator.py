"""The Qwen3.5 estimator against measurement: benchmarks/memory.py on 2 CPU ranks (debug shapes, 2K tokens),
peak and activation bytes of the worst rank within 10%. One launch per flavor runs two layouts in turn: dense
CP 2 and TP 2, MoE CP 2 and EP 2 (the full table, CP 1/2/4 with TP / SP / EP: docs/max_context.md)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("flavor,layout", [("debug", "TP 2"), ("debug_moe", "DP 2 x EP 2")])
def test_estimate_within_10_percent_of_measured(tmp_path, flavor, layout):
    from benchmarks.memory import main

    out = tmp_path / "mem.json"
    spelled = {"TP 2": "tp2", "DP 2 x EP 2": "ep2"}[layout]
    assert main(["--model", "qwen3_5", "--flavor", flavor, "--cp_sizes", "2", "--layouts", spelled,
                 "--seq_lens", "2048", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["layout"] for r in rows] == ["CP 2", layout]
    for row in rows:
        assert row["status"] == "ok"
        for key in ("peak_bytes", "activation_bytes"):
            assert abs(row["estimate"][key] / row[key] - 1) < 0.10, (row["layout"], key, row["estimate"][key], row[key])
