"""Prefill and decode speed of causal-LM folders, side by side in one run (alternated, warm, 2 threads).

    python benchmarks/generation.py fp32/ int4/ int4/:genai builder-int4/:genai

A folder is run with ortq's loop on ONNX Runtime, or through onnxruntime-genai with the ``:genai`` suffix (an
onnxruntime-genai builder folder only runs that way). Each round generates ``--new-tokens`` greedy tokens from
the same prompt with every model in turn; the table shows the best round of each, and the JSON every round.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import onnxruntime

from ortq.generate import Generator

PROMPT = "The history of the printing press begins"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="model folders; FOLDER:genai runs it in onnxruntime-genai")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = ap.parse_args()

    generators = {}
    for spec in args.folders:
        folder, _, engine = spec.partition(":")
        generators[spec] = Generator(folder, engine=engine or "ort", threads=args.threads)
    for gen in generators.values():  # warm: the first run pays for allocation and kernel selection
        gen.generate(PROMPT, max_new_tokens=8)
    rounds: dict[str, list[dict]] = {spec: [] for spec in generators}
    for _ in range(args.rounds):
        for spec, gen in generators.items():
            out = gen.generate(PROMPT, max_new_tokens=args.new_tokens)
            rounds[spec].append({"prefill_tokens_per_s": out.prefill_tokens_per_s,
                                 "decode_tokens_per_s": out.decode_tokens_per_s,
                                 "new_tokens": len(out.token_ids)})
    print(f"greedy {args.new_tokens} tokens, best of {args.rounds} alternated rounds, {args.threads} threads, "
          f"ONNX Runtime {onnxruntime.__version__}")
    print(f"{'model':50s} {'prefill tok/s':>14s} {'decode tok/s':>13s}")
    for spec, rows in rounds.items():
        prefill = max(r["prefill_tokens_per_s"] or 0 for r in rows)
        decode = max(r["decode_tokens_per_s"] or 0 for r in rows)
        print(f"{spec:50s} {prefill:14.1f} {decode:13.1f}")
    doc = {"benchmark": "generation", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.machine(),
           "threads": args.threads, "onnxruntime": onnxruntime.__version__, "prompt": PROMPT, "rounds": rounds}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
