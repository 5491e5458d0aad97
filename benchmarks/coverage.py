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


def table(rows: list[dict]) -> str:
    """The README's Markdown table of outcomes."""
    lines = ["| architecture | task | export | int8 | int4 | validate int8 / int4 | int8 / int4 vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['architecture']} | {r['task']} | {_cell(r.get('export'))} | {_cell(r.get('int8'))} | "
            f"{_cell(r.get('int4'))} | {_cell(r.get('validate_int8'))} / {_cell(r.get('validate_int4'))} | "
            f"{_figure(r)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "coverage.json"))
    parser.add_argument("--from-json", help="print the table of earlier runs' JSON files (comma-separated)")
    args = parser.parse_args()
    if args.from_json:
        print(table([r for f in args.from_json.split(",") for r in json.loads(Path(f).read_text())["results"]]))
        return
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
    print(table(rows))
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
