"""Weight-only int4: ortq vs onnxruntime's MatMulNBitsQuantizer, side by side in one run.

* all-MiniLM-L6-v2 (feature extraction): mean / min cosine of mean-pooled embeddings to fp32 on held-out
  real sentences, size of all model files, CPU latency ratio vs fp32 (warm sessions, alternating A/B).
* SmolLM2-135M-Instruct (causal LM, exported from its Q4_1 GGUF): perplexity on held-out real text, size,
  CPU latency ratio vs fp32.

Calibration (GPTQ) uses ``ortq.data.real_text("calibration")``; evaluation ``real_text("heldout")``: the
two splits are disjoint. Run: ``python benchmarks/int4.py [--quick] [--skip-smollm2]``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ortq.config import WeightOnlyConfig
from ortq.data import real_text
from ortq.hostinfo import host_info
from ortq.passes.matmul_nbits import MatMulNBitsPass
from ortq.quantize_steps import weight_only_statistics
from ortq.runtime import SessionSettings, create_session

THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results"
Q41_NOTE = (
    "SmolLM2's fp32 weights are dequantized GGUF values: Q4_1 (4-bit, block 32, float min) for every linear "
    "layer and Q8_0 for the tied embedding / lm_head; re-quantizing them with integer zero points adds a "
    "second rounding on top of the first."
)


def _session(path: Path) -> ort.InferenceSession:
    """A CPU session with the benchmark's threads and no spinning pools (see :mod:`ortq.runtime`)."""
    return create_session(path, settings=SessionSettings(threads=THREADS))


def _files_mb(folder: Path) -> float:
    """All model files of the folder (graph and external data), in MB (1e6 bytes)."""
    return (
        sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data", ".onnx_data")) / 1e6
    )


def _latency_ratio(ref: ort.InferenceSession, test: ort.InferenceSession, feeds: dict, rounds: int) -> dict:
    """Warm both, then alternate A B A B; ratio = min(ref) / min(test) (> 1: test is faster)."""
    ref.run(None, feeds)
    test.run(None, feeds)
    ta, tb = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        ref.run(None, feeds)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        test.run(None, feeds)
        tb.append(time.perf_counter() - t)
    pair = np.median(np.array(ta) / np.array(tb))
    return {
        "fp32_ms": 1e3 * min(ta),
        "ms": 1e3 * min(tb),
        "speedup": min(ta) / min(tb),
        "speedup_median_pair": float(pair),
    }


