"""Static int8 on real pretrained convnets exported from Paddle: PP-OCR's text detector and direction classifier.

``rapidocr-onnxruntime`` ships PaddleOCR's trained models as ONNX files (paddle2onnx): the PP-OCRv4 text
detector (a DBNet on a PP-LCNet backbone: depthwise convolutions, Hardswish, squeeze-excitation, a feature
pyramid with Resize and ConvTranspose; it maps an image to a per-pixel text probability) and the text-line
direction classifier (MobileNetV3-small, scale 0.35: 0 or 180 degrees). Only the model files are read, so
``pip install --no-deps rapidocr-onnxruntime`` is enough. Without it the script says so and exits 0.

These graphs keep what paddle2onnx writes: ``Conv -> Add(bias) -> BatchNormalization`` and Hardswish as
``x * Clip(x + 3, 0, 6) / 6`` (:mod:`ortq.passes.convnet_rewrites` folds them before planning).

Images: scikit-image's sample photographs (read as files, no download). Detector: calibration on
``text``, ``coffee``, ``astronaut``, ``rocket``, ``motorcycle_left`` and ``camera`` (each whole and as two
random crops, resized to 640x640); held out the scanned ``page`` (text: the probability map's cosine to fp32
and the IoU of the text masks at DBNet's 0.3 threshold) and ``chelsea``, ``coins``, ``motorcycle_right``,
``ihc`` (no text: the share of pixels called text, which fp32 keeps near 0). Classifier: 48x192 text-line
crops, half of them turned 180 degrees; calibration from ``text`` and two photos, held out from ``page``:
cosine of the pooled features to fp32, and direction agreement with fp32.

Variants: fp32; ortq with its defaults (min/max) and with the 99.99th percentile of |x|
(``CalibrationConfig(method="percentile")``); and ``onnxruntime.quantization.quantize_static`` (QDQ, per
channel, min/max, after its ``quant_pre_process`` where that runs). Latency: 2 threads, min over alternated
rounds.

    python benchmarks/pretrained_ocr.py [--rounds 10]

Prints a table and writes benchmarks/results/pretrained_ocr.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ortq.config import CalibrationConfig, QuantizationConfig
from ortq.quantizer import ORTQuantizer
from ortq.runtime import SessionSettings, create_session
from ortq.validate.latency import fastest_alternated
from ortq.validate.placement import inspect_placement

THREADS = 2
RESULTS = Path(__file__).parent / "results"
DETECTOR = "ch_PP-OCRv4_det_infer.onnx"
CLASSIFIER = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
CLASSIFIER_FEATURES = "reshape2_0.tmp_0"  # the pooled features before the classifier's last Linear
DET_CALIBRATION = ("text", "coffee", "astronaut", "rocket", "motorcycle_left", "camera")
DET_TEXT, DET_BLANK = ("page",), ("chelsea", "coins", "motorcycle_right", "ihc")


def models_folder() -> Path | None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    return folder if (folder / DETECTOR).exists() and (folder / CLASSIFIER).exists() else None


def photo(name: str) -> np.ndarray:
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise SystemExit("error: pip install scikit-image (its sample images are the benchmark's real images)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return np.asarray(Image.open(next(folder.glob(name + ".*"))).convert("RGB"))


def det_inputs(names: tuple[str, ...], crops: int, rng: np.random.Generator) -> np.ndarray:
    """Each photo whole and as ``crops`` random crops (at least half its sides), resized to 640x640 and
    ImageNet-normalised: [N, 3, 640, 640]."""
    from PIL import Image

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = []
    for name in names:
        a = photo(name)
        h, w = a.shape[:2]
        boxes = [(0, 0, h, w)]
        for _ in range(crops):
            ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            boxes.append((y, x, ch, cw))
        for y, x, ch, cw in boxes:
            im = np.asarray(Image.fromarray(a[y:y + ch, x:x + cw]).resize((640, 640)), np.float64) / 255.0
            out.append(((im - mean) / std).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def text_lines(names: tuple[str, ...], per_image: int, rng: np.random.Generator) -> np.ndarray:
    """Random line-shaped crops (height 16-48, 2-8 heights wide), every second one turned 180 degrees,
    resized to height 48, right-padded to 192 and scaled to [-1, 1] as PaddleOCR does: [N, 3, 48, 192]."""
    from PIL import Image

    out = []
    for name in names:
        a = photo(name)
        h, w = a.shape[:2]
        for i in range(per_image):
            ch = int(rng.integers(16, min(48, h)))
            cw = int(rng.integers(ch * 2, min(w, ch * 8)))
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            crop = Image.fromarray(a[y:y + ch, x:x + cw])
            if i % 2:
                crop = crop.rotate(180)
            nw = min(192, max(1, round(cw * 48 / ch)))
            line = np.zeros((48, 192, 3), np.float32)
            line[:, :nw] = (np.asarray(crop.resize((nw, 48)), np.float32) / 255.0 - 0.5) / 0.5
            out.append(line.transpose(2, 0, 1))
    return np.stack(out)


def session(model) -> ort.InferenceSession:
    return create_session(model, settings=SessionSettings(threads=THREADS))


def with_output(path: Path, name: str) -> bytes:
    """The model at ``path`` with ``name`` added as its first output."""
    import onnx

    m = onnx.load(str(path))
    m.graph.output.insert(0, onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return m.SerializeToString()


def ort_quantize(fp32: Path, out: Path, calib: np.ndarray) -> tuple[Path, bool]:
    """ONNX Runtime's static QDQ quantization; whether its ``quant_pre_process`` ran (it fails on some graphs)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
        preprocessed = True
    except Exception:
        pre, preprocessed = fp32, False
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out, preprocessed


