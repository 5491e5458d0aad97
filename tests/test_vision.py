"""Vision models on pixel_values: export (dynamic batch, image processor saved), calibration from a folder of
real images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from tiny_models import build

from ortq import AutoQuantizationConfig
from ortq.data import load_batches
from ortq.errors import CalibrationDataError
from ortq.export import export
from ortq.images import ImagePreprocessor, sample_images
from ortq.quantizer import ORTQuantizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    images = sample_images()
    if len(images) < 4:
        pytest.skip("scikit-image is not installed (pip install 'ortq[vision]'): no sample photographs")
    folder = tmp_path_factory.mktemp("images")
    for p in images[:6]:
        shutil.copy(p, folder / p.name)
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_vit_module_with_pixel_values_example():
    """The user's case: a ViTModel object and example_inputs={"pixel_values": x}, no hand wrapper."""
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.ViTModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = export(model, f"{tmp}/out", example_inputs={"pixel_values": x})
        assert result.task == "image-feature-extraction" and result.input_names == ("pixel_values",)
        assert result.max_rel_diff < 1e-4
        assert {s[0] for s in result.parity_shapes} == {1, 6}  # batch sizes other than the traced 2
        session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"pixel_values": x[:1].numpy()})[0]
        with torch.no_grad():
            want = model(pixel_values=x[:1]).last_hidden_state.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)
        assert (result.output_dir / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("name", ["convnext", "vit-classifier"])
def test_vision_folder_export(name, tmp_path):
    src, task = build(name, tmp_path / "src", None)
    result = export(src, tmp_path / "onnx")
    assert result.task == task and result.max_rel_diff < 1e-4
    saved = json.loads((result.output_dir / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 32, "width": 32}


def test_calibration_from_a_folder_of_images(image_dir, tmp_path):
    src, _ = build("vit", tmp_path / "src", None)
    fp32 = export(src, tmp_path / "fp32").output_dir
    batches = list(load_batches(image_dir, model=fp32 / "model.onnx", batch_size=4))
    assert [b["pixel_values"].shape for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]  # the .txt is skipped
    processor = transformers.AutoImageProcessor.from_pretrained(str(fp32))
    from PIL import Image

    first = sorted(p for p in image_dir.iterdir() if p.suffix != ".txt")[0]
    want = processor(images=[Image.open(first).convert("RGB")], return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(batches[0]["pixel_values"][0], want, atol=1e-5)  # the model's own processor
    quantizer = ORTQuantizer.from_pretrained(fp32)
    out = quantizer.quantize(AutoQuantizationConfig.for_host(), tmp_path / "int8", calibration_data=image_dir)
    assert (out.parent / "preprocessor_config.json").is_file()
    from ortq.validate import validate

    report = validate(out.parent, fp32, image_dir, latency_runs=1, warmup_runs=1, placement=False).to_dict()
    cpu = report["providers"][0]
    assert cpu["status"] == "ok" and cpu["fidelity"]["cosine"] > 0.99


def test_fallback_preprocessing_without_processor(image_dir, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"image_size": 16, "image_mean": [0.4, 0.4, 0.4]}))
    prep = ImagePreprocessor(tmp_path)
    first = sorted(p for p in image_dir.iterdir() if p.suffix != ".txt")[0]
    x = prep([first])
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32
    assert -0.81 <= x.min() and x.max() <= 1.21  # (v - 0.4) / 0.5 for v in [0, 1]


def test_image_folder_for_a_text_model_is_one_line_error(image_dir, tiny_bert_dir):
    with pytest.raises(CalibrationDataError, match="is a folder"):
        load_batches(image_dir, model=tiny_bert_dir / "model.onnx")
    empty = image_dir.parent / "empty"
    empty.mkdir(exist_ok=True)
    from ortq.data import InputSpec
    from ortq.images import image_feeds

    spec = {"pixel_values": InputSpec("pixel_values", np.dtype("float32"), 4, (None, 3, 32, 32))}
    with pytest.raises(CalibrationDataError, match="no image files"):
        image_feeds(empty, spec, None, 4, None)
