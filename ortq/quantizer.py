"""``ORTQuantizer``: the pipeline behind Optimum's names.

    quantizer = ORTQuantizer.from_pretrained("exported/")           # a folder with model.onnx, or a .onnx file
    ranges = quantizer.fit(data, AutoCalibrationConfig.minmax())     # calibrate (streaming statistics)
    quantizer.quantize(save_dir="int8/", quantization_config=AutoQuantizationConfig.avx2())

``partial_fit`` adds data to the running statistics, ``compute_ranges`` turns them into ranges, and the state
can be saved and resumed (``save_calibration_state`` / ``load_calibration_state``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from ortq.calibrators.base import TensorRange
from ortq.calibrators.collect import CalibrationState
from ortq.calibrators.engine import materialize
from ortq.config import (
    AnyQuantizationConfig,
    AutoQuantizationConfig,
    CalibrationConfig,
    QuantizationConfig,
    WeightOnlyAlgorithm,
    WeightOnlyConfig,
)
from ortq.data import Batches
from ortq.errors import CalibrationDataError, ConfigError
from ortq.io import MODEL_FILENAME, check_output_dir, resolve_model_path
from ortq.passes.plan import QuantPlan
from ortq.passes.prepare import Preparation
from ortq.quantize_steps import CONFIG_FILENAME, PLAN_FILENAME, Quantized, QuantizeSteps

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FILENAME", "PLAN_FILENAME", "ORTQuantizer"]


class ORTQuantizer:
    """Calibrates and quantizes one ONNX model; the work is done by its :class:`~ortq.quantize_steps.QuantizeSteps`.

    Attributes:
        last_plan: the plan of the last static quantization (a reason per node left in float).
        last_report: the report written with the last quantized model.
        show_progress: draw calibration progress bars (on a terminal; the CLI turns them off with --quiet).
    """

    def __init__(self, model_path: Path):
        self.model_path = resolve_model_path(model_path)
        self.model_dir = self.model_path.parent
        self._steps: QuantizeSteps | None = None
        self.last_plan: QuantPlan | None = None
        self.last_report: dict[str, Any] | None = None
        self.show_progress = True

    @classmethod
    def from_pretrained(cls, model_or_path: str | os.PathLike, file_name: str | None = None) -> ORTQuantizer:
        """A quantizer for an exported folder (``model.onnx`` inside) or a ``.onnx`` file."""
        path = Path(model_or_path)
        if file_name is not None:
            path = path / file_name
        quantizer = cls(path)
        _ = quantizer.steps  # fail early on a bad model
        return quantizer

    @property
    def steps(self) -> QuantizeSteps:
        """The model and the steps that quantize it (loaded and prepared on first use)."""
        if self._steps is None:
            self._steps = QuantizeSteps(self.model_path)
        return self._steps

    @property
    def model(self) -> ir.Model:
        """The float model as calibrated (prepared; SmoothQuant applied when it was requested)."""
        return self.steps.model

    @property
    def preparation(self) -> Preparation:
        """What loading normalized (opset upgrade, lifted Constant nodes) and the nodes it leaves in float."""
        return self.steps.preparation

    # ------------------------------------------------------------------------------------------ calibration

    def batches(
        self, dataset: Any, *, batch_size: int = 16, num_samples: int | None = None, max_length: int = 128
    ) -> Batches:
        """Turn ``dataset`` into batches of feeds for this model (see :mod:`ortq.data`)."""
        return self.steps.batches(dataset, batch_size=batch_size, num_samples=num_samples, max_length=max_length)

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
        engine: Any = None,
    ) -> None:
        """Add ``dataset`` to the running activation statistics (tokenized once, kept for later steps).

        ``engine`` runs the statistics: a :class:`~ortq.calibrators.engine.RayEngine` splits the batches into
        shards for the workers of a Ray cluster and merges their states here, with the same ranges, to the
        bit, as a run in this process. ``dataset`` may then also be a ``ray.data.Dataset``.
        """
        steps = self.steps
        if steps.calibration_config is not None and calibration_config != steps.calibration_config:
            raise ConfigError("partial_fit called with a different calibration config than before")
        feeds = list(self.batches(materialize(dataset), batch_size=batch_size or calibration_config.batch_size,
                                  num_samples=calibration_config.num_samples, max_length=max_length))
        qconfig = quantization_config or QuantizationConfig()
        if operators_to_quantize:
            qconfig = dataclasses.replace(qconfig, operators_to_quantize=tuple(operators_to_quantize))
        steps.calibrate(feeds, calibration_config, qconfig, providers=providers,
                        show_progress=self.show_progress if show_progress is None else show_progress,
                        engine=engine)

    def compute_ranges(self) -> dict[str, TensorRange]:
        """Ranges from the statistics gathered so far."""
        return self.steps.ranges()

    def fit(self, dataset: Any, calibration_config: CalibrationConfig, **kwargs: Any) -> dict[str, TensorRange]:
        """Calibrate on ``dataset`` from scratch and return the ranges (Optimum's ``fit``)."""
        self.steps.reset()
        self.partial_fit(dataset, calibration_config, **kwargs)
        return self.compute_ranges()

    @property
    def calibration_state(self) -> CalibrationState:
        if self.steps.collector is None:
            raise CalibrationDataError("no calibration state: call fit() or partial_fit() first")
        return self.steps.collector.state

    def save_calibration_state(self, path: str | os.PathLike) -> None:
        self.calibration_state.save(path)

    def load_calibration_state(
        self, path: str | os.PathLike, calibration_config: CalibrationConfig, **kwargs: Any
    ) -> None:
        """Resume from saved statistics; further ``partial_fit`` calls add to them."""
        self.steps.resume(CalibrationState.load(path), calibration_config, providers=kwargs.get("providers"))

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
        budget_options: dict[str, Any] | None = None,
        engine: Any = None,
    ) -> Path:
        """Quantize and write ``save_dir/model.onnx`` with the config used and the tokenizer files.

        Both argument orders work: Optimum's ``quantize(quantization_config, save_dir)`` and
        ``quantize(save_dir, quantization_config)``. Static configs need ranges: from
        ``calibration_tensors_range``, from an earlier ``fit``, or by calibrating on ``calibration_data``.

        An accuracy budget (``max_cosine_drop``, or ``eval_fn(model_path) -> float`` with ``min_metric`` /
        ``max_metric_drop``) keeps the fewest nodes in float that meet it (:mod:`ortq.fallback`; needs
        ``calibration_data``, a quarter of which is set aside to check the budget; ``budget_options`` go to
        :func:`ortq.fallback.search_fallback`, e.g. ``max_evaluations``, ``latency_runs``). ``error_report``
        writes the per-layer error report (``layer_report.{json,md,png}``) beside the model, on
        ``report_data`` or the calibration data. ``engine`` runs calibration and weight statistics (see
        :meth:`partial_fit`).
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
        out = check_output_dir(save_dir, inputs=(self.model_path,), overwrite=overwrite)
        steps = self.steps
        layer_batches = layer_data = None
        config_used = quantization_config
        if budget:
            cc = calibration_config or CalibrationConfig()
            feeds = list(self.batches(calibration_data, batch_size=cc.batch_size, num_samples=cc.num_samples))
            done, result, held = steps.with_budget(
                quantization_config, feeds, cc, show_progress=self.show_progress, max_cosine_drop=max_cosine_drop,
                eval_fn=eval_fn, min_metric=min_metric, max_metric_drop=max_metric_drop, **(budget_options or {}),
            )
            config_used = dataclasses.replace(
                quantization_config,
                nodes_to_exclude=tuple(quantization_config.nodes_to_exclude) + tuple(result.kept_float),
            )
            if error_report:
                if report_data is not None:
                    layer_batches, layer_data = list(self.batches(report_data, batch_size=cc.batch_size)), "report data"
                else:
                    layer_batches, layer_data = held, "calibration samples set aside for the budget"
        elif isinstance(quantization_config, WeightOnlyConfig):
            quantization_config, calibration_data = self._weight_only_defaults(quantization_config, calibration_data)
            done = steps.weight_only(quantization_config, self._weight_only_feeds(
                quantization_config, calibration_data, calibration_config), engine=engine)
        else:
            done = self._static(quantization_config, calibration_tensors_range, calibration_data, calibration_config,
                                engine=engine)
            if error_report:
                layer_batches = self._layer_batches(report_data if report_data is not None else calibration_data)
        config_doc = {
            "ortq_version": _version(),
            "source_model": str(self.model_path),
            "quantization": config_used.to_dict(),
            "calibration": steps.calibration_config.to_dict() if steps.calibration_config else None,
        }
        sample = steps.calibration_batches[0] if steps.calibration_batches else None
        path = steps.write(done, out, file_name=file_name, config_doc=config_doc, overwrite=overwrite,
                           sample_feeds=sample, layer_batches=layer_batches, layer_data=layer_data)
        self.last_plan, self.last_report = done.plan, done.report
        return path

    def _layer_batches(self, data: Any) -> list | None:
        if data is None and self.steps.calibration_batches is None:
            logger.warning("no data for the per-layer error report")
            return None
        batches = list(self.batches(data, num_samples=64)) if data is not None else self.steps.calibration_batches
        return batches[:4]

    def _static(
        self,
        config: QuantizationConfig,
        ranges: dict[str, TensorRange] | None,
        calibration_data: Any,
        calibration_config: CalibrationConfig | None,
        engine: Any = None,
    ) -> Quantized:
        steps = self.steps
        smoothed_with = steps.smoothing["alpha"] if steps.smoothing else None
        notes: list[str] = []
        if ranges is None and steps.collector is not None and smoothed_with != config.smooth_quant_alpha:
            if calibration_data is None:
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
                    calibration_data, calibration_config or CalibrationConfig(), quantization_config=config,
                    engine=engine,
                )
            elif steps.collector is not None:
                ranges = self.compute_ranges()
            else:
                raise CalibrationDataError(
                    "static quantization needs activation ranges: pass calibration_data, call fit() first, "
                    "or pass calibration_tensors_range"
                )
        return steps.static(config, {k: _as_range(v) for k, v in ranges.items()}, notes=notes)

    def _weight_only_defaults(self, config: WeightOnlyConfig, calibration_data: Any) -> tuple[WeightOnlyConfig, Any]:
        """GPTQ (the default) without calibration data calibrates a text model on mixed-domain passages
        (:func:`ortq.corpus.passages`); a model without a tokenizer falls back to RTN, with a warning."""
        if calibration_data is not None or config.algorithm.value != "gptq":
            return config, calibration_data
        from ortq.io import has_tokenizer

        if has_tokenizer(self.model_path.parent):
            from ortq.corpus import passages

            logger.info("weight-only gptq: no calibration data, using mixed-domain passages (ortq.corpus)")
            return config, passages("mixed", "calibration")
        logger.warning("weight-only gptq needs calibration data and the model has no tokenizer: using rtn")
        return dataclasses.replace(config, algorithm=WeightOnlyAlgorithm.RTN), None

    def _weight_only_feeds(
        self, config: WeightOnlyConfig, calibration_data: Any, calibration_config: CalibrationConfig | None
    ) -> list | None:
        if calibration_data is None:
            return None
        # GPTQ's Hessians want thousands of tokens; RTN only weighs channels with them.
        default = 512 if config.algorithm.value == "gptq" else 128
        num = calibration_config.num_samples if calibration_config and calibration_config.num_samples else default
        return list(self.batches(materialize(calibration_data), num_samples=num, batch_size=8))


def _as_range(value: Any) -> TensorRange:
    if isinstance(value, TensorRange):
        return value
    low, high = value  # Optimum's (min, max) tuples
    return TensorRange(low=float(low), high=float(high), num_values=1, num_excluded=0)


def _version() -> str:
    from ortq import __version__

    return __version__