def latency(models: dict[str, object], batch: np.ndarray, rounds: int) -> dict[str, float]:
    return fastest_alternated({k: session(m) for k, m in models.items()}, {"x": batch}, rounds)


def quantize_all(fp32: Path, calib: np.ndarray, work: Path) -> tuple[dict[str, Path], dict]:
    np.savez(work / "calib.npz", x=calib)
    q = ORTQuantizer.from_pretrained(fp32)
    q.show_progress = False
    t = time.perf_counter()
    ortq = q.quantize(QuantizationConfig(), work / "ortq", calibration_data=str(work / "calib.npz"),
                      calibration_config=CalibrationConfig(batch_size=1))
    seconds = time.perf_counter() - t
    pct = q.quantize(QuantizationConfig(), work / "ortq_pct", calibration_data=str(work / "calib.npz"),
                     calibration_config=CalibrationConfig(batch_size=1, method="percentile", percentile=99.99))
    ort_path, preprocessed = ort_quantize(fp32, work / "ort_qdq.onnx", calib)
    return {"fp32": fp32, "ortq": ortq, "ortq_pct": pct, "ort_qdq": ort_path}, {"quantize_seconds": round(seconds, 1),
                                                                "ort_pre_process": preprocessed}


def placement_row(path: Path, sample: np.ndarray) -> dict:
    p = inspect_placement(path, "cpu", {"x": sample}, runs=1)
    return {"convolutions": p.convolutions, "int8_flop_fraction": p.flops["int8_fraction"],
            "unfused_qdq": p.unfused_qdq}


def run_detector(folder: Path, rounds: int, work: Path) -> dict:
    rng = np.random.default_rng(0)
    calib = det_inputs(DET_CALIBRATION, 2, rng)
    text, blank = det_inputs(DET_TEXT, 0, rng), det_inputs(DET_BLANK, 0, rng)
    paths, info = quantize_all(folder / DETECTOR, calib, work)
    lat = latency(paths, text, rounds)
    maps = {k: (session(p).run(None, {"x": text})[0], np.concatenate([session(p).run(None, {"x": b[None]})[0]
                                                                        for b in blank])) for k, p in paths.items()}
    rows = {}
    for k, p in paths.items():
        a, (ta, ba) = maps["fp32"][0], maps[k]
        fa, fb = a.ravel().astype(np.float64), ta.ravel().astype(np.float64)
        ma, mb = fa > 0.3, fb > 0.3
        rows[k] = {"latency_ms_b1": 1e3 * lat[k], "speedup_b1": lat["fp32"] / lat[k],
                   **placement_row(p, text),
                   "text_map_cosine": float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb))),
                   "text_mask_iou": float((ma & mb).sum() / max((ma | mb).sum(), 1)),
                   "blank_text_pixels": [float((m > 0.3).mean()) for m in ba]}
    rows["ortq"].update(info)
    rows["fp32"]["text_mask_pixels"] = float((maps["fp32"][0] > 0.3).mean())
    return {"calibration_images": len(calib), "rows": rows}