def _save(model: ir.Model | onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    onnx.checker.check_model(proto)
    onnx.save(proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _ort_quantizer(src: Path, folder: Path, algo: str, block_size: int) -> tuple[Path, float]:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    t = time.perf_counter()
    if algo == "hqq":
        q = MatMulNBitsQuantizer(
            str(src), algo_config=HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
        )
    else:
        q = MatMulNBitsQuantizer(str(src), block_size=block_size, is_symmetric=False, accuracy_level=None)
    q.process()
    folder.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(folder / "model.onnx"), use_external_data_format=False)
    return folder / "model.onnx", time.perf_counter() - t


def _ortq(src: Path, folder: Path, config: WeightOnlyConfig, calib) -> tuple[Path, float, dict]:
    t = time.perf_counter()
    model = ir.load(str(src))
    stats = weight_only_statistics(model, config, calib) if calib is not None else {}
    quantize = MatMulNBitsPass(config, **stats)
    quantize(model)
    report = quantize.report
    secs = time.perf_counter() - t
    path = _save(model, folder)
    return path, secs, report


def _ortq_w4a8(src_dir: Path, folder: Path, calib_text: list[str]) -> tuple[Path, float, dict]:
    """Static int8 (host preset, SmoothQuant) whose MatMul weights are stored as 4-bit GPTQ blocks."""
    from ortq import AutoQuantizationConfig
    from ortq.quantizer import ORTQuantizer

    t = time.perf_counter()
    q = ORTQuantizer.from_pretrained(src_dir)
    q.show_progress = False
    path = q.quantize(
        AutoQuantizationConfig.for_host(weight_storage_bits=4), folder, calibration_data=calib_text, overwrite=True
    )
    return path, time.perf_counter() - t, q.last_report or {}


# ------------------------------------------------------------------------------------------------ MiniLM


def _minilm(work: Path, quick: bool) -> list[dict]:
    from transformers import AutoTokenizer

    from ortq.export import export
    from tests.conftest import minilm_source

    src_dir = work / "minilm-fp32"
    if not (src_dir / "model.onnx").is_file():
        export(str(minilm_source()), src_dir, task="feature-extraction", overwrite=True)
    src = src_dir / "model.onnx"
    tok = AutoTokenizer.from_pretrained(str(src_dir))
    n_eval = 128 if quick else 512
    held = real_text("heldout", n_eval)
    calib_text = real_text("calibration", 128)
    calib = [dict(tok(calib_text[i : i + 16], padding=True, return_tensors="np")) for i in range(0, 128, 16)]

    variants = {
        "ortq int4 rtn": lambda d: _ortq(src, d, WeightOnlyConfig(block_size=32), None),
        "ortq int4 gptq": lambda d: _ortq(src, d, WeightOnlyConfig(block_size=32, algorithm="gptq"), calib),
        "ortq int4 gptq block 128": lambda d: _ortq(
            src, d, WeightOnlyConfig(block_size=128, algorithm="gptq"), calib
        ),
        "ortq W4A8 (int4 storage, int8 kernels)": lambda d: _ortq_w4a8(src_dir, d, calib_text),
        "ort MatMulNBits rtn": lambda d: _ort_quantizer(src, d, "rtn", 32) + ({},),
        "ort MatMulNBits hqq": lambda d: _ort_quantizer(src, d, "hqq", 32) + ({},),
    }
    fp32 = _session(src)
    batches = [
        dict(tok(held[i : i + 32], padding=True, return_tensors="np")) for i in range(0, len(held), 32)
    ]
    names = {i.name for i in fp32.get_inputs()}
    batches = [{k: v for k, v in b.items() if k in names} for b in batches]

    def pooled(sess):
        out = []
        for b in batches:
            h = sess.run(None, b)[0]
            m = b["attention_mask"][..., None].astype(np.float32)
            out.append((h * m).sum(1) / m.sum(1))
        return np.concatenate(out)

    ref = pooled(fp32)
    lat_feeds = {k: v[:8] for k, v in batches[0].items()}
    rows = [
        {"model": "MiniLM", "variant": "fp32", "size_mb": _files_mb(src_dir), "mean_cos": 1.0, "min_cos": 1.0}
    ]
    for name, make in variants.items():
        folder = work / ("minilm-" + name.replace(" ", "-"))
        path, secs, report = make(folder)
        sess = _session(path)
        emb = pooled(sess)
        cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
        lat = _latency_ratio(fp32, sess, lat_feeds, 10 if quick else 30)
        rows.append(
            {
                "model": "MiniLM",
                "variant": name,
                "size_mb": _files_mb(folder),
                "mean_cos": float(cos.mean()),
                "min_cos": float(cos.min()),
                "quantize_s": secs,
                **lat,
                "bytes_after": report.get("bytes_after"),
            }
        )
        del sess
        gc.collect()
    return rows


# ----------------------------------------------------------------------------------------------- SmolLM2


def _smollm2(work: Path, quick: bool) -> list[dict]:
    from transformers import AutoTokenizer

    from ortq.export import export
    from tests.conftest import smollm2_source

    src_dir = work / "smollm2-fp32"
    if not (src_dir / "model.onnx").is_file():
        export(str(smollm2_source()), src_dir, task="causal-lm-no-past", overwrite=True)
    src = src_dir / "model.onnx"
    tok = AutoTokenizer.from_pretrained(str(src_dir))
    seq = 256

    def chunks(split: str, n: int) -> list[np.ndarray]:
        ids = tok("\n".join(real_text(split)))["input_ids"]
        return [np.array(ids[i * seq : (i + 1) * seq], np.int64) for i in range(min(n, len(ids) // seq))]

    fp32 = _session(src)
    input_names = {i.name for i in fp32.get_inputs()}

    def feeds(x: np.ndarray) -> dict[str, np.ndarray]:
        f = {"input_ids": x[None], "attention_mask": np.ones((1, len(x)), np.int64)}
        if "position_ids" in input_names:
            f["position_ids"] = np.arange(len(x), dtype=np.int64)[None]
        return f

    held = chunks("heldout", 6 if quick else 16)
    calib = [feeds(c) for c in chunks("calibration", 64)]

    def ppl(sess) -> float:
        nll, cnt = 0.0, 0
        for x in held:
            lg = sess.run(None, feeds(x))[0][0]
            lg = lg.astype(np.float64)
            lg -= lg.max(-1, keepdims=True)
            lp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
            nll -= lp[np.arange(seq - 1), x[1:]].sum()
            cnt += seq - 1
        return float(np.exp(nll / cnt))

    variants = {
        "ortq int4 rtn": lambda d: _ortq(src, d, WeightOnlyConfig(block_size=32), None),
        "ortq int4 gptq": lambda d: _ortq(src, d, WeightOnlyConfig(block_size=32, algorithm="gptq"), calib),
        "ort MatMulNBits rtn": lambda d: _ort_quantizer(src, d, "rtn", 32) + ({},),
        "ort MatMulNBits hqq": lambda d: _ort_quantizer(src, d, "hqq", 32) + ({},),
    }
    base = ppl(fp32)
    lat_feeds = feeds(held[0][:128])
    rows = [
        {"model": "SmolLM2", "variant": "fp32", "size_mb": _files_mb(src_dir), "ppl": base, "ppl_rel": 0.0}
    ]
    for name, make in variants.items():
        folder = work / ("smollm2-" + name.replace(" ", "-"))
        path, secs, report = make(folder)
        sess = _session(path)
        p = ppl(sess)
        lat = _latency_ratio(fp32, sess, lat_feeds, 5 if quick else 15)
        rows.append(
            {
                "model": "SmolLM2",
                "variant": name,
                "size_mb": _files_mb(folder),
                "ppl": p,
                "ppl_rel": p / base - 1.0,
                "quantize_s": secs,
                **lat,
                "bytes_after": report.get("bytes_after"),
            }
        )
        del sess
        gc.collect()
    return rows


def _table(rows: list[dict]) -> str:
    head = f"{'model':8} {'variant':22} {'MB':>7} {'mean cos':>9} {'min cos':>8} {'ppl':>8} {'Δppl':>7} {'speedup':>8} {'quant s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:

        def f(key, fmt, r=r):
            return format(r[key], fmt) if r.get(key) is not None else "-"

        lines.append(
            f"{r['model']:8} {r['variant']:22} {f('size_mb', '7.1f'):>7} {f('mean_cos', '9.4f'):>9} "
            f"{f('min_cos', '8.4f'):>8} {f('ppl', '8.2f'):>8} "
            f"{(format(100 * r['ppl_rel'], '+6.1f') + '%') if r.get('ppl_rel') is not None else '-':>7} "
            f"{(f('speedup', '7.2f') + 'x') if r.get('speedup') else '-':>8} {f('quantize_s', '8.1f'):>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and timing rounds")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--work-dir", help="keep exported / quantized models here (default: a temporary dir)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        if not args.skip_minilm:
            rows += _minilm(work, args.quick)
        if not args.skip_smollm2:
            rows += _smollm2(work, args.quick)
    print(
        f"ONNX Runtime {ort.__version__}, CPUExecutionProvider, intra_op_num_threads={THREADS}; "
        "speedup = fp32 latency / variant latency (warm, alternating, min of rounds)"
    )
    print(_table(rows))
    if not args.skip_smollm2:
        print("note:", Q41_NOTE)
    doc = {
        "benchmark": "int4",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(gpus=False),
        "threads": THREADS,
        "quick": args.quick,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "notes": [Q41_NOTE],
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "int4.json"
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    os.replace(tmp_out, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
