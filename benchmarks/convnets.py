"""Static int8 on convnets: ortq vs onnxruntime.quantization (QDQ and QOperator) vs fp32, side by side in one run.

Networks: resnet-18, mobilenet-v2 and efficientnet-b0 classifiers built from transformers configs, and
mobilenet-v3-small in plain PyTorch (``benchmarks/mobilenet_v3.py``). Random weights (speed and kernel placement do
not depend on them; fidelity is measured against the same fp32 network), initialised as torchvision does
(Kaiming fan-out convolutions) with BatchNorm statistics re-estimated on the calibration crops: a default
transformers initialisation shrinks the activations layer after layer until efficientnet's logits are exactly
zero, and a cosine of two zero vectors is NaN. Images: the RGB sample photographs that ship with scikit-image (read as files, no
download), resized to 256, cropped to 224 and ImageNet-normalised; calibration on random crops of one half,
fidelity on centre and corner crops of the other half.

Speed: warm sessions, 2 intra-op threads, batch 1 and 8, fp32 and each quantized model alternated;
speedup = min(fp32) / min(model). Placement: convolutions that ONNX Runtime's CPU EP ran as integer kernels
(``ortq.validate.placement``). Fidelity: cosine of the logits to fp32 (mean and worst), their relative L2 error
``||int8 - fp32|| / ||fp32||`` (mean and worst) and top-1 agreement; as a
yardstick, the same figures for fp32 itself with white noise at 50 dB SNR added to its input.

    python benchmarks/convnets.py [--models resnet18,mobilenet_v2,mobilenet_v3_small,efficientnet_b0] [--rounds 10]

Prints a table and writes benchmarks/results/convnets.json.
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
from ortq.export import export
from ortq.quantizer import ORTQuantizer
from ortq.runtime import SessionSettings, create_session
from ortq.validate.latency import fastest_alternated
from ortq.validate.placement import inspect_placement

THREADS = 2
RESULTS = Path(__file__).parent / "results"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
CALIBRATION_IMAGES = ("astronaut", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")
HELDOUT_IMAGES = ("chelsea", "retina", "motorcycle_right", "ihc", "color")


def sample_images(names: tuple[str, ...]) -> list[np.ndarray]:
    """scikit-image's sample photographs as HxWx3 uint8 arrays, read straight from the package folder."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise SystemExit("error: pip install scikit-image (its sample images are the benchmark's real images)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    out = []
    for name in names:
        path = next(folder.glob(name + ".*"))
        out.append(np.asarray(Image.open(path).convert("RGB")))
    return out


def crops(images: list[np.ndarray], per_image: int, rng: np.random.Generator | None) -> np.ndarray:
    """224x224 crops of each image resized to 256 on its short side: random ones with ``rng``, else the centre
    and four corners. Returns [N, 3, 224, 224] float32, ImageNet-normalised."""
    from PIL import Image

    out = []
    for img in images:
        h, w = img.shape[:2]
        s = 256 / min(h, w)
        im = np.asarray(Image.fromarray(img).resize((max(256, round(w * s)), max(256, round(h * s)))), np.float32)
        hh, ww = im.shape[:2]
        if rng is None:
            corners = [((hh - 224) // 2, (ww - 224) // 2), (0, 0), (0, ww - 224), (hh - 224, 0), (hh - 224, ww - 224)]
        else:
            corners = [(int(rng.integers(0, hh - 223)), int(rng.integers(0, ww - 223))) for _ in range(per_image)]
        for y, x in corners[:per_image]:
            out.append(((im[y:y + 224, x:x + 224].transpose(2, 0, 1) / 255.0) - MEAN) / STD)
    return np.stack(out).astype(np.float32)


def build(name: str, calib: np.ndarray):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "mobilenet_v3_small":
        from mobilenet_v3 import MobileNetV3Small

        return condition(MobileNetV3Small(), calib)
    if name == "resnet18":
        cfg = tf.ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                              embedding_size=64, num_labels=1000)
        model = tf.ResNetForImageClassification(cfg)
    elif name == "mobilenet_v2":
        model = tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(num_labels=1000))
    elif name == "efficientnet_b0":
        # B0 scaling (the config's defaults are B7's: 600 px, width 2.0, depth 3.1)
        cfg = tf.EfficientNetConfig(num_labels=1000, image_size=224, width_coefficient=1.0, depth_coefficient=1.0,
                                    dropout_rate=0.2, hidden_dim=1280)
        model = tf.EfficientNetForImageClassification(cfg)
    else:
        raise SystemExit(f"error: unknown model {name!r}")

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    return condition(Logits(model), calib)


def condition(model, calib: np.ndarray):
    """Random weights with activations of order one: Kaiming fan-out convolutions, small uniform Linear layers,
    BatchNorm statistics re-estimated (cumulative average) on ``calib``. Returns the model in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.weight.shape[1] ** 0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):  # (transformers draws efficientnet's scales around zero)
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()
                m.momentum = None
        model.train()
        for i in range(0, len(calib), 8):
            model(torch.from_numpy(calib[i:i + 8]))
        for m in model.modules():  # one variance per layer: no near-constant channel blown up to unit scale
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.fill_(float(m.running_var.mean()))
    return model.eval()


def session(path: Path) -> ort.InferenceSession:
    """A CPU session with the benchmark's threads and no spinning pools (see :mod:`ortq.runtime`)."""
    return create_session(path, settings=SessionSettings(threads=THREADS))


