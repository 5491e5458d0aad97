"""``ortq run``: export -> calibrate -> quantize (int8 QDQ, int4 weight-only) -> validate, for a recipe."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ortq.config import AutoCalibrationConfig, AutoQuantizationConfig, WeightOnlyConfig
from ortq.data import real_text

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SAMPLES = 256


@dataclass
class Row:
    """One line of the run table: a model variant and how it compares with fp32 on the CPU EP."""

    name: str
    path: Path
    size_mb: float
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    def cpu(self) -> dict[str, Any]:
        for p in self.report.get("providers", []):
            if p.get("name") == "cpu" and p.get("status") == "ok":
                return p
        return {}


@dataclass
class RunResult:
    """The run table's rows. ``kept`` says whether ``work_dir`` still holds the outputs (a run without a
    work folder uses a temporary one, removed when the run ends)."""

    recipe: str
    work_dir: Path
    rows: list[Row]
    num_calibration_samples: int
    num_heldout_samples: int
    export_max_abs_diff: float | None
    fp32_size_mb: float = 0.0
    kept: bool = True

    def table(self) -> str:
        where = (
            f"outputs in {self.work_dir}"
            if self.kept
            else "outputs removed with their temporary folder (pass --work-dir DIR to keep them)"
        )
        head = (
            f"ortq run {self.recipe}: {self.num_calibration_samples} calibration / "
            f"{self.num_heldout_samples} held-out real sentences, CPU EP, 2 threads, {where}\n"
        )
        cols = [
            "model", "size MB", "output cosine mean / min", "SQNR dB", "embedding cosine mean / min",
            "task agreement", "latency ms", "speedup",
        ]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        fp32_ms = None
        for row in self.rows:
            cpu = row.cpu()
            lat = cpu.get("latency") or {}
            if fp32_ms is None and lat:
                fp32_ms = (lat.get("reference") or {}).get("median_ms")
            fid = cpu.get("fidelity") or {}
            task = cpu.get("task") or {}
            q_ms = (lat.get("quantized") or {}).get("median_ms")
            ratio = lat.get("ratio")
            agreement = task.get("agreement")
            lines.append(
                "| "
                + " | ".join(
                    [
                        row.name,
                        f"{row.size_mb:.1f}",
                        f"{_fmt(fid.get('cosine'), '.4f')} / {_fmt(fid.get('cosine_min'), '.4f')}",
                        _fmt(fid.get("sqnr_db"), ".1f"),
                        f"{_fmt(task.get('embedding_cosine_mean'), '.4f')} / {_fmt(task.get('embedding_cosine_min'), '.4f')}"
                        if "embedding_cosine_mean" in task
                        else "–",
                        f"{task.get('metric', '')} {_fmt(agreement, '.3f')}".strip() if task else "–",
                        _fmt(q_ms, ".1f"),
                        f"{1 / ratio:.2f}x" if ratio else "–",
                    ]
                )
                + " |"
            )
        fp32 = f"| fp32 | {self.fp32_size_mb:.1f} | 1 / 1 | – | 1 / 1 | – | {_fmt(fp32_ms, '.1f')} | 1.00x |"
        lines.insert(2, fp32)
        extra = ""
        if self.export_max_abs_diff is not None:
            extra = f"\nexport parity: max abs diff ONNX vs torch = {self.export_max_abs_diff:.2e}\n"
        return head + "\n".join(lines) + "\n" + extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "work_dir": str(self.work_dir) if self.kept else None,
            "num_calibration_samples": self.num_calibration_samples,
            "num_heldout_samples": self.num_heldout_samples,
            "export_max_abs_diff": self.export_max_abs_diff,
            "fp32_size_mb": self.fp32_size_mb,
            "rows": [
                {"name": r.name, "path": str(r.path), "size_mb": r.size_mb, "seconds": r.seconds, "report": r.report}
                for r in self.rows
            ],
        }


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _size_mb(folder: Path) -> float:
    """All model files of a folder together (the graph plus any external data), in MB."""
    total = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data"))
    return total / 1e6


def run_recipe(
    recipe: str | os.PathLike | None = None,
    *,
    work_dir: str | os.PathLike | None = None,
    num_samples: int | None = None,
    num_heldout: int = 128,
    with_int4: bool = True,
    calibration_method: str = "minmax",
    overwrite: bool = True,
) -> RunResult:
    """Run the whole pipeline on ``recipe`` (default: all-MiniLM-L6-v2) and compare every variant with fp32.

    Outputs go to ``work_dir``; without one, to a temporary folder that is removed when the run ends.
    """
    from ortq.recipes import DEFAULT_RECIPE, load_recipe

    rec = load_recipe(recipe or DEFAULT_RECIPE)
    if work_dir is not None:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        return _run(rec, work, num_samples, num_heldout, with_int4, calibration_method, overwrite)
    with tempfile.TemporaryDirectory(prefix=f"ortq-run-{rec.name}-") as tmp:
        result = _run(rec, Path(tmp), num_samples, num_heldout, with_int4, calibration_method, overwrite)
    result.kept = False
    return result


def _run(rec, work: Path, num_samples, num_heldout, with_int4, calibration_method, overwrite) -> RunResult:
    from ortq.quantizer import ORTQuantizer
    from ortq.validate import validate

    start = time.perf_counter()
    exported = rec.export(work / "fp32", work_dir=work / "source", overwrite=overwrite)
    logger.info("exported in %.1f s", time.perf_counter() - start)

    n_cal = num_samples or DEFAULT_CALIBRATION_SAMPLES
    calibration = real_text("calibration", n_cal)
    heldout = real_text("heldout", num_heldout)

    rows: list[Row] = []
    quantizer = ORTQuantizer.from_pretrained(work / "fp32")
    variants: list[tuple[str, Any, Any]] = [
        ("int8 static (QDQ)", AutoQuantizationConfig.for_host(), AutoCalibrationConfig.from_method(calibration_method)),
    ]
    if with_int4:
        variants.append(
            (
                "int4 weights + int8 compute (W4A8)",
                AutoQuantizationConfig.for_host(weight_storage_bits=4),
                AutoCalibrationConfig.from_method(calibration_method),
            )
        )
        variants.append(("int4 weight-only MatMulNBits (GPTQ)", WeightOnlyConfig(block_size=32, algorithm="gptq"), None))
    for i, (name, qconfig, cconfig) in enumerate(variants):
        out = work / ("int8", "w4a8", "int4")[i]
        t0 = time.perf_counter()
        path = quantizer.quantize(
            qconfig,
            out,
            calibration_data=calibration,
            calibration_config=cconfig,
            overwrite=overwrite,
        )
        seconds = time.perf_counter() - t0
        report = validate(path, work / "fp32", heldout, providers=("cpu",), num_samples=num_heldout, report_dir=out / "report")
        rows.append(Row(name=name, path=path, size_mb=_size_mb(out), seconds=seconds, report=report.to_dict()))
    return RunResult(
        recipe=rec.name,
        work_dir=work,
        rows=rows,
        num_calibration_samples=len(calibration),
        num_heldout_samples=len(heldout),
        export_max_abs_diff=getattr(exported, "max_abs_diff", None),
        fp32_size_mb=_size_mb(work / "fp32"),
    )
