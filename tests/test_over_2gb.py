"""Models over the protobuf limit (2 GB), with the limit lowered to 10 kB so that a tiny Llama is over it:
export -> int8 -> int4 -> W4A8 -> validate -> generate, every model written with external data, loading in
ONNX Runtime, and no step serializing a whole model into one protobuf message."""

import onnx
import onnx_ir as ir
import pytest

from ortq import AutoCalibrationConfig, QuantizationConfig, WeightOnlyConfig
from ortq.data import real_text
from ortq.quantizer import ORTQuantizer


@pytest.fixture
def over_limit(monkeypatch):
    """The limit lowered to 10 kB; a whole model serialized into one protobuf message is an error."""
    from ortq import io

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    real_check = onnx.checker.check_model
    real_serialize = ir.to_proto

    def check_model(model, *args, **kwargs):
        if isinstance(model, onnx.ModelProto) and io.needs_external_data(model):
            raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")
        return real_check(model, *args, **kwargs)

    def to_proto(obj, *args, **kwargs):
        if isinstance(obj, ir.Model) and _in_memory_bytes(obj) > io.EXTERNAL_DATA_THRESHOLD:
            raise AssertionError("a model over the limit went into one protobuf message")
        return real_serialize(obj, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", check_model)
    monkeypatch.setattr(ir, "to_proto", to_proto)
    return real_serialize


def _in_memory_bytes(model: ir.Model) -> int:
    """Bytes of the weights a proto of ``model`` would copy (external tensors stay references)."""
    tensors = (v.const_value for v in model.graph.initializers.values())
    return sum(t.nbytes for t in tensors if t is not None and not isinstance(t, ir.ExternalTensor))


def _external(folder):
    return (folder / "model.onnx.data").is_file() and (folder / "model.onnx").stat().st_size < 10_000_000


@pytest.fixture
def big_llama(tiny_llama_src, tmp_path, over_limit):
    from ortq.export import export

    out = tmp_path / "fp32"
    export(tiny_llama_src, out)
    assert _external(out)
    return out


def test_export_int8_int4_validate_generate_with_external_data(big_llama, tmp_path):
    from ortq.generate import Generator
    from ortq.validate import GenerativeOptions, validate

    text = real_text("calibration", 16)
    int4 = ORTQuantizer.from_pretrained(big_llama).quantize(
        WeightOnlyConfig(bits=4, block_size=16, algorithm="gptq"), tmp_path / "int4", calibration_data=text)
    int8 = ORTQuantizer.from_pretrained(big_llama).quantize(
        QuantizationConfig(), tmp_path / "int8", calibration_data=text,
        calibration_config=AutoCalibrationConfig.minmax(batch_size=8))
    w4a8 = ORTQuantizer.from_pretrained(big_llama).quantize(
        QuantizationConfig(weight_storage_bits=4), tmp_path / "w4a8", calibration_data=text,
        calibration_config=AutoCalibrationConfig.minmax(batch_size=8))
    fp32 = Generator(big_llama).generate("The quick brown fox", max_new_tokens=8)
    for path in (int4, int8, w4a8):
        assert _external(path.parent), path
        onnx.checker.check_model(str(path))
        report = validate(path.parent, big_llama, num_samples=8, batch_size=8,
                          generative=GenerativeOptions(num_passages=1, max_length=16, new_tokens=2))
        assert report.ok, report.violations
        assert report.to_dict()["generative"]["status"] == "ok"
        result = Generator(path.parent).generate("The quick brown fox", max_new_tokens=8)
        assert len(result.token_ids) == len(fp32.token_ids)


def test_a_small_output_of_an_external_data_source_is_one_self_contained_file(big_llama, tmp_path, monkeypatch):
    """Weights mapped from the source's data file (norms) come into a quantized model small enough for one
    file: it must not point at a data file that is not beside it."""
    import onnxruntime as ort

    from ortq import io

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1_800_000_000)
    path = ORTQuantizer.from_pretrained(big_llama).quantize(WeightOnlyConfig(bits=4, block_size=16), tmp_path / "q")
    assert sorted(p.name for p in path.parent.glob("model.onnx*")) == ["model.onnx"]
    onnx.checker.check_model(str(path))
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_reads_the_traced_weights_mapped_not_loaded(tiny_llama_src, tmp_path, monkeypatch):
    """The traced graph is read without its external data and saved tensor by tensor: the same weights as
    an export below the limit, and no ``onnx.load`` of a whole model."""
    import numpy as np
    from onnx import numpy_helper

    from ortq import io
    from ortq.export import export

    inline = tmp_path / "inline"
    export(tiny_llama_src, inline, check_parity=False)
    real_load = onnx.load

    def load(path, *args, load_external_data=True, **kwargs):
        assert not load_external_data, "a whole model was loaded with its external data"
        return real_load(path, *args, load_external_data=False, **kwargs)

    import ortq.export as export_pkg

    real_convert = export_pkg.convert

    def convert(spec, path, *args):  # as the exporter writes a model over 2 GB: weights and Constants external
        used = real_convert(spec, path, *args)
        proto = real_load(str(path))
        for f in list(path.parent.iterdir()):
            f.unlink()
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0, convert_attribute=True)
        return used

    monkeypatch.setattr(export_pkg, "convert", convert)
    monkeypatch.setattr(onnx, "load", load)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 10_000)
    out = tmp_path / "external"
    result = export(tiny_llama_src, out, check_parity=False)
    monkeypatch.undo()
    assert _external(out) and result.attention != "standard"
    assert sorted(p.name for p in out.iterdir() if "model.onnx" in p.name) == ["model.onnx", "model.onnx.data"]
    a, b = onnx.load(str(inline / "model.onnx")), onnx.load(str(out / "model.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    wa = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert {p.key: p.value for p in a.metadata_props} == {p.key: p.value for p in b.metadata_props}
