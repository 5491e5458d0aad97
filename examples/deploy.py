"""Export -> quantize -> validate, and refuse to deploy a model that lost too much.

Run it on the all-MiniLM-L6-v2 folder (or any Hugging Face folder / .gguf the exporter accepts)::

    python examples/deploy.py MODEL_DIR --work-dir /tmp/deploy --min-cosine 0.99
    python examples/deploy.py MODEL_DIR --work-dir /tmp/deploy --weight-only int4 --min-cosine 0.97

The script exits 0 and prints the path of the validated model when every threshold holds, and exits 1 with
the violations when one does not (e.g. ``--min-cosine 0.99999``). ``--require cuda`` makes a machine
without the CUDA execution provider fail the deploy instead of skipping the CUDA row. The report
(report.json, report.md, report.png) is written to ``WORK_DIR/report`` either way.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ortq.config import AutoCalibrationConfig, AutoQuantizationConfig, WeightOnlyConfig
from ortq.data import real_text
from ortq.errors import OrtqError
from ortq.export import export
from ortq.quantizer import ORTQuantizer
from ortq.validate import Thresholds, validate


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="Hugging Face model folder (or anything ortq.export.export accepts)")
    p.add_argument("--work-dir", required=True, help="fp32/, quantized/ and report/ are written here")
    p.add_argument("--weight-only", choices=["int4", "int8"], help="weight-only MatMulNBits instead of QDQ int8")
    p.add_argument("--calibration-samples", type=int, default=128, help="real sentences to calibrate on")
    p.add_argument("--num-samples", type=int, default=64, help="held-out sentences to validate on")
    p.add_argument("--providers", default="cpu", help="comma-separated: cpu,cuda,tensorrt")
    p.add_argument("--require", default="", help="providers that must be available, e.g. cuda")
    p.add_argument("--min-cosine", type=float, default=0.99, help="minimum mean cosine vs fp32")
    p.add_argument("--min-task-agreement", type=float, help="minimum task-level agreement (e.g. top-5)")
    p.add_argument("--max-latency-ratio", type=float, help="maximum quantized / fp32 median latency")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.work_dir)
    fp32_dir, q_dir, report_dir = work / "fp32", work / "quantized", work / "report"

    try:
        # 1. Export (parity with PyTorch is checked by the exporter).
        export(args.model, fp32_dir, overwrite=True)

        # 2. Quantize: static QDQ int8 with the preset for this CPU, calibrated on real sentences,
        #    or weight-only int4/int8.
        quantizer = ORTQuantizer.from_pretrained(fp32_dir)
        if args.weight_only:
            bits = 4 if args.weight_only == "int4" else 8
            quantizer.quantize(WeightOnlyConfig(bits=bits), q_dir, overwrite=True)
        else:
            quantizer.quantize(
                AutoQuantizationConfig.for_host(),
                q_dir,
                calibration_data=real_text("calibration", args.calibration_samples),
                calibration_config=AutoCalibrationConfig.minmax(num_samples=args.calibration_samples),
                overwrite=True,
            )

        # 3. Validate on held-out sentences (disjoint from the calibration split).
        report = validate(
            q_dir,
            fp32_dir,
            providers=[p for p in args.providers.split(",") if p],
            require=[p for p in args.require.split(",") if p],
            num_samples=args.num_samples,
            thresholds=Thresholds(
                min_cosine=args.min_cosine,
                min_task_agreement=args.min_task_agreement,
                max_latency_ratio=args.max_latency_ratio,
            ),
            report_dir=report_dir,
        )
    except OrtqError as exc:
        print(f"deploy: error: {exc}", file=sys.stderr)
        return exc.exit_code

    for row in report.providers:
        if row["status"] != "ok":
            print(f"{row['name']}: skipped ({row['reason']})")
            continue
        fid, task, lat = row["fidelity"], row.get("task") or {}, row.get("latency") or {}
        print(
            f"{row['name']}: cosine {fid['cosine']:.5f} (worst {fid['cosine_min']:.5f}), "
            f"SQNR {fid['sqnr_db']:.1f} dB, {task.get('metric', 'task')} {_fmt(task.get('agreement'))}, "
            f"latency ratio {lat.get('ratio', float('nan')):.2f}"
        )
    print(f"report: {report_dir}/report.md")
    if not report.ok:
        for v in report.violations:
            print(f"deploy: FAILED: {v}", file=sys.stderr)
        return 1
    print(f"deploy: OK, ship {q_dir / 'model.onnx'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
