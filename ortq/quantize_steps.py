"""The steps behind :class:`ortq.quantizer.ORTQuantizer`, run once per quantization:

    prepare -> (SmoothQuant) -> calibrate -> plan -> rewrite passes -> (accuracy budget) -> write

:class:`QuantizeSteps` owns the model as one ``onnx_ir.Model`` from load to save: ``prepare`` (which works
on the proto, for onnx's version converter) hands it over once, every rewrite is a
:class:`~ortq.passes.base.ReportingPass` editing it in place, and ONNX Runtime gets it serialized once per
session. Calibration feeds are tokenized once and reused by smoothing, calibration, Hessians, the budget and
the layer report. The plan is made once per model state (twice with int4 storage, whose 4-bit weights change
the int8 weight scales). :meth:`QuantizeSteps.write` puts the model, ``ortq_config.json``,
``quantization_report.json`` and the per-layer report into one atomic output folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ortq.calibrators.activations import GroupedHessians, channel_absmax, hessian_groups, second_moments
from ortq.calibrators.base import TensorRange
from ortq.calibrators.collect import CalibrationState, RangeCollector, RangesJob
from ortq.config import CalibrationConfig, QuantizationConfig, WeightOnlyAlgorithm, WeightOnlyConfig
from ortq.data import Batches, InputSpec, load_batches
from ortq.errors import CalibrationDataError, ConfigError, ModelError
from ortq.fallback import FallbackResult, budget_reason, search_fallback, split_rows
from ortq.io import (
    atomic_output_dir,
    copy_side_files,
    load_model,
    needs_external_data,
    weight_bytes,
    write_text_atomic,
)
from ortq.passes.base import ReportingPass, run_passes
from ortq.passes.cpu_kernels import CpuKernelsPass
from ortq.passes.embeddings import EmbeddingsPass
from ortq.passes.insert_qdq import InsertQDQPass
from ortq.passes.int4_storage import Int4StoragePass, int4_targets
from ortq.passes.matmul_nbits import MatMulNBitsPass, weight_only_activations
from ortq.passes.plan import QuantPlan, calibration_targets, make_plan
from ortq.passes.prepare import prepare_model
from ortq.passes.smooth import SmoothQuantPass, smooth_groups
from ortq.runtime import LARGE_MODEL_BYTES, bound_heap_growth
from ortq.validate import inspect_placement, layer_report

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "ortq_config.json"
PLAN_FILENAME = "quantization_report.json"


@dataclasses.dataclass
class Quantized:
    """A quantized model ready to write: the model, its plan (static only) and its report."""

    model: ir.Model
    report: dict[str, Any]
    plan: QuantPlan | None = None


# GPTQ's Hessians (float64 K x K per activation) of all quantized MatMuls at once may not exceed this; above
# it they are gathered group by group (see :class:`~ortq.calibrators.activations.GroupedHessians`), in groups
# of at most HESSIAN_GROUP_BYTES: a group's sums are held beside the session's weights while they are gathered
# (at 1.1 B parameters, groups of 512 MiB peaked at S + 1.62 GiB; each group is one more calibration pass).
HESSIAN_BUDGET_BYTES = 1 << 30
HESSIAN_GROUP_BYTES = 256 << 20


def weight_only_statistics(model: ir.Model, config: WeightOnlyConfig, batches, *, engine: Any = None,
                           hessian_budget_bytes: int | None = None) -> dict[str, Any]:
    """The keyword arguments of :class:`~ortq.passes.matmul_nbits.MatMulNBitsPass` for the data-aware parts:
    per-channel mean squares (and Hessians for ``gptq``) of the activations it quantizes, over ``batches``
    (shards run by ``engine``, see :mod:`ortq.calibrators.engine`).

    When the Hessians would take more than ``hessian_budget_bytes`` (default :data:`HESSIAN_BUDGET_BYTES`),
    they come group by group (of at most :data:`HESSIAN_GROUP_BYTES` too) as the pass reads them, one
    calibration pass per group: the same values, in bounded memory."""
    names = weight_only_activations(model, config)
    gptq = WeightOnlyAlgorithm(config.algorithm) == WeightOnlyAlgorithm.GPTQ
    if not names:  # every weight carries its source grid: nothing to measure
        return {"mean_squares": {}, "means": {}, "counts": {}, "hessians": {} if gptq else None,
                "calibration": {"tokens": 0, "activations": 0, "seconds": 0.0,
                                "skipped": "every weight carries the block grid it lies on"}}
    budget = HESSIAN_BUDGET_BYTES if hessian_budget_bytes is None else int(hessian_budget_bytes)
    widths = _activation_widths(model, names) if gptq else {}
    grouped = gptq and len(widths) == len(names) and sum(c * c * 8 for c in widths.values()) > budget
    if grouped and not isinstance(batches, Sequence):
        batches = list(batches)  # read once per group
    start = time.perf_counter()
    stats = second_moments(model, names, batches, hessians=gptq and not grouped, engine=engine)
    hessians: Mapping[str, np.ndarray] | None = stats.hessians if gptq else None
    calibration: dict[str, Any] = {"tokens": stats.tokens, "activations": len(stats.count)}
    if grouped:
        groups = hessian_groups(widths, min(budget, HESSIAN_GROUP_BYTES))
        # A clone sharing the weights: the pass that reads the groups rewrites ``model`` as it goes.
        hessians = GroupedHessians(model.clone(), groups, batches, engine=engine)
        calibration["hessian_groups"] = len(groups)
        logger.info("GPTQ Hessians over %.1f GB: gathered in %d groups of at most %.1f GB",
                    sum(c * c * 8 for c in widths.values()) / 1e9, len(groups), min(budget, HESSIAN_GROUP_BYTES) / 1e9)
    calibration["seconds"] = round(time.perf_counter() - start, 2)  # the groups' passes come later, in the pass
    return {
        "mean_squares": {n: stats.mean_square(n) for n in stats.sum_squares},
        "means": {n: stats.mean(n) for n in stats.sums},
        "counts": dict(stats.count),
        "hessians": hessians,
        "calibration": calibration,
    }


def _activation_widths(model: ir.Model, names: Sequence[str]) -> dict[str, int]:
    """Channels of each activation in ``names`` (the K of a constant weight it multiplies), in the order the
    graph reads them; activations whose width is not known are left out."""
    wanted = set(names)
    widths: dict[str, int] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        name, weight = node.inputs[0].name, node.inputs[1]
        if name not in wanted or name in widths or weight is None or weight.const_value is None:
            continue
        shape = weight.const_value.shape
        if len(shape) != 2:
            continue
        trans_b = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int()
        widths[name] = int(shape[1] if trans_b else shape[0])
    return widths


class QuantizeSteps:
    """The model of one quantizer and the steps that quantize it (see the module docstring).

    Attributes:
        model: the float model as calibrated (SmoothQuant applied when it was requested).
        preparation: what loading normalized, and the nodes it leaves in float.
        collector: the running calibration statistics, once calibration started.
        smoothing: the SmoothQuant report of ``model`` (``{"alpha", "activations"}``), or None.
        calibration_batches: the feeds of the first calibration, kept for Hessians and the layer report.
    """

    def __init__(self, model_path: Path):
        self.model_path = model_path
        self.model_dir = model_path.parent
        # Weights in an external data file stay there: the proto holds the graph, the tensors are mapped from
        # the file on first use (a model over 2 GB never sits whole in memory, nor twice).
        proto, self.preparation = prepare_model(load_model(model_path, load_external_data=False),
                                                source=str(model_path))
        self._float = ir.from_proto(proto)  # as loaded; smoothing works on a clone sharing its tensors
        ir.external_data.set_base_dir(self._float.graph, model_path.parent)
        del proto
        self.model = self._float
        self.collector: RangeCollector | None = None
        self.calibration_config: CalibrationConfig | None = None
        self.smoothing: dict[str, Any] | None = None
        self.calibration_batches: list[Mapping[str, np.ndarray]] | None = None
        self.engine: Any = None  # runs calibration shards (None: the collector streams in this process)

    # -------------------------------------------------------------------------------------------- data

    def input_specs(self) -> dict[str, InputSpec]:
        """The graph's inputs (initializers left out), for :func:`ortq.data.load_batches`."""
        inits = set(self.model.graph.initializers)
        specs = {}
        for v in self.model.graph.inputs:
            if v.name in inits:
                continue
            dtype = np.dtype(v.dtype.numpy()) if v.dtype is not None else np.dtype("float32")
            rank = len(v.shape) if v.shape is not None else None
            dims = tuple(d if isinstance(d, int) else None for d in v.shape) if v.shape is not None else ()
            names = tuple(None if isinstance(d, int) or d is None or d.value is None else str(d.value)
                          for d in v.shape) if v.shape is not None else ()
            # dims: a prefill's empty KV cache needs them; names: which axis runs over samples
            specs[v.name] = InputSpec(v.name, dtype, rank, dims, names)
        return specs

    def batches(self, dataset: Any, *, batch_size: int = 16, num_samples: int | None = None,
                max_length: int = 128) -> Batches:
        """``dataset`` as batches of feeds for this model (see :mod:`ortq.data`)."""
        return load_batches(dataset, inputs=self.input_specs(), tokenizer=self.model_dir, batch_size=batch_size,
                            num_samples=num_samples, max_length=max_length)

    # ------------------------------------------------------------------------------------- calibration

    def _bound_memory(self) -> None:
        """Before calibration passes over a large model: freed large blocks go back to the system
        (:func:`~ortq.runtime.bound_heap_growth`; not for quantization without data, whose many large numpy
        temporaries would each cost a fresh mapping: round to nearest on a 1.1B model took 330 s with it, 259
        s without, at the same peak)."""
        if weight_bytes(self._float) > LARGE_MODEL_BYTES:
            bound_heap_growth()

    def reset(self) -> None:
        """Forget calibration and smoothing: back to the model as loaded."""
        self.model = self._float
        self.collector = None
        self.calibration_config = None
        self.smoothing = None
        self.calibration_batches = None
        self.engine = None

    def smooth(self, alpha: float | str, feeds: Sequence[Mapping[str, np.ndarray]], int4_block: int | None) -> None:
        """SmoothQuant on a clone of the float model; calibration and quantization then use it."""
        model = self._float.clone()
        names = [g.activation for g in smooth_groups(model)]
        smoothing = SmoothQuantPass(alpha, {}, weight_block_size=int4_block)
        if names:
            stats = channel_absmax(model, names, feeds, sample_rows=512 if alpha == "auto" else 0)
            smoothing = SmoothQuantPass(alpha, stats.absmax, stats.rows, weight_block_size=int4_block)
        self.smoothing = run_passes(model, [smoothing])[smoothing.report_key]
        self.model = model

    def calibrate(
        self,
        feeds: Sequence[Mapping[str, np.ndarray]],
        calibration_config: CalibrationConfig,
        qconfig: QuantizationConfig,
        *,
        providers: Sequence[str] | None = None,
        show_progress: bool = True,
        engine: Any = None,
    ) -> None:
        """Add ``feeds`` to the running statistics; the first call smooths (if ``qconfig`` asks) and sets up
        the collector on the activations ``qconfig`` quantizes. With ``engine`` (see
        :mod:`ortq.calibrators.engine`) the shards of ``feeds`` run there and their states are merged here;
        smoothing still runs in this process."""
        if self.calibration_config is not None and calibration_config != self.calibration_config:
            raise ConfigError("partial_fit called with a different calibration config than before")
        self.calibration_config = calibration_config
        self._bound_memory()
        if self.collector is None:
            if qconfig.smooth_quant_alpha is not None and self.smoothing is None:
                int4_block = qconfig.storage_block_size if qconfig.weight_storage_bits == 4 else None
                self.smooth(qconfig.smooth_quant_alpha, feeds, int4_block)
            targets = calibration_targets(self.model, qconfig)
            if not targets:
                raise ModelError(
                    f"{self.model_path}: nothing to quantize (no {', '.join(qconfig.operators_to_quantize)} node "
                    "with float activations)"
                )
            self.collector = RangeCollector(self.model, targets, calibration_config, providers=providers)
        if self.calibration_batches is None:
            self.calibration_batches = list(feeds)
        start = time.perf_counter()
        if engine is not None:
            self.engine = engine
            job = RangesJob(self.collector.tensor_names, calibration_config, providers=providers,
                            intra_op_num_threads=getattr(engine, "cpus_per_worker", None))
            desc = f"calibrating ({calibration_config.method.value})" if show_progress else None
            self.collector.state.merge(engine.run(job, self.model, feeds, desc=desc))
        else:
            self.collector.collect(feeds, total=len(feeds), show_progress=show_progress)
        logger.info("calibrated on %d samples in %.1fs", self.collector.state.num_samples,
                    time.perf_counter() - start)

    def resume(self, state: CalibrationState, calibration_config: CalibrationConfig,
               providers: Sequence[str] | None = None) -> None:
        """Continue from saved statistics."""
        self.calibration_config = calibration_config
        self.collector = RangeCollector(self.model, list(state.observers), calibration_config, providers=providers)
        self.collector.state.merge(state)

    def ranges(self) -> dict[str, TensorRange]:
        if self.collector is None:
            raise CalibrationDataError("no calibration data yet: call fit() or partial_fit() first")
        return self.collector.state.compute_ranges()

    # ------------------------------------------------------------------------------------- quantization

    def static(self, config: QuantizationConfig, ranges: Mapping[str, TensorRange], *,
               kept_float: Mapping[str, str] | None = None, notes: list[str] | None = None) -> Quantized:
        """Static int8 of a clone of ``model``: plan, (int4 storage, plan again), QDQ, embeddings, CPU kernels.

        ``kept_float`` maps nodes an accuracy budget keeps in float to the reason recorded in the plan.
        """
        if self.collector is not None:
            self.collector.close()  # its session's copy of the weights is not needed to quantize
        model = self.model.clone()
        if kept_float:
            config = dataclasses.replace(config, nodes_to_exclude=tuple(config.nodes_to_exclude) + tuple(kept_float))
        plan = make_plan(model, config, ranges)
        reports: dict[str, dict[str, Any]] = {}
        int4 = None
        if config.weight_storage_bits == 4 and int4_targets(model, plan):
            hessians = None
            if self.calibration_batches is not None:
                activations = sorted(set(int4_targets(model, plan).values()))
                hessians = second_moments(model, activations, self.calibration_batches, hessians=True,
                                           engine=self.engine).hessians
            int4 = Int4StoragePass(plan, block_size=config.storage_block_size, hessians=hessians)
            reports.update(run_passes(model, [int4]))
            plan = make_plan(model, config, ranges)  # the 4-bit weights are a new model state
        for decision in plan.decisions:
            if kept_float and decision.name in kept_float:
                decision.reason = kept_float[decision.name]
        if not plan.quantized_nodes:
            raise ModelError(
                f"{self.model_path}: nothing was quantized; every candidate node stayed in float "
                f"(e.g. {next(iter(plan.float_nodes.items()), ('-', '-'))[1]})"
            )
        passes: list[ReportingPass] = [InsertQDQPass(plan, int4_weights=int4.codes if int4 else None)]
        if config.quantize_embeddings:
            passes.append(EmbeddingsPass(plan, bits=config.weight_storage_bits))
        if config.tune_cpu_kernels:
            passes.append(CpuKernelsPass())
        reports.update(run_passes(model, passes))
        report: dict[str, Any] = {"method": "static_int8", "config": config.to_dict(), "notes": list(notes or []),
                                  "plan": plan.to_dict()}
        if "cpu_kernels" in reports:
            report["cpu_kernels"] = reports["cpu_kernels"]
        if self.smoothing is not None:
            report["smooth_quant"] = self.smoothing
        if self.collector is not None:
            report["calibration"] = self.collector.state.summary()
        return Quantized(model, report, plan)

    def weight_only(self, config: WeightOnlyConfig, feeds: Sequence[Mapping[str, np.ndarray]] | None,
                    *, engine: Any = None) -> Quantized:
        """Weight-only (MatMulNBits) of a clone of ``model``, data-aware when ``feeds`` are given (statistics
        gathered by ``engine``, see :mod:`ortq.calibrators.engine`)."""
        model = self._float.clone()
        if feeds is not None:
            self._bound_memory()
        stats = weight_only_statistics(model, config, feeds, engine=engine) if feeds is not None else {}
        passes: list[ReportingPass] = [MatMulNBitsPass(config, **stats)]
        if config.tune_cpu_kernels:
            passes.append(CpuKernelsPass())
        reports = run_passes(model, passes)
        report = {"method": "weight_only", **reports["weight_only"]}
        if not report.get("num_quantized"):
            skipped = report.get("float_nodes") or {}
            example = next(iter(skipped.items()), None)
            why = f" (e.g. {example[0]}: {example[1]})" if example else ""
            raise ModelError(
                f"{self.model_path}: nothing was quantized: weight-only {config.bits}-bit applies to MatMul/Gemm "
                f"nodes with a constant 2-D weight and to embedding Gathers, and none qualified{why}"
            )
        if "cpu_kernels" in reports:
            report["cpu_kernels"] = reports["cpu_kernels"]
        return Quantized(model, report)

    def with_budget(self, config: QuantizationConfig, feeds: list[Mapping[str, np.ndarray]],
                    calibration_config: CalibrationConfig, *, budget_fraction: float = 0.25,
                    show_progress: bool = True, **budget: Any) -> tuple[Quantized, FallbackResult, list]:
        """Calibrate on all but the last ``budget_fraction`` of ``feeds``, search the fewest nodes to keep in
        float that meet the budget on the rest (:func:`ortq.fallback.search_fallback`), and quantize with
        them in float. Returns the result, the search and the feeds set aside."""
        if not 0.0 < budget_fraction < 1.0:
            raise ConfigError(f"budget_fraction must be in (0, 1), got {budget_fraction}")
        calib, held = split_rows(feeds, budget_fraction)
        self.reset()
        start = time.perf_counter()
        self.calibrate(calib, calibration_config, config, show_progress=show_progress)
        ranges = self.ranges()
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        result = search_fallback(self.model, config, ranges, held, side_files_from=self.model_dir, **budget)
        search_s = time.perf_counter() - start
        if not result.plan.quantized_nodes:
            raise ConfigError(
                f"the accuracy budget keeps every node in float (best cosine drop with int8 nodes "
                f"{min(c.cosine_drop for c in result.candidates):.5f}): nothing left to quantize; loosen the budget"
            )
        reason = budget_reason(budget.get("max_cosine_drop"), result.budget.get("min_metric"))
        done = self.static(config, ranges, kept_float=dict.fromkeys(result.kept_float, reason))
        done.report["accuracy_budget"] = {
            **result.to_dict(),
            "calibration_samples": sum(int(np.shape(next(iter(f.values())))[0]) for f in calib),
            "fit_seconds": round(fit_s, 3),
            "search_seconds": round(search_s, 3),
        }
        return done, result, held

    # ------------------------------------------------------------------------------------------- output

    def write(self, done: Quantized, out: Path, *, file_name: str, config_doc: dict[str, Any], overwrite: bool,
              sample_feeds: Mapping[str, np.ndarray] | None = None,
              layer_batches: Sequence[Mapping[str, np.ndarray]] | None = None,
              layer_data: str | None = None) -> Path:
        """Write ``done`` into one atomic folder: the model (weights external above the protobuf limit), the
        side files, ``ortq_config.json``, the per-layer report (with ``layer_batches``) and
        ``quantization_report.json``, which also records the placement ONNX Runtime's CPU EP gives."""
        report = done.report
        report["prepare"] = self.preparation.to_dict()
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            path = tmp / file_name
            if needs_external_data(done.model):
                ir.save(done.model, path, external_data=file_name + ".data")
            else:  # small enough for one file: the weights still mapped from the source come in (norms, biases)
                ir.external_data.load_to_model(done.model)
                ir.save(done.model, path)
            try:  # from the file: the checker cannot take a model over 2 GB in memory
                onnx.checker.check_model(str(path), full_check=False)
            except onnx.checker.ValidationError as exc:  # a bug of ours, not bad input: say so plainly
                raise ModelError(f"the quantized model failed onnx.checker: {str(exc).splitlines()[0]}") from exc
            if done.plan is not None:
                report["placement"] = self._placement(path, done.plan, sample_feeds)
            copy_side_files(self.model_dir, tmp)
            write_text_atomic(tmp / CONFIG_FILENAME, json.dumps(config_doc, indent=2) + "\n")
            if layer_batches is not None and done.plan is not None:
                kwargs = {"data": layer_data} if layer_data else {}
                lr = layer_report(self.model, done.model, done.plan, layer_batches, **kwargs)
                lr.save(tmp)
                if layer_data:
                    report["layer_report"] = {"most_sensitive": [s.name for s in lr.most_sensitive()],
                                              "data": layer_data}
            write_text_atomic(tmp / PLAN_FILENAME, json.dumps(report, indent=2, default=str) + "\n")
        logger.info("wrote %s", out / file_name)
        return out / file_name

    @staticmethod
    def _placement(path: Path, plan: QuantPlan, feeds: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
        """Which planned nodes ONNX Runtime's CPU EP really turned into integer kernels, and the int8 share
        of MatMul/Gemm/Conv FLOPs at one calibration batch."""
        try:
            placement = inspect_placement(path, "cpu", feeds, runs=1)
        except Exception as exc:  # the report is an add-on: a failure here must not lose the model
            logger.warning("could not inspect the quantized model's placement: %s", exc)
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        planned = set(plan.quantized_nodes)
        unfused = [n for n in placement.unfused_qdq_groups if n in planned or not planned]
        if unfused:
            logger.warning("%d quantized node(s) did not fuse into integer kernels: %s", len(unfused), unfused[:5])
        flops = placement.flops
        if flops.get("int8_fraction") is not None:
            logger.info("int8 share of MatMul/Gemm/Conv FLOPs on the CPU EP: %.1f%%", 100 * flops["int8_fraction"])
        return placement.to_dict(include_nodes=False)
