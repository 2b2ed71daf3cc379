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


def test_back_to_back_run_is_judged_by_its_probes_not_the_load_its_predecessor_left():
    after_previous_run = _probe(load=1.7)  # the previous run's two ranks are still in the 1-minute average
    assert quietness(after_previous_run, _probe(), cores=2, check_load=False)["quiet"]
    busy = quietness(_probe(load=1.7, parallelism=1.2), _probe(), cores=2, check_load=False)
    assert not busy["quiet"] and "load average" not in " ".join(busy["reasons"])
