"""``ORTQuantizer``: the pipeline behind Optimum's names.

    quantizer = ORTQuantizer.from_pretrained("exported/")           # a folder with model.onnx, or a .onnx file
    ranges = quantizer.fit(data, AutoCalibrationConfig.minmax())     # calibrate (streaming statistics)
    quantizer.quantize(save_dir="int8/", quantization_config=AutoQuantizationConfig.avx2())

``partial_fit`` adds data to the running statistics, ``compute_ranges`` turns them into ranges, and the state
can be saved and resumed (``save_calibration_state`` / ``load_calibration_state``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ortq.calibrators.base import TensorRange
from ortq.calibrators.collect import CalibrationState, RangeCollector
from ortq.config import (
    AnyQuantizationConfig,
    AutoQuantizationConfig,
    CalibrationConfig,
    QuantizationConfig,
    WeightOnlyConfig,
)
from ortq.data import Batches, load_batches
from ortq.errors import CalibrationDataError, ConfigError, ModelError
from ortq.io import (
    MODEL_FILENAME,
    atomic_output_dir,
    check_output_dir,
    copy_side_files,
    load_model,
    resolve_model_path,
    save_model,
    write_text_atomic,
)
from ortq.passes.insert_qdq import insert_qdq
from ortq.passes.plan import QuantPlan, calibration_targets, make_plan
from ortq.passes.prepare import Preparation, prepare_model

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "ortq_config.json"
PLAN_FILENAME = "quantization_report.json"


class ORTQuantizer:
    """Calibrates and quantizes one ONNX model."""

    def __init__(self, model_path: Path):
        self.model_path = resolve_model_path(model_path)
        self.model_dir = self.model_path.parent
        self._proto: onnx.ModelProto | None = None
        self._collector: RangeCollector | None = None
        self._calibration_config: CalibrationConfig | None = None
        # SmoothQuant rewrites the float model before calibration: (alpha, per-activation summary).
        self._smoothing: tuple[float | str, dict[str, Any]] | None = None
        self.last_plan: QuantPlan | None = None
        self._sample_feeds: dict[str, Any] | None = None  # one calibration batch, for placement FLOPs
        self._calibration_batches: Batches | None = None  # for data-aware weight rounding
        # What loading normalized (opset upgrade, lifted Constant nodes) and the nodes it leaves in float.
        self.preparation: Preparation | None = None
        self.last_report: dict[str, Any] | None = None
        # Progress bars of calibration (the CLI turns them off with --quiet).
        self.show_progress = True

    @classmethod
    def from_pretrained(cls, model_or_path: str | os.PathLike, file_name: str | None = None) -> ORTQuantizer:
        """A quantizer for an exported folder (``model.onnx`` inside) or a ``.onnx`` file."""
        path = Path(model_or_path)
        if file_name is not None:
            path = path / file_name
        quantizer = cls(path)
        _ = quantizer.proto  # fail early on a bad model
        return quantizer

    @property
    def proto(self) -> onnx.ModelProto:
        if self._proto is None:
            self._proto, self.preparation = prepare_model(load_model(self.model_path), source=str(self.model_path))
        return self._proto

    def _ir_model(self) -> ir.Model:
        return ir.from_proto(self.proto)

    def _smooth(self, alpha: float | str, batches: Batches, int4_block: int | None = None) -> None:
        """Apply SmoothQuant to the float model; calibration and quantization then use the smoothed model.

        ``alpha="auto"`` picks, per activation, the strength (or none) whose int8 MatMuls best reproduce the
        float outputs on sampled calibration rows.
        """
        from ortq.passes.smooth import apply_smoothing, channel_absmax, search_alpha, smooth_groups

        model = self._ir_model()
        groups = smooth_groups(model)
        if not groups:
            logger.info("SmoothQuant: no MatMul with a constant weight to smooth")
            self._smoothing = (alpha, {})
            return
        names = [g.activation for g in groups]
        if alpha == "auto":
            absmax, rows = channel_absmax(self.proto, names, batches, sample_rows=512)
            nodes = {n.name: n for n in model.graph}
            chosen: dict[str, float] = {}
            errors: dict[str, dict[str, float]] = {}
            for g in groups:
                if g.activation not in rows:
                    continue
                weights = [nodes[m].inputs[1].const_value.numpy() for m in g.matmuls]
                best, errs = search_alpha(
                    rows[g.activation], weights, absmax[g.activation], weight_block_size=int4_block
                )
                errors[g.activation] = errs
                if best is not None:
                    chosen[g.activation] = best
            summary = apply_smoothing(model, groups, absmax, chosen)
            for name, errs in errors.items():
                entry = summary.setdefault(name, {"alpha": None})
                entry["relative_error_unsmoothed"] = errs["none"]
                entry["relative_error_chosen"] = min(errs.values())
        else:
            absmax = channel_absmax(self.proto, names, batches)
            summary = apply_smoothing(model, groups, absmax, float(alpha))
        self._proto = ir.to_proto(model)
        self._smoothing = (alpha, summary)
        logger.info("SmoothQuant (alpha %s) on %d of %d activations", alpha,
                    sum(1 for v in summary.values() if v.get("alpha") is not None), len(groups))

    # ------------------------------------------------------------------------------------------ calibration

    def batches(
        self, dataset: Any, *, batch_size: int = 16, num_samples: int | None = None, max_length: int = 128
    ) -> Batches:
        """Turn ``dataset`` into batches of feeds for this model (see :mod:`ortq.data`)."""
        return load_batches(
            dataset,
            model=self.proto,
            tokenizer=self.model_dir,
            batch_size=batch_size,
            num_samples=num_samples,
            max_length=max_length,
        )

    def partial_fit(
        self,
        dataset: Any,
        calibration_config: CalibrationConfig,
        *,
        quantization_config: QuantizationConfig | None = None,
        operators_to_quantize: tuple[str, ...] | None = None,
        batch_size: int | None = None,
        max_length: int = 128,
        providers: tuple[str, ...] | None = None,
        show_progress: bool | None = None,
    ) -> None:
        """Add ``dataset`` to the running activation statistics."""
        if show_progress is None:
            show_progress = self.show_progress
        if self._calibration_config is not None and calibration_config != self._calibration_config:
            raise ConfigError("partial_fit called with a different calibration config than before")
        self._calibration_config = calibration_config
        batches = self.batches(
            dataset,
            batch_size=batch_size or calibration_config.batch_size,
            num_samples=calibration_config.num_samples,
            max_length=max_length,
        )
        if self._collector is None:
            qconfig = quantization_config or QuantizationConfig()
            if operators_to_quantize:
                qconfig = dataclasses.replace(qconfig, operators_to_quantize=tuple(operators_to_quantize))
            if qconfig.smooth_quant_alpha is not None and self._smoothing is None:
                int4_block = qconfig.storage_block_size if qconfig.weight_storage_bits == 4 else None
                self._smooth(qconfig.smooth_quant_alpha, batches, int4_block)
            targets = calibration_targets(self._ir_model(), qconfig)
            if not targets:
                raise ModelError(
                    f"{self.model_path}: nothing to quantize (no {', '.join(qconfig.operators_to_quantize)} node "
                    "with float activations)"
                )
            self._collector = RangeCollector(self.proto, targets, calibration_config, providers=providers)
        if self._sample_feeds is None:
            self._sample_feeds = next(iter(batches), None)
        if self._calibration_batches is None:
            self._calibration_batches = batches
        start = time.perf_counter()
        self._collector.collect(batches, total=batches.num_batches, show_progress=show_progress)
        logger.info("calibrated on %s samples in %.1f s", batches.num_samples, time.perf_counter() - start)

    def compute_ranges(self) -> dict[str, TensorRange]:
        """Ranges from the statistics gathered so far."""
        if self._collector is None:
            raise CalibrationDataError("no calibration data yet: call fit() or partial_fit() first")
        return self._collector.state.compute_ranges()

    def fit(self, dataset: Any, calibration_config: CalibrationConfig, **kwargs: Any) -> dict[str, TensorRange]:
        """Calibrate on ``dataset`` from scratch and return the ranges (Optimum's ``fit``)."""
        self._collector = None
        self._calibration_config = None
        self._calibration_batches = None
        self._sample_feeds = None
        if self._smoothing is not None:  # start again from the model as loaded
            self._proto = None
            self._smoothing = None
        self.partial_fit(dataset, calibration_config, **kwargs)
        return self.compute_ranges()

    @property
    def calibration_state(self) -> CalibrationState:
        if self._collector is None:
            raise CalibrationDataError("no calibration state: call fit() or partial_fit() first")
        return self._collector.state

    def save_calibration_state(self, path: str | os.PathLike) -> None:
        self.calibration_state.save(path)

    def load_calibration_state(
        self, path: str | os.PathLike, calibration_config: CalibrationConfig, **kwargs: Any
    ) -> None:
        """Resume from saved statistics; further ``partial_fit`` calls add to them."""
        state = CalibrationState.load(path)
        self._calibration_config = calibration_config
        self._collector = RangeCollector(
            self.proto, list(state.observers), calibration_config, providers=kwargs.get("providers")
        )
        self._collector.state.merge(state)

    # ------------------------------------------------------------------------------------------ quantization

    def quantize(
        self,
        quantization_config: AnyQuantizationConfig | str | os.PathLike | None = None,
        save_dir: str | os.PathLike | AnyQuantizationConfig | None = None,
        calibration_tensors_range: dict[str, TensorRange] | None = None,
        *,
        calibration_data: Any = None,
        calibration_config: CalibrationConfig | None = None,
        overwrite: bool = False,
        file_name: str = MODEL_FILENAME,
        max_cosine_drop: float | None = None,
        eval_fn: Any = None,
        min_metric: float | None = None,
        max_metric_drop: float | None = None,
        error_report: bool = False,
        report_data: Any = None,
    ) -> Path:
        """Quantize and write ``save_dir/model.onnx`` with the config used and the tokenizer files.

        Both argument orders work: Optimum's ``quantize(quantization_config, save_dir)`` and
        ``quantize(save_dir, quantization_config)``. Static configs need ranges: from
        ``calibration_tensors_range``, from an earlier ``fit``, or by calibrating on ``calibration_data``.

        An accuracy budget (``max_cosine_drop``, or ``eval_fn(model_path) -> float`` with ``min_metric`` /
        ``max_metric_drop``) keeps the fewest nodes in float that meet it (:mod:`ortq.fallback`; needs
        ``calibration_data``, a quarter of which is set aside to check the budget). ``error_report`` writes
        the per-layer error report (``layer_report.{json,md,png}``) beside the model, on ``report_data`` or
        the calibration data.
        """
        if isinstance(quantization_config, (str, os.PathLike)) and not isinstance(save_dir, (str, os.PathLike)):
            quantization_config, save_dir = save_dir, quantization_config
        if save_dir is None:
            raise ConfigError("quantize() needs save_dir")
        if quantization_config is None:
            quantization_config = AutoQuantizationConfig.for_host()
        if not isinstance(quantization_config, (QuantizationConfig, WeightOnlyConfig)):
            raise ConfigError(f"unsupported quantization config {type(quantization_config).__name__}")
        budget = max_cosine_drop is not None or eval_fn is not None
        if budget:
            if not isinstance(quantization_config, QuantizationConfig):
                raise ConfigError("an accuracy budget applies to static int8 quantization only")
            if calibration_data is None:
                raise CalibrationDataError("an accuracy budget needs calibration_data (a quarter checks the budget)")
            from ortq.fallback import quantize_with_budget

            return quantize_with_budget(
                self,
                quantization_config,
                save_dir,
                calibration_data,
                calibration_config=calibration_config,
                max_cosine_drop=max_cosine_drop,
                eval_fn=eval_fn,
                min_metric=min_metric,
                max_metric_drop=max_metric_drop,
                error_report=True,
                report_data=report_data,
                overwrite=overwrite,
            )
        out = check_output_dir(save_dir, inputs=(self.model_path,), overwrite=overwrite)

        if isinstance(quantization_config, WeightOnlyConfig):
            model, report = self._weight_only(quantization_config, calibration_data, calibration_config)
        else:
            model, report = self._static(
                quantization_config, calibration_tensors_range, calibration_data, calibration_config
            )
        if self.preparation is not None:
            report["prepare"] = self.preparation.to_dict()
        proto = ir.to_proto(model)
        try:
            onnx.checker.check_model(proto if proto.ByteSize() < 1_800_000_000 else proto, full_check=False)
        except onnx.checker.ValidationError as exc:  # a bug of ours, not bad input: say so plainly
            raise ModelError(f"the quantized model failed onnx.checker: {str(exc).splitlines()[0]}") from exc
        config_doc = {
            "ortq_version": _version(),
            "source_model": str(self.model_path),
            "quantization": quantization_config.to_dict(),
            "calibration": self._calibration_config.to_dict() if self._calibration_config else None,
        }
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            save_model(proto, tmp / file_name)
            if isinstance(quantization_config, QuantizationConfig):
                report["placement"] = self._placement(tmp / file_name)
            copy_side_files(self.model_dir, tmp)
            write_text_atomic(tmp / CONFIG_FILENAME, json.dumps(config_doc, indent=2) + "\n")
            write_text_atomic(tmp / PLAN_FILENAME, json.dumps(report, indent=2, default=str) + "\n")
        self.last_report = report
        logger.info("wrote %s", out / file_name)
        if error_report and isinstance(quantization_config, QuantizationConfig) and self.last_plan is not None:
            self._write_layer_report(out / file_name, report_data if report_data is not None else calibration_data)
        return out / file_name

    def _write_layer_report(self, path: Path, data: Any) -> None:
        """Per-layer local / cumulative error and clip rates, saved beside the model."""
        from ortq.validate import layer_report

        if data is None and self._calibration_batches is None:
            logger.warning("no data for the per-layer error report")
            return
        batches = list(self.batches(data, num_samples=64)) if data is not None else list(self._calibration_batches)
        report = layer_report(self.proto, path, self.last_plan, batches[:4])
        report.save(path.parent)

    def _static(
        self,
        config: QuantizationConfig,
        ranges: dict[str, TensorRange] | None,
        calibration_data: Any,
        calibration_config: CalibrationConfig | None,
    ) -> tuple[ir.Model, dict[str, Any]]:
        smoothed_with = self._smoothing[0] if self._smoothing else None
        notes: list[str] = []
        if ranges is None and self._collector is not None and smoothed_with != config.smooth_quant_alpha:
            if calibration_data is not None:
                self._collector = None  # recalibrate below with this config's smoothing
            else:
                # Ranges from an earlier fit() belong to the model as it was then: keep it that way.
                notes.append(
                    f"smooth_quant_alpha={config.smooth_quant_alpha!r} not applied: fit() calibrated with "
                    f"{smoothed_with!r}; pass quantization_config to fit() to use it"
                )
                logger.warning(notes[-1])
                config = dataclasses.replace(config, smooth_quant_alpha=smoothed_with)
        if ranges is None:
            if calibration_data is not None:
                ranges = self.fit(
                    calibration_data, calibration_config or CalibrationConfig(), quantization_config=config
                )
            elif self._collector is not None:
                ranges = self.compute_ranges()
            else:
                raise CalibrationDataError(
                    "static quantization needs activation ranges: pass calibration_data, call fit() first, "
                    "or pass calibration_tensors_range"
                )
        ranges = {k: _as_range(v) for k, v in ranges.items()}
        model = self._ir_model()
        int4 = self._int4_storage(model, config, ranges) if config.weight_storage_bits == 4 else None
        plan = make_plan(model, config, ranges)
        if not plan.quantized_nodes:
            raise ModelError(
                f"{self.model_path}: nothing was quantized; every candidate node stayed in float "
                f"(e.g. {next(iter(plan.float_nodes.items()), ('-', '-'))[1]})"
            )
        insert_qdq(model, plan, int4_weights=int4)
        if config.quantize_embeddings:
            from ortq.passes.embeddings import quantize_embedding_gathers

            quantize_embedding_gathers(model, plan, bits=config.weight_storage_bits)
        cpu_kernels = None
        if config.tune_cpu_kernels:
            from ortq.passes.cpu_kernels import avoid_slow_skip_layernorm

            cpu_kernels = avoid_slow_skip_layernorm(model)
        self.last_plan = plan
        report = {"method": "static_int8", "config": config.to_dict(), "notes": notes, "plan": plan.to_dict()}
        if cpu_kernels is not None:
            report["cpu_kernels"] = cpu_kernels
        if self._smoothing is not None:
            report["smooth_quant"] = {"alpha": self._smoothing[0], "activations": self._smoothing[1]}
        if self._collector is not None:
            report["calibration"] = self._collector.state.summary()
        return model, report

    def _int4_storage(self, model: ir.Model, config: QuantizationConfig, ranges: dict[str, TensorRange]):
        """4-bit codes for the per-channel MatMul weights the plan quantizes (GPTQ on the calibration data
        when it is at hand); the float weights are replaced by their 4-bit values so that the int8 scales
        are computed from what the file stores."""
        from ortq.passes.int4_storage import collect_hessians, int4_weights

        first = make_plan(model, config, ranges)
        nodes = {n.name: n for n in model.graph}
        targets: dict[str, str] = {}
        for name in first.quantized_nodes:
            node = nodes[name]
            w = node.inputs[1] if node.op_type == "MatMul" else None
            qp = first.weights.get(w.name) if w is not None else None
            if qp is not None and qp.axis == 1 and len(w.const_value.shape) == 2 and w.name not in targets:
                targets[w.name] = node.inputs[0].name
        if not targets:
            return None
        hessians = None
        if self._calibration_batches is not None:
            hessians = collect_hessians(model, targets, self._calibration_batches)
        values = {v.name: v for v in model.graph.initializers.values()}
        codes = int4_weights(
            {w: values[w].const_value.numpy() for w in targets}, block_size=config.storage_block_size, hessians=hessians
        )
        for name, bq in codes.items():
            values[name].const_value = ir.tensor(np.ascontiguousarray(bq.dequantize().T), name=name)
        logger.info("int4 storage for %d weights (%s)", len(codes), "GPTQ" if hessians else "RTN")
        return codes

    def _placement(self, path: Path) -> dict[str, Any]:
        """Which planned nodes ONNX Runtime's CPU EP really turned into integer kernels, and the int8 share
        of MatMul/Gemm/Conv FLOPs at one calibration batch."""
        from ortq.validate import inspect_placement

        try:
            placement = inspect_placement(path, "cpu", self._sample_feeds, runs=1)
        except Exception as exc:  # the report is an add-on: a failure here must not lose the model
            logger.warning("could not inspect the quantized model's placement: %s", exc)
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
        summary = placement.to_dict(include_nodes=False)
        planned = set(self.last_plan.quantized_nodes) if self.last_plan else set()
        unfused = [n for n in placement.unfused_qdq_groups if n in planned or not planned]
        if unfused:
            logger.warning("%d quantized node(s) did not fuse into integer kernels: %s", len(unfused), unfused[:5])
        flops = placement.flops
        if flops.get("int8_fraction") is not None:
            logger.info("int8 share of MatMul/Gemm/Conv FLOPs on the CPU EP: %.1f%%", 100 * flops["int8_fraction"])
        return summary

    def _weight_only(
        self, config: WeightOnlyConfig, calibration_data: Any, calibration_config: CalibrationConfig | None
    ) -> tuple[ir.Model, dict[str, Any]]:
        from ortq.passes.matmul_nbits import quantize_weight_only

        batches = None
        if calibration_data is not None:
            # GPTQ's Hessians want thousands of tokens; RTN only weighs channels with them.
            default = 512 if config.algorithm.value == "gptq" else 128
            num = calibration_config.num_samples if calibration_config and calibration_config.num_samples else default
            batches = self.batches(calibration_data, num_samples=num, batch_size=8)
        model, report = quantize_weight_only(self._ir_model(), config, calibration_batches=batches)
        if config.tune_cpu_kernels:
            from ortq.passes.cpu_kernels import avoid_slow_skip_layernorm

            report["cpu_kernels"] = avoid_slow_skip_layernorm(model)
        return model, {"method": "weight_only", **report}


def _as_range(value: Any) -> TensorRange:
    if isinstance(value, TensorRange):
        return value
    low, high = value  # Optimum's (min, max) tuples
    return TensorRange(low=float(low), high=float(high), num_values=1, num_excluded=0)


def _version() -> str:
    from ortq import __version__

    return __version__
