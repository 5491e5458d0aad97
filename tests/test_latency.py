"""ortq.validate.latency: warm-up, alternated A B / B A timing and the figures derived from it."""

from __future__ import annotations

import numpy as np
import pytest

from ortq.errors import CalibrationDataError
from ortq.validate.latency import measure_latency


class _Input:
    def __init__(self, name: str) -> None:
        self.name = name


class _FakeSession:
    """Records every run in a shared log; each run 'takes' nothing measurable."""

    def __init__(self, label: str, log: list[tuple[str, tuple[str, ...]]], inputs=("x",)) -> None:
        self.label, self.log, self.inputs = label, log, inputs

    def get_inputs(self):
        return [_Input(n) for n in self.inputs]

    def run(self, names, feed):
        self.log.append((self.label, tuple(sorted(feed))))
        return []


def test_warmup_then_alternating_order_and_per_session_feeds():
    log: list = []
    ref, q = _FakeSession("R", log), _FakeSession("Q", log, inputs=("x", "mask"))
    feed = {"x": np.zeros((4, 3)), "mask": np.ones((4, 3)), "extra": np.zeros(2)}
    out = measure_latency(ref, q, feed, warmup_runs=2, runs=3)
    order = "".join(label for label, _ in log)
    assert order == "RQ" + "RQ" + "RQ" + "QR" + "RQ"  # first runs, 1 more warm-up, then A B / B A / A B
    assert {keys for label, keys in log if label == "R"} == {("x",)}
    assert {keys for label, keys in log if label == "Q"} == {("mask", "x")}
    assert out["batch_size"] == 4 and out["runs"] == 3 and out["warmup_runs"] == 2
    for which in ("reference", "quantized"):
        s = out[which]
        assert s["min_ms"] <= s["median_ms"] <= s["p90_ms"]
        assert set(s) == {"first_run_ms", "warmup_ms", "median_ms", "p90_ms", "min_ms", "mean_ms", "throughput_per_s"}
    if out["ratio"] is not None:
        assert out["ratio"] == pytest.approx(out["quantized"]["median_ms"] / out["reference"]["median_ms"])


def test_no_timed_runs_falls_back_on_warmup():
    log: list = []
    out = measure_latency(_FakeSession("R", log), _FakeSession("Q", log), {"x": np.zeros((2, 1))}, warmup_runs=1, runs=0)
    assert len(log) == 2 and out["runs"] == 0
    assert out["reference"]["median_ms"] == out["reference"]["first_run_ms"]
    assert out["pairwise_ratio_median"] == out["ratio"]


def test_missing_input_is_a_data_error():
    log: list = []
    with pytest.raises(CalibrationDataError, match="mask"):
        measure_latency(_FakeSession("R", log), _FakeSession("Q", log, ("x", "mask")), {"x": np.zeros(1)},
                        warmup_runs=1, runs=1)


def test_fastest_alternated_warms_each_session_then_alternates_and_keeps_the_fastest(monkeypatch):
    from ortq.validate import latency

    clock, calls = [0.0], []

    class Fake:  # each run advances a fake clock by its next duration
        def __init__(self, name, seconds):
            self.name, self.seconds = name, list(seconds)

        def run(self, outputs, feed):
            calls.append(self.name)
            clock[0] += self.seconds.pop(0)

    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock[0])
    best = latency.fastest_alternated({"a": Fake("a", [9, 2, 0.5, 3]), "b": Fake("b", [9, 1, 2, 1.5])},
                                      {"x": np.zeros(1)}, rounds=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert best == {"a": 0.5, "b": 1.0}