def run_classifier(folder: Path, rounds: int, work: Path) -> dict:
    rng = np.random.default_rng(1)
    calib = np.concatenate([text_lines(("text",), 64, rng), text_lines(("coffee", "camera"), 16, rng)])
    held = text_lines(("page",), 96, rng)
    paths, info = quantize_all(folder / CLASSIFIER, calib, work)
    lat1 = latency(paths, held[:1], rounds)
    lat8 = latency(paths, held[:8], rounds)
    outs = {k: session(with_output(p, CLASSIFIER_FEATURES)).run(None, {"x": held}) for k, p in paths.items()}
    rows = {}
    for k, p in paths.items():
        fa, fb = (outs[v][0].reshape(len(held), -1).astype(np.float64) for v in ("fp32", k))
        cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
        pa, pb = outs["fp32"][1], outs[k][1]
        rows[k] = {"latency_ms_b1": 1e3 * lat1[k], "latency_ms_b8": 1e3 * lat8[k],
                   "speedup_b1": lat1["fp32"] / lat1[k], "speedup_b8": lat8["fp32"] / lat8[k],
                   **placement_row(p, held[:2]),
                   "feature_cosine_mean": float(cos.mean()), "feature_cosine_min": float(cos.min()),
                   "direction_agreement": float((pa.argmax(1) == pb.argmax(1)).mean())}
    rows["ortq"].update(info)
    return {"calibration_lines": len(calib), "heldout_lines": len(held), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    folder = models_folder()
    if folder is None:
        print("skipped: rapidocr-onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime)")
        return
    with tempfile.TemporaryDirectory(prefix="ortq-ocr-") as tmp:
        (Path(tmp) / "det").mkdir()
        (Path(tmp) / "cls").mkdir()
        det = run_detector(folder, args.rounds, Path(tmp) / "det")
        cls = run_classifier(folder, args.rounds, Path(tmp) / "cls")
    print(f"PP-OCRv4 text detector, 640x640, {det['calibration_images']} calibration images, {THREADS} threads")
    print(f"{'variant':8} {'x b1':>5} {'int8 conv':>9} {'map cos':>8} {'mask IoU':>8}  text pixels on 4 blank photos")
    for k, r in det["rows"].items():
        c = r["convolutions"]
        print(f"{k:8} {r['speedup_b1']:5.2f} {c['int8']:>4}/{c['total']:<4} {r['text_map_cosine']:8.4f} "
              f"{r['text_mask_iou']:8.3f}  " + " ".join(f"{v:.4f}" for v in r["blank_text_pixels"]))
    print(f"\nPP-OCR direction classifier (MobileNetV3-small x0.35), 48x192, {cls['calibration_lines']} calibration / "
          f"{cls['heldout_lines']} held-out text lines")
    print(f"{'variant':8} {'x b1':>5} {'x b8':>5} {'int8 conv':>9} {'feat cos':>8} {'min':>7} {'direction':>9}")
    for k, r in cls["rows"].items():
        c = r["convolutions"]
        print(f"{k:8} {r['speedup_b1']:5.2f} {r['speedup_b8']:5.2f} {c['int8']:>4}/{c['total']:<4} "
              f"{r['feature_cosine_mean']:8.4f} {r['feature_cosine_min']:7.4f} {r['direction_agreement']:9.3f}")
    RESULTS.mkdir(exist_ok=True)
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": platform.processor() or platform.machine(), "onnxruntime": ort.__version__,
           "threads": THREADS, "detector": det, "classifier": cls}
    (RESULTS / "pretrained_ocr.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