def ort_quantize(fp32: Path, out: Path, calib: np.ndarray, fmt: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"pixel_values": calib[i:i + 4]} for i in range(0, len(calib), 4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def latency(paths: dict[str, Path], batch: np.ndarray, rounds: int) -> dict[str, float]:
    """min seconds per model, the models alternated in each round after one untimed warm-up run each."""
    return fastest_alternated({k: session(p) for k, p in paths.items()}, {"pixel_values": batch}, rounds)


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    a, b = ref.astype(np.float64), out.astype(np.float64)
    if not np.isfinite(a).all() or (np.linalg.norm(a, axis=1) == 0).any():
        raise SystemExit("error: the fp32 reference logits are zero or non-finite: no cosine to measure")
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rel = np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1)  # ||int8 - fp32|| / ||fp32||, per crop
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "rel_l2_mean": float(rel.mean()), "rel_l2_max": float(rel.max()),
            "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean())}


def run_model(name: str, calib: np.ndarray, held: np.ndarray, rounds: int, work: Path) -> dict:
    import torch

    d = work / name
    module = build(name, calib)
    export(module, d / "fp32", example_inputs=(torch.from_numpy(calib[:1]),), input_names=["pixel_values"],
           output_names=["logits"])
    fp32 = d / "fp32" / "model.onnx"
    np.savez(d / "calib.npz", pixel_values=calib)
    q = ORTQuantizer.from_pretrained(d / "fp32")
    q.show_progress = False
    t = time.perf_counter()
    paths = {"fp32": fp32}
    paths["ortq"] = q.quantize(QuantizationConfig(), d / "ortq", calibration_data=str(d / "calib.npz"),
                               calibration_config=CalibrationConfig(batch_size=4))
    ortq_s = time.perf_counter() - t
    paths["ort_qdq"] = ort_quantize(fp32, d / "ort_qdq.onnx", calib, "qdq")
    paths["ort_qop"] = ort_quantize(fp32, d / "ort_qop.onnx", calib, "qop")
    ref = session(fp32).run(None, {"pixel_values": held})[0]
    rows = {}
    lat1 = latency(paths, held[:1], rounds)
    lat8 = latency(paths, held[:8], max(3, rounds // 2))
    for k, p in paths.items():
        placement = inspect_placement(p, "cpu", {"pixel_values": held[:1]}, runs=1)
        out = session(p).run(None, {"pixel_values": held})[0]
        rows[k] = {
            "latency_ms_b1": 1e3 * lat1[k],
            "latency_ms_b8": 1e3 * lat8[k],
            "speedup_b1": lat1["fp32"] / lat1[k],
            "speedup_b8": lat8["fp32"] / lat8[k],
            "convolutions": placement.convolutions,
            "int8_flop_fraction": placement.flops["int8_fraction"],
            "qlinear_elementwise": placement.qlinear_elementwise,
            "unfused_qdq": placement.unfused_qdq,
            **fidelity(ref, out),
        }
    rows["ortq"]["quantize_seconds"] = round(ortq_s, 1)
    # How far fp32 itself moves under white noise at 50 dB SNR on its input (about int8's own step): random
    # weights amplify small perturbations much more than trained ones, which bounds any int8 model's cosine.
    noise = np.random.default_rng(1).normal(size=held.shape).astype(np.float32) * held.std() * 10 ** (-50 / 20)
    rows["fp32"]["input_noise_50db"] = fidelity(ref, session(fp32).run(None, {"pixel_values": held + noise})[0])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,mobilenet_v3_small,efficientnet_b0")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calibration-crops", type=int, default=8, help="random crops per calibration image")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    calib = crops(sample_images(CALIBRATION_IMAGES), args.calibration_crops, rng)
    held = crops(sample_images(HELDOUT_IMAGES), 5, None)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ortq-convnets-") as tmp:
        for name in args.models.split(","):
            results[name] = run_model(name, calib, held, args.rounds, Path(tmp))
    header = (f"{'model':16} {'variant':8} {'x b1':>6} {'x b8':>6} {'int8 convs':>11} {'int8 FLOPs':>10} "
              f"{'cos mean':>9} {'cos min':>8} {'relL2':>6} {'top1':>5}")
    print(f"static int8, {THREADS} threads, speedup = min(fp32)/min(model); {len(calib)} calibration crops, "
          f"{len(held)} held-out crops")
    print(header)
    for name, rows in results.items():
        for k, r in rows.items():
            c = r["convolutions"]
            frac = r["int8_flop_fraction"]
            print(f"{name:16} {k:8} {r['speedup_b1']:6.2f} {r['speedup_b8']:6.2f} {c['int8']:>5}/{c['total']:<5} "
                  f"{(100 * frac if frac is not None else float('nan')):9.1f}% {r['cosine_mean']:9.4f} "
                  f"{r['cosine_min']:8.4f} {r['rel_l2_mean']:6.3f} {r['top1_agreement']:5.2f}")
        n = rows["fp32"]["input_noise_50db"]
        print(f"{name:16} {'fp32+50dB noise':47} {n['cosine_mean']:9.4f} {n['cosine_min']:8.4f} {n['rel_l2_mean']:6.3f} {n['top1_agreement']:5.2f}")
    RESULTS.mkdir(exist_ok=True)
    doc = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "onnxruntime": ort.__version__,
        "threads": THREADS,
        "calibration_crops": len(calib),
        "heldout_crops": len(held),
        "results": results,
    }
    (RESULTS / "convnets.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
