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
from ortq.errors import ConfigError, ModelError
from ortq.io import TOKENIZER_FILES, save_model
from ortq.passes.grid import dequantized_weight
from ortq.passes.insert_qdq import insert_qdq
from ortq.passes.plan import QuantPlan, ensure_node_names, make_plan
from ortq.runtime import attention_mask_of
from ortq.validate import LayerReport, layer_report, sample_cosines

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


def _session(model: onnx.ModelProto | str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelError(f"onnxruntime cannot load a fallback candidate ({msg})") from exc


def _float_outputs(sess) -> list[str]:
    return [o.name for o in sess.get_outputs() if "float" in (o.type or "") or "double" in (o.type or "")]


def _feed(sess, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: feed[i.name] for i in sess.get_inputs()}


class _Evaluator:
    """Builds candidate models from one fp32 model, plan config and ranges, and scores them."""

    def __init__(
        self,
        fp32: onnx.ModelProto,
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
        self.outputs = _float_outputs(self.reference)
        self.reference_outputs = [
            dict(zip(self.outputs, self.reference.run(self.outputs, _feed(self.reference, b)), strict=True))
            for b in batches
        ]
        self.cache: dict[frozenset[str], Candidate] = {}
        self.candidates: list[Candidate] = []
        self.count = 0

    def build(self, kept_float: Sequence[str]) -> tuple[ir.Model, QuantPlan]:
        model = ir.from_proto(self.fp32)
        config = dataclasses.replace(
            self.config, nodes_to_exclude=tuple(self.config.nodes_to_exclude) + tuple(kept_float)
        )
        plan = make_plan(model, config, self.ranges)
        reason = budget_reason(self.max_cosine_drop, self.min_metric)
        kept = set(kept_float)
        for d in plan.decisions:
            if d.name in kept:
                d.reason = reason
        insert_qdq(model, plan)
        return model, plan

    def _write(self, proto: onnx.ModelProto, index: int) -> Path:
        folder = self.work_dir / f"candidate_{index}"
        folder.mkdir()
        path = folder / "model.onnx"
        save_model(proto, path)
        if self.side_files_from is not None:
            for name in TOKENIZER_FILES:
                src = self.side_files_from / name
                if src.is_file():
                    shutil.copyfile(src, folder / name)
        return path

    def evaluate(self, kept_float: Sequence[str], stage: str) -> Candidate:
        """Build one candidate, score it on all batches, time it against fp32."""
        key = frozenset(kept_float)
        if key in self.cache:
            return self.cache[key]
        start = time.perf_counter()
        self.count += 1
        model, _ = self.build(kept_float)
        proto = ir.to_proto(model)
        eval_fn = self.eval_fn
        path = None
        if eval_fn is not None or proto.ByteSize() > 1_800_000_000:
            path = self._write(proto, self.count)
        sess = _session(str(path) if path is not None and proto.ByteSize() > 1_800_000_000 else proto, self.threads)
        per_output: dict[str, list[float]] = {o: [] for o in self.outputs}
        for feed, ref in zip(self.batches, self.reference_outputs, strict=True):
            got = dict(zip(self.outputs, sess.run(self.outputs, _feed(sess, feed)), strict=True))
            mask = attention_mask_of(feed)
            for o in self.outputs:
                per_output[o].extend(sample_cosines(ref[o], got[o], mask))
        worst = min((float(np.mean(c)) for c in per_output.values() if c), default=1.0)
        drop = max(0.0, 1.0 - worst)
        metric = float(eval_fn(path)) if eval_fn is not None else None
        latency = None
        if self.latency_runs > 0:
            from ortq.validate import measure_latency

            lat = measure_latency(
                self.reference, sess, _feed(sess, self.batches[0]), warmup_runs=1, runs=self.latency_runs
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


SELECT_INPUT = "__ortq_int8_select"


class _Simulator:
    """The fp32 model with every quantized input of every planned node routed through a switch:
    ``x + select[i] * (DQ(Q(x)) - x)``, ``select`` a graph input with one entry per node (1: int8, 0: float).
    Any subset of nodes kept in float is then one run of one session, with no model to rebuild. The int8
    kernels compute the same products exactly in int32, so this simulates them up to float rounding."""

    def __init__(self, fp32: onnx.ModelProto, plan: QuantPlan, batches: Sequence[Mapping[str, np.ndarray]],
                 reference_outputs: list[dict[str, np.ndarray]], outputs: list[str], threads: int):
        self.nodes = list(plan.quantized_nodes)
        self.batches = batches
        self.reference_outputs = reference_outputs
        self.outputs = outputs
        model = ir.from_proto(fp32)
        graph = model.graph
        ensure_node_names(graph)
        select = ir.val(SELECT_INPUT, ir.DataType.FLOAT, ir.Shape([len(self.nodes)]))
        graph.inputs.append(select)
        values = {v.name: v for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
        values.update({v.name: v for v in graph.inputs})
        values.update(graph.initializers)
        simulated: dict[str, ir.Value] = {}
        for name, qp in plan.activations.items():
            x = values[name]
            scale = ir.val(f"{name}__sim_scale", const_value=ir.tensor(qp.scale, name=f"{name}__sim_scale"))
            zp = ir.val(f"{name}__sim_zp", const_value=ir.tensor(qp.zero_point, name=f"{name}__sim_zp"))
            for c in (scale, zp):
                graph.register_initializer(c)
            q = ir.node("QuantizeLinear", [x, scale, zp], name=f"{name}__sim_q")
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=f"{name}__sim_dq")
            producer = x.producer()
            if producer is None:
                graph.insert_before(graph.node(0), [q, dq])
            else:
                graph.insert_after(producer, [q, dq])
            simulated[name] = dq.outputs[0]
        for name, qp in plan.weights.items():
            w = values[name]
            deq = dequantized_weight(w.const_value.numpy(), qp)
            c = ir.val(f"{name}__sim_w", const_value=ir.tensor(deq, name=f"{name}__sim_w"))
            graph.register_initializer(c)
            simulated[name] = c
        by_name = {n.name: n for n in graph}
        for i, node_name in enumerate(self.nodes):
            node = by_name[node_name]
            index = ir.val(f"__ortq_sim_index_{i}", const_value=ir.tensor(np.array(i, np.int64), name=f"__ortq_sim_index_{i}"))
            graph.register_initializer(index)
            gate = ir.node("Gather", [select, index], name=f"{node_name}__sim_gate")
            new_nodes = [gate]
            for j in plan.node_inputs.get(node_name, ()):
                x = node.inputs[j]
                if x is None or x.name not in simulated:
                    continue
                diff = ir.node("Sub", [simulated[x.name], x], name=f"{node_name}__sim_sub{j}")
                scaled = ir.node("Mul", [diff.outputs[0], gate.outputs[0]], name=f"{node_name}__sim_mul{j}")
                mixed = ir.node("Add", [x, scaled.outputs[0]], name=f"{node_name}__sim_add{j}")
                new_nodes += [diff, scaled, mixed]
                node.replace_input_with(j, mixed.outputs[0])
            graph.insert_before(node, new_nodes)
        self.session = _session(ir.to_proto(model), threads)
        self.evaluations = 0

    def quick_batches(self, num_samples: int) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """The first ``num_samples`` samples (feeds with their reference outputs), for cheap probes."""
        out, left = [], num_samples
        for feed, ref in zip(self.batches, self.reference_outputs, strict=False):
            if left <= 0:
                break
            n = min(left, int(np.shape(next(iter(feed.values())))[0]))
            out.append(_trim_padding({k: v[:n] for k, v in feed.items()}, {k: v[:n] for k, v in ref.items()}))
            left -= n
        return out

    def drop(self, kept_float: Sequence[str], pairs: Sequence[tuple[Mapping, Mapping]] | None = None) -> float:
        """Cosine drop (``1 -`` the worst output's mean per-sample cosine) with ``kept_float`` in float, on all
        batches or on the given (feed, reference outputs) pairs."""
        self.evaluations += 1
        select = np.ones(len(self.nodes), np.float32)
        kept = set(kept_float)
        select[[i for i, n in enumerate(self.nodes) if n in kept]] = 0.0
        per_output: dict[str, list[float]] = {o: [] for o in self.outputs}
        if pairs is None:
            pairs = list(zip(self.batches, self.reference_outputs, strict=False))
        for feed, ref in pairs:
            f = {i.name: feed[i.name] for i in self.session.get_inputs() if i.name != SELECT_INPUT}
            got = dict(zip(self.outputs, self.session.run(self.outputs, {**f, SELECT_INPUT: select}), strict=True))
            mask = attention_mask_of(feed)
            for o in self.outputs:
                per_output[o].extend(sample_cosines(ref[o], got[o], mask))
        worst = min((float(np.mean(c)) for c in per_output.values() if c), default=1.0)
        return max(0.0, 1.0 - worst)


def _trim_padding(
    feed: dict[str, np.ndarray], ref: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Drop trailing sequence positions that are padding in every row (right-padded text batches), from the
    feed and the reference outputs laid out ``[batch, seq, ...]``; other batches are returned unchanged."""
    mask = attention_mask_of(feed)
    if mask is None or not mask.any():
        return feed, ref
    seq = mask.shape[1]
    length = int(np.flatnonzero(mask.any(axis=0)).max()) + 1
    if length == seq:
        return feed, ref
    if any(np.ndim(v) != 2 or np.shape(v) != mask.shape for v in feed.values()):
        return feed, ref
    if any(np.ndim(v) < 2 or np.shape(v)[:2] != mask.shape for v in ref.values()):
        return feed, ref
    return {k: v[:, :length] for k, v in feed.items()}, {k: v[:, :length] for k, v in ref.items()}


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
    fp32_model: onnx.ModelProto | str | os.PathLike,
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
    fp32 = fp32_model if isinstance(fp32_model, onnx.ModelProto) else onnx.load(str(fp32_model))
    side = Path(side_files_from) if side_files_from is not None else None

    with tempfile.TemporaryDirectory(prefix="ortq-fallback-") as tmp:
        work = Path(tmp)
        reference_metric = None
        if eval_fn is not None and max_metric_drop is not None:
            ref_dir = work / "fp32"
            ref_dir.mkdir()
            save_model(fp32, ref_dir / "model.onnx")
            if side is not None:
                for name in TOKENIZER_FILES:
                    if (side / name).is_file():
                        shutil.copyfile(side / name, ref_dir / name)
            reference_metric = float(eval_fn(ref_dir / "model.onnx"))
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
            sim = _Simulator(fp32, plan0, batches, ev.reference_outputs, ev.outputs, threads)
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
    sim: _Simulator,
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


def quantize_with_budget(
    quantizer: Any,
    quantization_config: QuantizationConfig,
    save_dir: str | os.PathLike,
    calibration_data: Any,
    *,
    calibration_config: Any = None,
    max_cosine_drop: float | None = None,
    eval_fn: EvalFn | None = None,
    min_metric: float | None = None,
    max_metric_drop: float | None = None,
    budget_fraction: float = 0.25,
    error_report: bool = True,
    report_data: Any = None,
    overwrite: bool = False,
    **search_kwargs: Any,
) -> Path:
    """Static int8 with the fewest nodes kept in float that meet an accuracy budget; writes the usual output
    folder (``model.onnx``, ``ortq_config.json``, ``quantization_report.json`` with an ``accuracy_budget``
    section) and, with ``error_report``, ``layer_report.{json,md,png}`` beside it.

    The last ``budget_fraction`` of the calibration samples is set aside to check the budget and not used to
    calibrate. The layer report runs on ``report_data`` (e.g. held-out data) when given, else on those
    set-aside samples.

    Args:
        quantizer: an :class:`ortq.quantizer.ORTQuantizer`.
        quantization_config: a static config.
        save_dir: the output folder.
        calibration_data: anything :meth:`ORTQuantizer.batches` accepts.
        calibration_config: the calibration config (default :class:`ortq.config.CalibrationConfig`).
        max_cosine_drop, eval_fn, min_metric, max_metric_drop: the budget (see :func:`search_fallback`).
        budget_fraction: share of the calibration samples set aside for the budget, in (0, 1).
        error_report: also write the per-layer report of the model chosen.
        report_data: data for the per-layer report.
        overwrite: replace an existing output folder.
        search_kwargs: passed to :func:`search_fallback` (``max_evaluations``, ``latency_runs``, ...).
    """
    import json

    from ortq.config import CalibrationConfig
    from ortq.io import write_text_atomic
    from ortq.quantizer import PLAN_FILENAME

    if not 0.0 < budget_fraction < 1.0:
        raise ConfigError(f"budget_fraction must be in (0, 1), got {budget_fraction}")
    if calibration_data is None:
        raise ConfigError("the accuracy budget needs calibration_data (a share of it checks the budget)")
    calibration_config = calibration_config or CalibrationConfig()
    feeds = list(
        quantizer.batches(
            calibration_data, batch_size=calibration_config.batch_size, num_samples=calibration_config.num_samples
        )
    )
    calib, budget_batches = split_rows(feeds, budget_fraction)
    start = time.perf_counter()
    ranges = quantizer.fit(calib, calibration_config, quantization_config=quantization_config)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    result = search_fallback(
        quantizer.proto,
        quantization_config,
        ranges,
        budget_batches,
        max_cosine_drop=max_cosine_drop,
        eval_fn=eval_fn,
        min_metric=min_metric,
        max_metric_drop=max_metric_drop,
        side_files_from=quantizer.model_dir,
        **search_kwargs,
    )
    search_s = time.perf_counter() - start
    if not result.plan.quantized_nodes:
        raise ConfigError(
            f"the accuracy budget keeps every node in float (best cosine drop with int8 nodes "
            f"{min(c.cosine_drop for c in result.candidates):.5f}): nothing left to quantize; loosen the budget"
        )
    config = dataclasses.replace(
        quantization_config,
        nodes_to_exclude=tuple(quantization_config.nodes_to_exclude) + tuple(result.kept_float),
    )
    path = quantizer.quantize(config, save_dir, calibration_tensors_range=ranges, overwrite=overwrite)
    reasons = {d.name: d.reason for d in result.plan.decisions}
    report = dict(quantizer.last_report or {})
    for node in report.get("plan", {}).get("nodes", []):
        if node["name"] in result.kept_float:
            node["reason"] = reasons[node["name"]]
    if quantizer.last_plan is not None:
        for d in quantizer.last_plan.decisions:
            if d.name in result.kept_float:
                d.reason = reasons[d.name]
    report["accuracy_budget"] = {
        **result.to_dict(),
        "calibration_samples": sum(int(np.shape(next(iter(f.values())))[0]) for f in calib),
        "fit_seconds": round(fit_s, 3),
        "search_seconds": round(search_s, 3),
    }
    out = Path(path).parent
    if error_report:
        if report_data is not None:
            data = list(quantizer.batches(report_data, batch_size=calibration_config.batch_size))
            where = "report data"
        else:
            data, where = budget_batches, "calibration samples set aside for the budget"
        lr = layer_report(quantizer.proto, path, quantizer.last_plan, data, data=where)
        lr.save(out)
        report["layer_report"] = {"most_sensitive": [s.name for s in lr.most_sensitive()], "data": where}
    write_text_atomic(out / PLAN_FILENAME, json.dumps(report, indent=2, default=str) + "\n")
    quantizer.last_report = report
    return path
