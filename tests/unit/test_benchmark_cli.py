"""Every documented command line of the benchmarks parses (the shared tyro flag groups of
benchmarks/model_steps.py): docs/, README.md and the benchmarks' own docstrings. Nothing runs."""

import re
import shlex
from pathlib import Path

import pytest
import tyro

from benchmarks import memory, repeatability, speed
from benchmarks.model_steps import ModelArgs

ROOT = Path(__file__).resolve().parents[2]
COMMAND = re.compile(r"python -m benchmarks\.(speed|memory|repeatability)([^`|#\"'\n]*)")


def documented_commands() -> list[tuple[str, list[str]]]:
    texts = [p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("benchmarks/*.py")]]
    found = {(m.group(1), m.group(2).replace("[--quick]", "--quick").strip()) for t in texts for m in
             COMMAND.finditer(t)}
    return sorted((mod, shlex.split(args)) for mod, args in found)


PARSERS = {"speed": speed.parse_args, "memory": memory.parse_args,
           "repeatability": lambda argv: tyro.cli(repeatability.Args, args=argv)}


def test_documented_command_lines_parse():
    commands = documented_commands()
    assert {mod for mod, _ in commands} == set(PARSERS)
    for mod, argv in commands:
        PARSERS[mod](argv)


def test_shared_flags_mean_the_same_in_every_benchmark():
    argv = ["--model", "gdn", "--flavor", "debug", "--dim", "128", "--exchange", "logscan", "--cp_sizes", "1", "2",
            "--batch", "2", "--threads", "1", "--dtype", "float64", "--q_transition", "keep"]
    s, m = speed.parse_args(argv), memory.parse_args(argv)
    for a in (s, m):
        margs = a.model_args()
        assert isinstance(margs, ModelArgs) and margs.overrides["dim"] == 128 and margs.exchange == "logscan"
        assert a.cp_sizes == (1, 2) and a.batch == 2 and margs.dtype == "float64"
        assert margs.q_transition == margs.config().cp_q_transition == "keep"  # parallelism.cp_q_transition
    qwen = speed.parse_args(["--model", "qwen3_5", "--q_transition", "keep"]).model_args()
    assert qwen.q_transition == qwen.config().cp_q_transition == "keep"
    r = repeatability.speed_args("gdn", 1024, 1, 0, "keep", ab_q_transition=True)
    assert r.q_transition == "keep" and r.ab_q_transition and r.cp_sizes == (2,) and r.layout == "contiguous"
    with pytest.raises(SystemExit):
        speed.parse_args(["--q_transition", "kept"])
    assert speed.parse_args([]).cp_sizes == (1, 2, 4, 8) and speed.parse_args(["--strategies"]).cp_sizes == (2, 4, 8)
    assert memory.parse_args(["--quick"]).seq_lens == (1024, 2048)
    with pytest.raises(SystemExit):
        speed.parse_args(["--model", "qwen3_5", "--strategies"])
    with pytest.raises(SystemExit):
        memory.parse_args(["--no_such_flag", "1"])


def test_qwen3_5_layout_reaches_the_launch(monkeypatch):
    """--qwen3_5_layout (default zigzag) reaches the Qwen3.5 launch's speed arguments; the GDN model stays contiguous."""
    launched = []

    def one_launch(model, L, repeats, warmup, q_transition, ab_q_transition, layout):
        a = repeatability.speed_args(model, L, repeats, warmup, q_transition, ab_q_transition, layout)
        launched.append((model, a.layout, a.model_args().layout))
        raise SystemExit(0)  # stop before anything runs

    monkeypatch.setattr(repeatability, "one_launch", one_launch)
    monkeypatch.setattr(repeatability, "core_probe", lambda cores: {})
    for argv, expected in ((["--models", "qwen3_5"], "zigzag"),
                           (["--models", "qwen3_5", "--qwen3_5_layout", "contiguous"], "contiguous"),
                           (["--models", "gdn", "--qwen3_5_layout", "zigzag"], "contiguous")):
        with pytest.raises(SystemExit):
            repeatability.main(argv)
        assert launched.pop() == (argv[1], expected, expected), argv
    assert "--layout" in repeatability.speed_argv("qwen3_5", 2048, 1, 0, layout="zigzag")


def test_unknown_qwen3_5_layout_is_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as refused:
        tyro.cli(repeatability.Args, args=["--qwen3_5_layout", "diagonal"])
    assert refused.value.code != 0
    err = capsys.readouterr().err
    assert "qwen3" in err and "layout" in err and "zigzag" in err
