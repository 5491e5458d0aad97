"""Latency of a quantized model against its reference on the same provider, timed so that the two are
comparable on a busy or drifting machine."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ortq.runtime import batch_size_of, feed_for

__all__ = ["combine_latency", "fastest_alternated", "measure_latency", "time_session"]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _time_run(session, feed: Mapping[str, np.ndarray]) -> float:
    t0 = time.perf_counter()
    session.run(None, feed)
    return (time.perf_counter() - t0) * 1e3


def measure_latency(
    reference_session, quantized_session, feed: Mapping[str, np.ndarray], *, warmup_runs: int, runs: int
) -> dict[str, Any]:
    """Warm both sessions, then alternate reference / quantized runs (A B, B A, ...) on ``feed``.

    Each session gets the graph inputs it takes from ``feed`` (:func:`ortq.runtime.feed_for`), so the two
    graphs may differ in optional inputs. Every run fetches all outputs, as an application would.

    Args:
        reference_session: the fp32 model's ``InferenceSession``.
        quantized_session: the quantized model's session on the same provider.
        feed: one batch; its leading axis is the batch size the throughput is given for.
        warmup_runs: untimed runs per model (at least the first one is always made and reported).
        runs: timed runs per model; with 0 the warm-up runs stand in for the statistics.

    Returns:
        ``batch_size``, ``warmup_runs``, ``runs``; ``reference`` and ``quantized`` stats (``first_run_ms``,
        ``warmup_ms``, ``median_ms``, ``p90_ms``, ``min_ms``, ``mean_ms``, ``throughput_per_s`` in samples per
        second at the median); ``ratio`` (quantized / reference median), ``speedup`` (its inverse) and
        ``pairwise_ratio_median`` (median of the per-pair ratios).
    """
    n = batch_size_of(feed)
    sessions = {"reference": reference_session, "quantized": quantized_session}
    feeds = {which: feed_for(sess, feed) for which, sess in sessions.items()}

    def timed(which: str) -> float:
        return _time_run(sessions[which], feeds[which])

    first = {"reference": timed("reference"), "quantized": timed("quantized")}
    warm = {"reference": [first["reference"]], "quantized": [first["quantized"]]}
    for _ in range(max(0, warmup_runs - 1)):
        warm["reference"].append(timed("reference"))
        warm["quantized"].append(timed("quantized"))
    times: dict[str, list[float]] = {"reference": [], "quantized": []}
    for i in range(runs):
        order = ("reference", "quantized") if i % 2 == 0 else ("quantized", "reference")
        for which in order:
            times[which].append(timed(which))
    return combine_latency(n, warmup_runs, runs, {w: (first[w], warm[w], times[w]) for w in sessions})


def fastest_alternated(sessions: Mapping[str, Any], feed: Mapping[str, np.ndarray], rounds: int) -> dict[str, float]:
    """The fastest of ``rounds`` runs of each session on ``feed``, in seconds, the sessions alternated in each
    round (A B C, A B C, ...) after one untimed run each: the benchmarks' speed comparison of several variants
    of one model."""
    for s in sessions.values():
        s.run(None, feed)
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def time_session(session, feed: Mapping[str, np.ndarray], *, warmup_runs: int, runs: int):
    """One model timed alone (``(first_ms, warm-up ms, timed ms)``), for models too large to hold two sessions
    of: see :func:`combine_latency`."""
    feed = feed_for(session, feed)
    warm = [_time_run(session, feed) for _ in range(max(1, warmup_runs))]
    return warm[0], warm, [_time_run(session, feed) for _ in range(runs)]


def combine_latency(n: int, warmup_runs: int, runs: int, timed: Mapping[str, tuple[float, list, list]]) -> dict[str, Any]:
    """The latency entry from each model's ``(first_ms, warm-up ms, timed ms)`` (``reference``, ``quantized``)."""
    first = {w: t[0] for w, t in timed.items()}
    warm = {w: t[1] for w, t in timed.items()}
    times = {w: t[2] for w, t in timed.items()}
    out: dict[str, Any] = {"batch_size": n, "warmup_runs": warmup_runs, "runs": runs}
    for which in ("reference", "quantized"):
        t = times[which] or warm[which]
        med = _percentile(t, 50)
        out[which] = {
            "first_run_ms": first[which],
            "warmup_ms": float(np.mean(warm[which])),
            "median_ms": med,
            "p90_ms": _percentile(t, 90),
            "min_ms": float(np.min(t)),
            "mean_ms": float(np.mean(t)),
            "throughput_per_s": n / (med / 1e3) if med > 0 else None,
        }
    r_med, q_med = out["reference"]["median_ms"], out["quantized"]["median_ms"]
    out["ratio"] = q_med / r_med if r_med > 0 else None
    out["speedup"] = r_med / q_med if q_med > 0 else None
    pairs = [q / r for q, r in zip(times["quantized"], times["reference"], strict=True) if r > 0]
    out["pairwise_ratio_median"] = float(np.median(pairs)) if pairs else out["ratio"]
    return out
