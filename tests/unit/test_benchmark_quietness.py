"""The speed benchmark's quietness verdict (benchmarks.timing.quietness) on hand-made core probes: no timing."""

from benchmarks.timing import quietness


def _probe(one=40.0, parallelism=2.0, load=0.1):
    return {"one_process_gflops": one, "effective_parallelism": parallelism, "load_average": load}


def test_quiet_machine_passes():
    v = quietness(_probe(), _probe(one=41.0), cores=2)
    assert v == {"quiet": True, "checked": True, "reasons": []}


def test_each_busy_sign_is_named():
    v = quietness(_probe(parallelism=1.3, load=8.4), _probe(one=30.0, parallelism=1.9), cores=2)
    assert not v["quiet"]
    text = " ".join(v["reasons"])
    assert "start: effective parallelism 1.30 < 1.80" in text and "end:" not in text
    assert "load average 8.4" in text and "drifted 25%" in text


def test_missing_probe_is_unchecked_not_quiet():
    assert quietness({}, None, cores=2) == {"quiet": False, "checked": False,
                                             "reasons": ["no core probe (GPU or --no_probe)"]}
