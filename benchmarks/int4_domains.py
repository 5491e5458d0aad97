"""int4 weight-only recipes of a causal LM on unseen text: perplexity change vs fp32 in-domain (Python
documentation) and out-of-domain (news), and the size on disk of each recipe.

Every recipe is calibrated on the same statistics: the ones the default ``ortq quantize FOLDER -o OUT
--weight-only int4`` gathers (mixed-domain ``calibration`` passages of :mod:`ortq.corpus`, 512 passages of 128
tokens). Evaluation uses the disjoint ``heldout`` split only: 24 passages per domain cut to 256 tokens
(:func:`ortq.validate.generative.perplexity_agreement`), 2 threads.

Run (the fp32 folder from ``ortq export SmolLM2-135M-Instruct.Q4_1.gguf -o FP32``)::

    python benchmarks/int4_domains.py FP32 [--recipes default gptq-sym ...] [--work DIR] [--stats-cache FILE]

Prints a table (in-domain %, news %, MB) and writes ``benchmarks/results/int4_domains.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ortq.config import WeightOnlyConfig
from ortq.corpus import passages
from ortq.data import load_tokenizer
from ortq.hostinfo import host_info
from ortq.io import copy_side_files
from ortq.passes.cpu_kernels import CpuKernelsPass
from ortq.passes.matmul_nbits import MatMulNBitsPass
from ortq.quantize_steps import weight_only_statistics
from ortq.quantizer import ORTQuantizer
from ortq.validate.generative import DecoderSession, perplexity_agreement

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2

# name -> (description, WeightOnlyConfig overrides)
_CARRY = {"keep_source_grid": True, "symmetric": False, "sensitive_budget": 0.0}
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "default": ("default: gptq symmetric + sensitive_budget 0.1 (the most sensitive layers carry their grid), "
                "float16 scales", {}),
    "default-exact": ("default with exact float block offsets (`--no-fold-block-offsets`): two MatMuls and an Add "
                      "per offset layer", {"fold_block_offsets": False}),
    "default-lm4": ("default with a 4-bit lm_head unless the budget upgrades it (`--no-auto-int8`)",
                    {"auto_int8_sensitive": False}),
    "lm4-offsets60": ("4-bit lm_head, at most 60 layers with block offsets",
                      {"auto_int8_sensitive": False, "max_offset_layers": 60}),
    "lm4-offsets30": ("4-bit lm_head, at most 30 layers with block offsets",
                      {"auto_int8_sensitive": False, "max_offset_layers": 30}),
    "keep-grid": ("GGUF grid carried everywhere (`--keep-source-grid`), float16 scales and offsets", dict(_CARRY)),
    "keep-grid-exact": ("GGUF grid carried everywhere, exact float16 block offsets (`--keep-source-grid "
                        "--no-fold-block-offsets`)", {**_CARRY, "fold_block_offsets": False}),
    "old-default": ("GGUF grid carried everywhere, float32 scales and offsets (old default)",
                    {**_CARRY, "float16_scales": False}),
    "gptq-asym-fp32": ("re-quantized: gptq asymmetric, float32 scales (old default without the grid)",
                       {"keep_source_grid": False, "symmetric": False, "sensitive_budget": 0.0,
                        "float16_scales": False}),
    "no-offsets": ("gptq symmetric + sensitive_budget 0.1, upgrades to 8 bits only (`--no-block-offsets`)",
                   {"block_offsets": False}),
    "all-4bit": ("gptq symmetric everywhere, lm_head too (`--sensitive-budget 0 --no-auto-int8`)",
                 {"sensitive_budget": 0.0, "auto_int8_sensitive": False}),
    "all-4bit-asym": ("gptq asymmetric (integer zero points) everywhere, lm_head too",
                      {"sensitive_budget": 0.0, "auto_int8_sensitive": False, "symmetric": False}),
    "asym-lm8": ("gptq asymmetric (integer zero points), 8-bit tied lm_head, no budget",
                 {"sensitive_budget": 0.0, "symmetric": False}),
    "asym-budget": ("gptq asymmetric + sensitive_budget 0.1 upgrading to 8 bits only (no block offsets)",
                    {"symmetric": False, "block_offsets": False}),
    "asym-budget-lm4": ("gptq asymmetric, 4-bit lm_head unless measured, sensitive_budget 0.15 to 8 bits only",
                        {"symmetric": False, "block_offsets": False, "auto_int8_sensitive": False,
                         "sensitive_budget": 0.15}),
    "asym-budget-lm4-25": ("gptq asymmetric, 4-bit lm_head unless measured, sensitive_budget 0.25 to 8 bits only",
                           {"symmetric": False, "block_offsets": False, "auto_int8_sensitive": False,
                            "sensitive_budget": 0.25}),
    "default-bc": ("default + bias correction (mean output error as a bias, centred GPTQ)",
                   {"bias_correction": True}),
    "asym-budget-bc": ("asym-budget + bias correction",
                       {"symmetric": False, "block_offsets": False, "bias_correction": True}),
    "all-4bit-asym-bc": ("all-4bit-asym + bias correction",
                         {"sensitive_budget": 0.0, "auto_int8_sensitive": False, "symmetric": False,
                          "bias_correction": True}),
    "asym-offsets30": ("gptq asymmetric + sensitive_budget 0.1, at most 30 layers with block offsets",
                       {"symmetric": False, "max_offset_layers": 30}),
    "sym-offsets30": ("default with at most 30 layers with block offsets",
                      {"max_offset_layers": 30}),
    "sym-offsets15": ("default with at most 15 layers with block offsets",
                      {"max_offset_layers": 15}),
    "gptq-sym": ("re-quantized: gptq symmetric, float16 scales, no budget", {"sensitive_budget": 0.0}),
}


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data", ".onnx_data")) / 1e6


def _config(overrides: dict[str, Any]) -> WeightOnlyConfig:
    return dataclasses.replace(WeightOnlyConfig(), **overrides)


def _statistics(quantizer: ORTQuantizer, config: WeightOnlyConfig) -> dict[str, Any]:
    """The statistics the CLI gathers (mixed-domain calibration passages) for re-quantized layers."""
    cfg, data = quantizer._weight_only_defaults(config, None)
    feeds = quantizer._weight_only_feeds(cfg, data, None)
    return weight_only_statistics(quantizer.steps._float.clone(), cfg, feeds)


def _quantize(quantizer: ORTQuantizer, config: WeightOnlyConfig, stats: dict[str, Any], out: Path) -> dict:
    model = quantizer.steps._float.clone()
    p = MatMulNBitsPass(config, **stats)
    p.rewrite(model)
    if config.tune_cpu_kernels:
        CpuKernelsPass().rewrite(model)
    out.mkdir(parents=True, exist_ok=True)
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    copy_side_files(quantizer.model_path.parent, out)
    return p.report


def _write(args: argparse.Namespace, stats: dict[str, Any], results: list[dict]) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "model": str(args.fp32),
        "passages": args.passages,
        "max_length": args.max_length,
        "calibration": stats["calibration"],
        "results": results,
    }
    args.output.write_text(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path, help="exported fp32 folder of the causal LM (with tokenizer)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--passages", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--work", type=Path, default=None, help="keep the quantized folders here")
    ap.add_argument("--output", type=Path, default=RESULTS / "int4_domains.json")
    ap.add_argument("--stats-cache", type=Path, default=None,
                    help="pickle of the calibration statistics: read when present, else written")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="ortq-int4-domains-"))
    quantizer = ORTQuantizer.from_pretrained(args.fp32)
    tokenizer = load_tokenizer(args.fp32)
    texts = {d: passages(d, "heldout", args.passages) for d in ("python-docs", "news")}
    rows_by_domain = {
        d: [np.asarray(tokenizer(t, truncation=True, max_length=args.max_length)["input_ids"], np.int64) for t in ts]
        for d, ts in texts.items()
    }
    t0 = time.perf_counter()
    if args.stats_cache is not None and args.stats_cache.exists():
        stats = pickle.loads(args.stats_cache.read_bytes())
    else:
        stats = _statistics(quantizer, WeightOnlyConfig(keep_source_grid=False))  # every layer's statistics
        if args.stats_cache is not None:
            args.stats_cache.write_bytes(pickle.dumps(stats))
    print(f"statistics: {stats['calibration']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    ref = DecoderSession(args.fp32, THREADS)
    results = []
    for name in args.recipes:
        desc, overrides = RECIPES[name]
        config = _config(overrides)
        folder = work / name
        t0 = time.perf_counter()
        report = _quantize(quantizer, config, stats, folder)
        q_s = time.perf_counter() - t0
        q = DecoderSession(folder, THREADS)
        domains = {d: perplexity_agreement(ref, q, rows) for d, rows in rows_by_domain.items()}
        del q
        row = {
            "recipe": name,
            "description": desc,
            "config": config.to_dict(),
            "mb": round(_size_mb(folder), 1),
            "in_domain_pct": round(domains["python-docs"]["perplexity_delta_pct"], 2),
            "news_pct": round(domains["news"]["perplexity_delta_pct"], 2),
            "domains": domains,
            "quantize_seconds": round(q_s, 1),
            "layers": {
                "carried": sum(e.get("grid") == "carried" for e in report["nodes"]),
                "requantized": sum(e.get("grid") == "requantized" for e in report["nodes"]),
                "8-bit": [e["node"] for e in report["nodes"] if e["bits"] == 8],
                "upgraded": [e["node"] for e in report["nodes"] if str(e.get("bits_reason")).startswith("sensitive")],
            },
        }
        results.append(row)
        print(f"{name:12s} in-domain {row['in_domain_pct']:+6.2f} %  news {row['news_pct']:+6.2f} %  "
              f"{row['mb']:6.1f} MB  ({q_s:.0f} s)", flush=True)
        _write(args, stats, results)
    print("\n| recipe | in-domain | news | MB |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['description']} | {r['in_domain_pct']:+.1f} % | {r['news_pct']:+.1f} % | {r['mb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
