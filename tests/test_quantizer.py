"""End to end on an exported tiny random BERT: fit / partial_fit / compute_ranges / quantize."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ortq import AutoCalibrationConfig, AutoQuantizationConfig, QuantizationConfig
from ortq.data import load_batches, real_text
from ortq.errors import CalibrationDataError, ConfigError, OutputError
from ortq.quantizer import ORTQuantizer


def _embed(path, feeds_list):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = []
    for feeds in feeds_list:
        h = sess.run(None, feeds)[0]
        m = feeds["attention_mask"][..., None]
        out.append((h * m).sum(1) / m.sum(1))
    return np.concatenate(out)


def _cos(a, b):
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def heldout(tiny_bert_dir):
    return list(load_batches(real_text("heldout", 48), model=tiny_bert_dir / "model.onnx", batch_size=16))


def test_fit_then_quantize_is_faithful(tiny_bert_dir, tmp_path, heldout):
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    ranges = q.fit(real_text("calibration", 64), AutoCalibrationConfig.minmax(), batch_size=16)
    assert ranges and all(np.isfinite([r.low, r.high]).all() for r in ranges.values())
    path = q.quantize(save_dir=tmp_path / "int8", quantization_config=AutoQuantizationConfig.avx2())
    assert path == tmp_path / "int8" / "model.onnx"
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") > 0
    assert "GatherBlockQuantized" in ops  # CPU presets store the word embeddings in 8 bits
    assert path.stat().st_size < 0.5 * (tiny_bert_dir / "model.onnx").stat().st_size
    # Scales are finite and positive everywhere.
    for init in proto.graph.initializer:
        if init.name.endswith("_scale"):
            s = onnx.numpy_helper.to_array(init)
            assert np.isfinite(s).all() and (s > 0).all()
    # The folder is usable on its own: tokenizer, config used, and the plan with a reason per float node.
    files = {p.name for p in path.parent.iterdir()}
    assert {"model.onnx", "ortq_config.json", "quantization_report.json", "tokenizer.json"} <= files
    report = json.loads((path.parent / "quantization_report.json").read_text())
    floats = [n for n in report["plan"]["nodes"] if not n["quantized"]]
    assert floats and all(n["reason"] for n in floats)
    config = json.loads((path.parent / "ortq_config.json").read_text())
    assert config["quantization"]["preset"] == "avx2"
    c = _cos(_embed(path, heldout), _embed(tiny_bert_dir / "model.onnx", heldout))
    assert c.mean() > 0.98, c.mean()


def test_partial_fit_equals_fit(tiny_bert_dir):
    text = real_text("calibration", 64)
    config = AutoCalibrationConfig.minmax()
    whole = ORTQuantizer.from_pretrained(tiny_bert_dir).fit(text, config)
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    q.partial_fit(text[:32], config)
    q.partial_fit(text[32:], config)
    sharded = q.compute_ranges()
    assert set(sharded) == set(whole)
    for k in whole:
        assert sharded[k].low == pytest.approx(whole[k].low)
        assert sharded[k].high == pytest.approx(whole[k].high)


def test_calibration_state_resumes(tiny_bert_dir, tmp_path):
    text = real_text("calibration", 48)
    config = AutoCalibrationConfig.minmax()
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    q.partial_fit(text[:16], config)
    q.save_calibration_state(tmp_path / "state.npz")
    r = ORTQuantizer.from_pretrained(tiny_bert_dir)
    r.load_calibration_state(tmp_path / "state.npz", config)
    r.partial_fit(text[16:], config)
    whole = ORTQuantizer.from_pretrained(tiny_bert_dir).fit(text, config)
    resumed = r.compute_ranges()
    for k in whole:
        assert resumed[k].low == pytest.approx(whole[k].low)
        assert resumed[k].high == pytest.approx(whole[k].high)


def test_smooth_quant_keeps_the_float_function(tiny_bert_dir, tmp_path, heldout):
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    config = AutoQuantizationConfig.avx2(smooth_quant_alpha=0.5)
    path = q.quantize(config, tmp_path / "sq", calibration_data=real_text("calibration", 64))
    report = json.loads((path.parent / "quantization_report.json").read_text())
    assert report["smooth_quant"]["alpha"] == 0.5 and report["smooth_quant"]["activations"]
    c = _cos(_embed(path, heldout), _embed(tiny_bert_dir / "model.onnx", heldout))
    assert c.mean() > 0.98


def test_optimum_argument_order_and_tuples(tiny_bert_dir, tmp_path):
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    ranges = q.fit(real_text("calibration", 32), AutoCalibrationConfig.minmax())
    as_tuples = {k: (v.low, v.high) for k, v in ranges.items()}
    path = q.quantize(QuantizationConfig(), tmp_path / "a", calibration_tensors_range=as_tuples)
    onnx.checker.check_model(onnx.load(path))


def test_errors(tiny_bert_dir, tmp_path):
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    with pytest.raises(CalibrationDataError):
        q.quantize(QuantizationConfig(), tmp_path / "x")  # no ranges, no data
    with pytest.raises(CalibrationDataError):
        q.compute_ranges()
    with pytest.raises(OutputError):
        q.quantize(QuantizationConfig(), tiny_bert_dir, calibration_data=["a b c"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(OutputError):
        q.quantize(QuantizationConfig(), tmp_path / "full", calibration_data=["a b c"])
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    with pytest.raises(ConfigError):
        q.quantize("not a config", tmp_path / "y")


def test_presets_search_smoothing_per_activation(tiny_bert_dir, tmp_path, heldout):
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    path = q.quantize(AutoQuantizationConfig.avx512_vnni(), tmp_path / "auto", calibration_data=real_text("calibration", 64))
    report = json.loads((path.parent / "quantization_report.json").read_text())
    assert report["smooth_quant"]["alpha"] == "auto"
    for entry in report["smooth_quant"]["activations"].values():
        assert entry["relative_error_chosen"] <= entry["relative_error_unsmoothed"]
    c = _cos(_embed(path, heldout), _embed(tiny_bert_dir / "model.onnx", heldout))
    assert c.mean() > 0.98


def test_fit_without_smoothing_then_preset_keeps_ranges_valid(tiny_bert_dir, tmp_path):
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    q.fit(real_text("calibration", 32), AutoCalibrationConfig.minmax())
    path = q.quantize(AutoQuantizationConfig.avx512_vnni(), tmp_path / "p")
    report = json.loads((path.parent / "quantization_report.json").read_text())
    assert any("not applied" in n for n in report["notes"])
    assert "smooth_quant" not in report


def test_model_over_the_protobuf_limit_is_checked_and_written_with_external_data(tiny_bert_dir, tmp_path,
                                                                                  heldout, monkeypatch):
    """A model over the protobuf limit (the limit lowered so that tiny BERT is over it) goes through every step
    with external data: onnx.checker, like protobuf, cannot take such a model in memory, only from its file."""
    from ortq import io

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    real_check = onnx.checker.check_model

    def check_model(model, *args, **kwargs):
        if isinstance(model, onnx.ModelProto) and io.needs_external_data(model):
            raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")
        return real_check(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", check_model)
    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    path = q.quantize(AutoQuantizationConfig.avx2(), tmp_path / "int8", calibration_data=real_text("calibration", 32),
                      calibration_config=AutoCalibrationConfig.minmax(batch_size=16))
    assert (path.parent / "model.onnx.data").is_file()
    assert "error" not in q.last_report["placement"]
    cos = _cos(_embed(tiny_bert_dir / "model.onnx", heldout[:1]), _embed(path, heldout[:1]))
    assert cos.min() > 0.9
