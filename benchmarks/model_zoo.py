"""Static int8 on the ONNX model zoo's classic convnets, as the ``onnx`` package ships them for its backend tests.

``onnx/backend/test/data/light/*.onnx`` are the model zoo's graphs (opset 9, Caffe2 / Caffe exports: AlexNet,
DenseNet-121, Inception v1 / v2, ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512) with their weights
replaced by constants: structure and speed are real, fidelity is not (every output is the same), so only the
first are reported. Each graph is quantized with ortq's defaults (random normal calibration inputs, batch 1 as
the graphs fix it) and checked with ``ortq validate``'s machinery: placement of the quantized graph (convolutions
in integer kernels, Q/DQ left unfused) and latency at batch 1 against the fp32 graph (2 threads, min over
alternated rounds).

    python benchmarks/model_zoo.py [--rounds 10] [--models resnet50,shufflenet]

Prints a table and writes benchmarks/results/model_zoo.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ortq.config import CalibrationConfig, QuantizationConfig
from ortq.errors import OrtqError
from ortq.quantizer import ORTQuantizer
from ortq.runtime import SessionSettings, create_session
from ortq.validate.latency import fastest_alternated
from ortq.validate.placement import inspect_placement

THREADS = 2
RESULTS = Path(__file__).parent / "results"


def zoo_folder() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def input_name(path: Path) -> str:
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    sessions = {k: create_session(p, settings=SessionSettings(threads=THREADS)) for k, p in paths.items()}
    return fastest_alternated(sessions, feeds, rounds)


def run_model(path: Path, rounds: int, work: Path) -> dict:
    name = input_name(path)
    rng = np.random.default_rng(0)
    np.savez(work / "calib.npz", **{name: rng.normal(size=(8, 3, 224, 224)).astype(np.float32)})
    t = time.perf_counter()
    try:
        q = ORTQuantizer.from_pretrained(path)
        q.show_progress = False
        out = q.quantize(QuantizationConfig(), work / "q", calibration_data=str(work / "calib.npz"),
                         calibration_config=CalibrationConfig(batch_size=1))
    except OrtqError as exc:
        return {"error": str(exc)}
    seconds = time.perf_counter() - t
    report = json.loads((out.parent / "quantization_report.json").read_text())
    feeds = {name: rng.normal(size=(1, 3, 224, 224)).astype(np.float32)}
    lat = latency({"fp32": path, "int8": out}, feeds, rounds)
    placement = inspect_placement(out, "cpu", feeds, runs=1)
    prep = report.get("prepare", {})
    return {
        "source_opset": prep.get("source_opset"), "folded_batch_norms": prep.get("folded_batch_norms"),
        "quantize_seconds": round(seconds, 1),
        "fp32_ms": 1e3 * lat["fp32"], "int8_ms": 1e3 * lat["int8"], "speedup": lat["fp32"] / lat["int8"],
        "convolutions": placement.convolutions, "unfused_qdq": placement.unfused_qdq,
        "int8_flop_fraction": placement.flops["int8_fraction"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--models", default=None, help="comma-separated names without 'light_' (default: all)")
    args = ap.parse_args()
    paths = sorted(zoo_folder().glob("light_*.onnx"))
    if args.models:
        wanted = {f"light_{m}" for m in args.models.split(",")}
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        raise SystemExit(f"error: no model-zoo graphs found in {zoo_folder()}")
    results = {}
    for p in paths:
        with tempfile.TemporaryDirectory(prefix="ortq-zoo-") as tmp:
            results[p.stem[len("light_"):]] = run_model(p, args.rounds, Path(tmp))
    print(f"ONNX model zoo graphs (onnx {onnx.__version__} test copies, constant weights), static int8, batch 1, "
          f"{THREADS} threads")
    print(f"{'model':14} {'opset':>5} {'BN folded':>9} {'int8 conv':>9} {'Q/DQ left':>9} {'fp32 ms':>8} {'int8 ms':>8} "
          f"{'speedup':>7}")
    for k, r in results.items():
        if "error" in r:
            print(f"{k:14} error: {r['error']}")
            continue
        c = r["convolutions"]
        left = sum(r["unfused_qdq"].values())
        print(f"{k:14} {r['source_opset']:>5} {r['folded_batch_norms']:>9} {c['int8']:>4}/{c['total']:<4} {left:>9} "
              f"{r['fp32_ms']:8.2f} {r['int8_ms']:8.2f} {r['speedup']:7.2f}")
    RESULTS.mkdir(exist_ok=True)
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
           "threads": THREADS, "results": results}
    (RESULTS / "model_zoo.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
