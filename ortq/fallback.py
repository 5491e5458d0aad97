"""Keep the fewest quantized nodes in float that bring a static int8 model within an accuracy budget.

The budget is a largest cosine drop of the outputs against fp32 (``max_cosine_drop``: ``1 - cosine``, the
cosine being the mean per-sample cosine of the worst output, padding left out), a user metric
(``eval_fn(model_path) -> float``, higher is better, with ``min_metric`` and/or ``max_metric_drop`` against
the fp32 model's score), or both. It is checked on the batches given, which should be calibration-side data,
never the held-out set the model is validated on.

The search, with at most ``max_evaluations`` candidate models built and run:

1. the all-int8 model; if it meets the budget, nothing stays in float;
2. rank the quantized nodes by the error each one adds (:func:`ortq.validate.layer_report`, lowest local
   SQNR first), then measure the gain of keeping each of the ``num_probes`` first ones alone in float and
   move the most useful to the front;
3. keep the first k of that order in float for growing k (1, 2, 3, ... then doubling steps), and once a k
   meets the budget, bisect down to the smallest k that does.

Each candidate's accuracy and its latency against fp32 (warm sessions, alternated runs, 2 threads, as
:mod:`ortq.validate` measures it) are recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ortq.calibrators.base import TensorRange
from ortq.config import QuantizationConfig
from ortq.errors import ConfigError
from ortq.fallback_sim import Simulator
from ortq.io import TOKENIZER_FILES, save_ir_model
from ortq.passes.insert_qdq import InsertQDQPass
from ortq.passes.plan import QuantPlan, make_plan
from ortq.runtime import (
    SessionSettings,
    attention_mask_of,
    create_session,
    feed_for,
    float_outputs,
    run_batches,
)
from ortq.validate import LayerReport, layer_report, measure_latency, sample_cosines

logger = logging.getLogger(__name__)

EvalFn = Callable[[Path], float]


def budget_reason(max_cosine_drop: float | None, min_metric: float | None = None) -> str:
    """The reason recorded in the plan for a node the budget keeps in float."""
    parts = []
    if max_cosine_drop is not None:
        parts.append(f"cosine drop {max_cosine_drop:g}")
    if min_metric is not None:
        parts.append(f"metric >= {min_metric:g}")
    return f"kept in float by the accuracy budget ({', '.join(parts)})"


@dataclass
class Candidate:
    """One model tried: the nodes kept in float, its accuracy on the budget batches and its speed."""

    kept_float: tuple[str, ...]
    stage: str
    cosine_drop: float
    metric: float | None
    latency_ratio: float | None
    meets_budget: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept_float": list(self.kept_float),
            "num_kept_float": len(self.kept_float),
            "stage": self.stage,
            "cosine_drop": self.cosine_drop,
            "metric": self.metric,
            "latency_ratio": self.latency_ratio,
            "meets_budget": self.meets_budget,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class FallbackResult:
    """What :func:`search_fallback` chose and everything it tried."""

    plan: QuantPlan
    model: ir.Model
    chosen: Candidate
    candidates: list[Candidate]
    simulated: list[dict[str, Any]]
    ranking: list[str]
    met: bool
    budget: dict[str, Any]
    reference_metric: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kept_float(self) -> tuple[str, ...]:
        return self.chosen.kept_float

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": dict(self.budget),
            "met": self.met,
            "kept_float": list(self.chosen.kept_float),
            "chosen": self.chosen.to_dict(),
            "reference_metric": self.reference_metric,
            "ranking": list(self.ranking),
            "num_evaluations": len(self.candidates),
            "candidates": [c.to_dict() for c in self.candidates],
            "simulated": list(self.simulated),
            "notes": list(self.notes),
        }


def _session(model: ir.Model | str, threads: int):
    return create_session(model, settings=SessionSettings(threads=threads), what="a fallback candidate")


class _Evaluator:
    """Builds candidate models from one fp32 model, plan config and ranges, and scores them."""

    def __init__(
        self,
        fp32: ir.Model,
        config: QuantizationConfig,
        ranges: Mapping[str, TensorRange],
        batches: Sequence[Mapping[str, np.ndarray]],
        *,
        max_cosine_drop: float | None,
        eval_fn: EvalFn | None,
        min_metric: float | None,
        work_dir: Path,
        side_files_from: Path | None,
        threads: int,
        latency_runs: int,
    ):
        self.fp32 = fp32
        self.config = config
        self.ranges = ranges
        self.batches = batches
        self.max_cosine_drop = max_cosine_drop
        self.eval_fn = eval_fn
        self.min_metric = min_metric
        self.work_dir = work_dir
        self.side_files_from = side_files_from
        self.threads = threads
        self.latency_runs = latency_runs
        self.reference = _session(fp32, threads)
        self.outputs = float_outputs(self.reference)
        self.reference_outputs = [outs for _, outs in run_batches(self.reference, batches, self.outputs)]
        self.cache: dict[frozenset[str], Candidate] = {}
        self.candidates: list[Candidate] = []
        self.count = 0

    def build(self, kept_float: Sequence[str]) -> tuple[ir.Model, QuantPlan]:
        model = self.fp32.clone()
        config = dataclasses.replace(
            self.config, nodes_to_exclude=tuple(self.config.nodes_to_exclude) + tuple(kept_float)
        )
        plan = make_plan(model, config, self.ranges)
        reason = budget_reason(self.max_cosine_drop, self.min_metric)
        kept = set(kept_float)
        for d in plan.decisions:
            if d.name in kept:
                d.reason = reason
        InsertQDQPass(plan)(model)
        return model, plan

    def _write(self, model: ir.Model, index: int) -> Path:
        return _write_model(model, self.work_dir / f"candidate_{index}", self.side_files_from)

    def evaluate(self, kept_float: Sequence[str], stage: str) -> Candidate:
        """Build one candidate, score it on all batches, time it against fp32."""
        key = frozenset(kept_float)
        if key in self.cache:
            return self.cache[key]
        start = time.perf_counter()
        self.count += 1
        model, _ = self.build(kept_float)
        eval_fn = self.eval_fn
        path = self._write(model, self.count) if eval_fn is not None else None
        sess = _session(str(path) if path is not None else model, self.threads)
        per_output: dict[str, list[float]] = {o: [] for o in self.outputs}
        runs = run_batches(sess, self.batches, self.outputs, what="a budget batch")
        for (feed, got), ref in zip(runs, self.reference_outputs, strict=True):
            mask = attention_mask_of(feed)
            for o in self.outputs:
                per_output[o].extend(sample_cosines(ref[o], got[o], mask))
        worst = min((float(np.mean(c)) for c in per_output.values() if c), default=1.0)
        drop = max(0.0, 1.0 - worst)
        metric = float(eval_fn(path)) if eval_fn is not None else None
        latency = None
        if self.latency_runs > 0:
            lat = measure_latency(
                self.reference, sess, feed_for(sess, self.batches[0]), warmup_runs=1, runs=self.latency_runs
            )
            latency = lat.get("pairwise_ratio_median")
        ok = self.meets(drop, metric)
        cand = Candidate(tuple(kept_float), stage, drop, metric, latency, ok, time.perf_counter() - start)
        logger.info(
            "fallback %-8s %2d in float: cosine drop %.5f%s%s -> %s",
            stage,
            len(kept_float),
            drop,
            f", metric {metric:.5f}" if metric is not None else "",
            f", latency x{latency:.2f}" if latency is not None else "",
            "meets the budget" if ok else "over budget",
        )
        self.cache[key] = cand
        self.candidates.append(cand)
        return cand

    def meets(self, drop: float, metric: float | None) -> bool:
        if self.max_cosine_drop is not None and not drop <= self.max_cosine_drop:
            return False
        if self.min_metric is not None and (metric is None or not metric >= self.min_metric):
            return False
        return True


def _growing_sizes(start: int, total: int) -> list[int]:
    """start, start + 1, then steps that double: the sizes tried while growing the float set."""
    sizes, k, step = [], max(1, start), 1
    while True:
        sizes.append(min(k, total))
        if k >= total:
            return sizes
        k += step
        step *= 2


def search_fallback(
    fp32_model: ir.Model | onnx.ModelProto | str | os.PathLike,
    config: QuantizationConfig,
    ranges: Mapping[str, TensorRange],
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    max_cosine_drop: float | None = None,
    eval_fn: EvalFn | None = None,
    min_metric: float | None = None,
    max_metric_drop: float | None = None,
    max_evaluations: int = 6,
    num_probes: int = 48,
    max_simulations: int = 8,
    probe_samples: int = 8,
    threads: int = 2,
    latency_runs: int = 3,
    side_files_from: str | os.PathLike | None = None,
    sensitivity: LayerReport | None = None,
) -> FallbackResult:
    """Find the fewest nodes to keep in float so that the quantized model meets the accuracy budget.

    Args:
        fp32_model: the float model (as calibrated; SmoothQuant already applied if used).
        config: the static quantization config; its ``nodes_to_exclude`` stay excluded.
        ranges: calibrated activation ranges (unchanged by which nodes stay float).
        batches: calibration-side feeds the budget is checked on; not the held-out validation set.
        max_cosine_drop: largest allowed ``1 - cosine`` of the worst output (mean over samples).
        eval_fn: ``eval_fn(model_path) -> float``, higher is better; the path is a ``model.onnx`` in a folder
            with the tokenizer files of ``side_files_from``.
        min_metric: smallest allowed ``eval_fn`` score.
        max_metric_drop: largest allowed drop of the score below the fp32 model's.
        max_evaluations: most candidate models built and scored on all ``batches`` (the all-int8 one
            included).
        num_probes: nodes whose gain alone in float is measured (simulated, on ``probe_samples`` samples); with
            more quantized nodes than this, those with the lowest local SQNR are probed.
        max_simulations: simulated runs on all ``batches`` to find how many nodes the cosine budget needs.
        probe_samples: samples the probes run on (the first ones of ``batches``).
        threads: ONNX Runtime intra-op threads (accuracy and latency).
        latency_runs: timed runs per candidate and the fp32 model, alternated (0: no latency).
        side_files_from: a folder whose tokenizer / config files are copied beside each candidate.
        sensitivity: a layer report of the all-int8 model on ``batches``, if already computed.

    Returns:
        A :class:`FallbackResult`: the model and plan chosen (the budget's nodes carry the reason
        ``kept in float by the accuracy budget (...)``), whether the budget was met, and every candidate.
        When no candidate within ``max_evaluations`` meets the budget, the most accurate one is returned
        with ``met`` False.
    """
    if max_cosine_drop is None and eval_fn is None:
        raise ConfigError("search_fallback needs max_cosine_drop and/or eval_fn")
    if max_cosine_drop is not None and not (0.0 <= max_cosine_drop < 1.0):
        raise ConfigError(f"max_cosine_drop must be in [0, 1), got {max_cosine_drop}")
    if eval_fn is not None and min_metric is None and max_metric_drop is None:
        raise ConfigError("eval_fn needs min_metric or max_metric_drop")
    if eval_fn is None and (min_metric is not None or max_metric_drop is not None):
        raise ConfigError("min_metric / max_metric_drop need eval_fn")
    if max_evaluations < 1 or num_probes < 1 or probe_samples < 1 or max_simulations < 1:
        raise ConfigError("max_evaluations, max_simulations, num_probes and probe_samples must be >= 1")
    batches = list(batches)
    if not batches:
        raise ConfigError("search_fallback needs at least one batch of calibration-side data")
    if not isinstance(config, QuantizationConfig):
        raise ConfigError("the accuracy-budget fallback works on static int8 configs")
    if isinstance(fp32_model, ir.Model):
        fp32 = fp32_model
    elif isinstance(fp32_model, onnx.ModelProto):
        fp32 = ir.from_proto(fp32_model)
    else:
        fp32 = ir.load(str(fp32_model))
    side = Path(side_files_from) if side_files_from is not None else None

    with tempfile.TemporaryDirectory(prefix="ortq-fallback-") as tmp:
        work = Path(tmp)
        reference_metric = None
        if eval_fn is not None and max_metric_drop is not None:
            reference_metric = float(eval_fn(_write_model(fp32, work / "fp32", side)))
            floor = reference_metric - float(max_metric_drop)
            min_metric = floor if min_metric is None else max(min_metric, floor)
        ev = _Evaluator(
            fp32,
            config,
            ranges,
            batches,
            max_cosine_drop=max_cosine_drop,
            eval_fn=eval_fn,
            min_metric=min_metric,
            work_dir=work,
            side_files_from=side,
            threads=threads,
            latency_runs=latency_runs,
        )
        budget = {"max_cosine_drop": max_cosine_drop, "min_metric": min_metric, "max_metric_drop": max_metric_drop,
                  "samples": sum(int(np.shape(next(iter(b.values())))[0]) for b in batches if b)}
        notes: list[str] = []
        base = ev.evaluate((), "all-int8")
        ranking: list[str] = []
        chosen = base
        simulated: list[dict[str, Any]] = []
        if not base.meets_budget and max_evaluations > 1:
            _, plan0 = ev.build(())
            sim = Simulator(fp32, plan0, batches, ev.reference_outputs, ev.outputs, threads)
            nodes = list(plan0.quantized_nodes)
            candidates = nodes
            if len(nodes) > num_probes:  # too many to probe: probe those that add the most error themselves
                if sensitivity is None:
                    model0, _ = ev.build(())
                    sensitivity = layer_report(
                        fp32, model0, plan0, batches[:1], threads=threads, data="budget batches"
                    )
                candidates = [x.name for x in sorted(sensitivity.layers, key=lambda x: -x.local_noise)][:num_probes]
            quick = sim.quick_batches(probe_samples)
            quick_base = sim.drop((), quick)
            gains = {n: quick_base - sim.drop((n,), quick) for n in candidates}
            ranking = sorted(candidates, key=lambda n: -gains[n]) + [n for n in nodes if n not in gains]
            notes.append(
                f"simulated gain of keeping each node alone in float (cosine drop {quick_base:.5f} all-int8 on "
                f"{sum(len(next(iter(f.values()))) for f, _ in quick)} samples): "
                + ", ".join(f"{n} {gains[n]:+.5f}" for n in ranking if n in gains)
            )
            start_k = 1
            if max_cosine_drop is not None:
                start_k = _simulated_size(sim, ranking, gains, quick_base, max_cosine_drop, max_simulations, simulated)
            chosen = _search(ev, base, ranking, start_k, max_evaluations)
            notes.append(
                f"{sim.evaluations} simulated runs, {ev.count} candidate models built and scored, "
                f"{len(candidates)} nodes probed"
            )
        met = chosen.meets_budget
        if not met:
            notes.append(
                f"no candidate within {max_evaluations} evaluations met the budget; the most accurate one "
                f"tried is kept ({len(chosen.kept_float)} nodes in float, cosine drop {chosen.cosine_drop:.5f})"
            )
            logger.warning(notes[-1])
        model, plan = ev.build(chosen.kept_float)
        return FallbackResult(
            plan=plan,
            model=model,
            chosen=chosen,
            candidates=list(ev.candidates),
            simulated=simulated,
            ranking=ranking,
            met=met,
            budget=budget,
            reference_metric=reference_metric,
            notes=notes,
        )


def _score(c: Candidate) -> tuple[float, float]:
    """Smaller is more accurate: the metric first when there is one, then the cosine drop."""
    return (-c.metric if c.metric is not None else 0.0, c.cosine_drop)


def _simulated_size(
    sim: Simulator,
    ranking: list[str],
    gains: Mapping[str, float],
    quick_base: float,
    budget: float,
    max_simulations: int,
    log: list[dict[str, Any]],
) -> int:
    """The smallest k such that keeping ``ranking[:k]`` in float meets ``budget`` in simulation, starting from
    the k the measured gains predict (assumed additive), then growing or bisecting (at most
    ``max_simulations`` runs on all batches)."""
    total = len(ranking)
    cum, k_pred = quick_base, total
    for i, n in enumerate(ranking):
        cum -= max(gains.get(n, 0.0), 0.0)
        if cum <= budget:
            k_pred = i + 1
            break
    lo, hi = 0, None  # largest k known to fail, smallest known to pass
    k, step = k_pred, 1
    for _ in range(max_simulations):
        drop = sim.drop(ranking[:k])
        log.append({"num_kept_float": k, "cosine_drop": drop, "meets_budget": drop <= budget})
        if drop <= budget:
            hi = k
        else:
            lo = k
        if hi is None:
            if k >= total:
                return total
            k, step = min(total, k + step), step * 2
        elif hi - lo <= 1:
            return hi
        else:
            k = (lo + hi) // 2
    return hi if hi is not None else min(total, k)


def _search(ev: _Evaluator, base: Candidate, ranking: list[str], start_k: int, max_evaluations: int) -> Candidate:
    """Real models from ``ranking[:start_k]`` upward until one meets the budget; then bisect down to the last
    size that failed (sizes below ``start_k`` are not tried: the simulation ruled them out)."""

    def left() -> int:
        return max_evaluations - ev.count

    best = base
    failed_k, met = start_k - 1, None
    for k in _growing_sizes(start_k, len(ranking)):
        if left() <= 0:
            break
        c = ev.evaluate(tuple(ranking[:k]), "grow" if k > start_k else "predicted")
        best = min(best, c, key=_score)
        if c.meets_budget:
            met = (k, c)
            break
        failed_k = k
    if met is None:
        return best
    lo, (hi, hi_c) = failed_k, met
    while hi - lo > 1 and left() > 0:
        mid = (lo + hi) // 2
        c = ev.evaluate(tuple(ranking[:mid]), "bisect")
        if c.meets_budget:
            hi, hi_c = mid, c
        else:
            lo = mid
    return hi_c


def split_rows(feeds: Sequence[Mapping[str, np.ndarray]], fraction: float) -> tuple[list[dict], list[dict]]:
    """Split batches of feeds into (kept, held) by samples: the last ``fraction`` of the samples (at least one
    row, at most all but one) go to ``held``; batches are cut where the boundary falls."""
    sizes = [int(np.shape(next(iter(f.values())))[0]) for f in feeds]
    total = sum(sizes)
    if total < 2:
        raise ConfigError("the accuracy budget needs at least 2 calibration samples (some are set aside to check it)")
    n_held = min(total - 1, max(1, round(total * fraction)))
    boundary = total - n_held
    kept, held, seen = [], [], 0
    for feed, n in zip(feeds, sizes, strict=True):
        if seen + n <= boundary:
            kept.append(dict(feed))
        elif seen >= boundary:
            held.append(dict(feed))
        else:
            cut = boundary - seen
            kept.append({k: v[:cut] for k, v in feed.items()})
            held.append({k: v[cut:] for k, v in feed.items()})
        seen += n
    return kept, held


def _write_model(model: ir.Model, folder: Path, side_files_from: Path | None) -> Path:
    """``folder/model.onnx`` (weights external above the protobuf limit) with the side files of
    ``side_files_from``, for ``eval_fn``."""
    folder.mkdir()
    path = folder / "model.onnx"
    save_ir_model(model, path)
    if side_files_from is not None:
        for name in TOKENIZER_FILES:
            if (side_files_from / name).is_file():
                shutil.copyfile(side_files_from / name, folder / name)
    return path
