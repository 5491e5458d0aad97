"""Where a decode step's time goes: one-token steps of causal-LM folders timed side by side, and ONNX Runtime's
profile by op type.

    python benchmarks/decode_profile.py builder-int4/ int4/ [more folders] [--past 64] [--rounds 10]

Every folder's ``model.onnx`` gets the same one-token step (``input_ids``, a full ``attention_mask``,
``position_ids`` where the graph has them, a random KV cache of ``--past`` positions in the graph's own layout),
in plain ONNX Runtime sessions with 2 intra-op threads. Steps are timed in alternated rounds (A B C ... A B C
...) and shown as ratios to the first folder: best round against best round, and the median over rounds of
each round's ratio (steadier on a shared machine); the op-type table comes from a separate
profiled session (the profiler's own overhead inflates small kernels: read it for shares, not totals).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
          "tensor(float16)": np.float16}


def step_feeds(session: ort.InferenceSession, past: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        dtype = DTYPES[i.type]
        if i.name == "input_ids":
            feeds[i.name] = np.array([[1234]], dtype)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past + 1), dtype)
        elif i.name == "position_ids":
            feeds[i.name] = np.array([[past]], dtype)
        elif "past" in i.name:  # [batch, kv heads, past, head size]: symbolic dims are batch 1, then the past
            shape = [d if isinstance(d, int) else (1 if j == 0 else past) for j, d in enumerate(i.shape)]
            feeds[i.name] = (rng.standard_normal(shape) * 0.1).astype(dtype)
        else:
            raise SystemExit(f"{i.name}: an input this benchmark does not know how to fill")
    return feeds


def profile(path: Path, feeds: dict, threads: int, runs: int = 20) -> dict[str, dict]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "p")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]][0] += e["dur"]
            by_op[e["args"]["op_name"]][1] += 1
    return {op: {"us_per_step": d / runs, "nodes": n // runs} for op, (d, n) in by_op.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30, help="steps per model per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=RESULTS / "decode_profile.json")
    args = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    paths = {str(f): f / "model.onnx" if f.is_dir() else f for f in args.folders}
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    feeds = {k: step_feeds(s, args.past) for k, s in sessions.items()}
    for k, s in sessions.items():  # warm
        for _ in range(10):
            s.run(None, feeds[k])
    rounds: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                s.run(None, feeds[k])
            rounds[k].append((time.perf_counter() - t0) / args.steps)
    best = {k: min(v) for k, v in rounds.items()}
    first = next(iter(best))
    paired = {k: float(np.median(np.array(rounds[first]) / np.array(v))) for k, v in rounds.items()}
    print(f"one-token decode steps, past {args.past}, {args.threads} threads, {args.rounds} alternated rounds, "
          f"ONNX Runtime {ort.__version__}")
    print(f"{'model':40s} {'best ms':>8s} {'vs first':>9s} {'paired':>8s}")
    for k, t in best.items():
        print(f"{k:40s} {t * 1e3:8.3f} {best[first] / t:8.2f}x {paired[k]:7.3f}x")
    profiles = {k: profile(p, feeds[k], args.threads) for k, p in paths.items()}
    for k, ops in profiles.items():
        total = sum(v["us_per_step"] for v in ops.values())
        print(f"\n{k} (profiled)")
        for op, v in sorted(ops.items(), key=lambda kv: -kv[1]["us_per_step"])[:10]:
            print(f"  {op:34s} {v['us_per_step']:9.1f} us {v['nodes']:5d} nodes {100 * v['us_per_step'] / total:5.1f} %")
    doc = {"benchmark": "decode_profile", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "past": args.past,
           "threads": args.threads, "onnxruntime": ort.__version__, "load_average": os.getloadavg(),
           "ms_per_step": {k: t * 1e3 for k, t in best.items()}, "paired_ratio_vs_first": paired,
           "profiles": profiles}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
