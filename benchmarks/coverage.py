"""Architecture coverage: export -> int8 -> int4 -> validate on a tiny seeded model of each architecture.

    python benchmarks/coverage.py [--only bert,t5] [--json benchmarks/results/coverage.json]

Prints the README's table of supported architectures and writes every outcome and figure as JSON (machine,
versions, date). The models are random (tests/tiny_models.py): the figures say that each stage runs and agrees
with fp32, not how a trained model of that family quantizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STAGES = ("export", "int8", "int4", "validate_int8", "validate_int4")


def _cell(outcome: str | None) -> str:
    if outcome == "ok":
        return "yes"
    if outcome is None or outcome.startswith("skipped"):
        return "–"
    return "**internal error**" if outcome.startswith("internal") else "no"


def _figure(row: dict) -> str:
    if "int8_token_agreement" in row or "int4_token_agreement" in row:
        a8, a4 = row.get("int8_token_agreement"), row.get("int4_token_agreement")
        return "token agreement " + " / ".join(f"{a:.2f}" if a is not None else "–" for a in (a8, a4))
    c8, c4 = row.get("int8_cosine"), row.get("int4_cosine")
    return "cosine " + " / ".join(f"{c:.4f}" if c is not None else "–" for c in (c8, c4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "coverage.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import onnxruntime
    import torch
    import transformers
    from conftest import _tokenizer
    from tiny_models import ARCHITECTURES, run_pipeline

    from ortq.images import sample_images

    names = args.only.split(",") if args.only else list(ARCHITECTURES)
    tokenizer = _tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        for p in sample_images():
            shutil.copy(p, images / p.name)
        for name in names:
            row = run_pipeline(name, Path(tmp) / name, tokenizer, images)
            rows.append(row)
            print(name, {k: row.get(k) for k in STAGES}, file=sys.stderr, flush=True)
            shutil.rmtree(Path(tmp) / name, ignore_errors=True)
    print("| architecture | task | export | int8 | int4 | validate | int8 / int4 vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        validated = "yes" if r.get("validate_int8") == "ok" and r.get("validate_int4") == "ok" else _cell(
            next((r.get(s) for s in ("validate_int8", "validate_int4") if r.get(s) != "ok"), None))
        print(f"| {r['architecture']} | {r['task']} | {_cell(r.get('export'))} | {_cell(r.get('int8'))} | "
              f"{_cell(r.get('int4'))} | {validated} | {_figure(r)} |")
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "results": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
