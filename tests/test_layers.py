"""Per-layer error report on tiny graphs built in code, with ONNX Runtime and numpy as oracles."""

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ortq.calibrators.base import TensorRange
from ortq.config import QuantizationConfig
from ortq.errors import MissingDependencyError, ModelError
from ortq.passes.grid import dequantized_weight, fake_quantize
from ortq.passes.insert_qdq import insert_qdq
from ortq.passes.plan import make_plan
from ortq.validate import layers
from ortq.validate.layers import layer_report

TWO_MATMULS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 4] y) <float[8, 16] w1, float[16, 4] w2, float[4] b> {
  h = MatMul(x, w1)
  r = Relu(h)
  y0 = MatMul(r, w2)
  y = Add(y0, b)
}
"""


def _on_grid(rng, shape):
    """Weights exactly on a per-column symmetric int8 grid (each column's max |w| is 127 steps)."""
    q = rng.integers(-127, 128, size=shape).astype(np.float32)
    q[0, :] = 127
    return q * np.float32(0.01)


def _model(rng, w1=None, w2=None):
    m = onnx.parser.parse_model(TWO_MATMULS)
    w1 = rng.standard_normal((8, 16)).astype(np.float32) if w1 is None else w1
    w2 = rng.standard_normal((16, 4)).astype(np.float32) if w2 is None else w2
    m.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(w1, "w1"),
            onnx.numpy_helper.from_array(w2, "w2"),
            onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        ]
    )
    onnx.checker.check_model(m, full_check=True)
    return m


def _quantize(proto, ranges, config=None):
    model = ir.from_proto(proto)
    plan = make_plan(model, config or QuantizationConfig(), ranges)
    insert_qdq(model, plan)
    return model, plan


def _batches(rng, n=3, rows=5):
    return [{"x": rng.standard_normal((rows, 8)).astype(np.float32)} for _ in range(n)]


def test_exact_on_the_grid():
    """Weights on their int8 grid and activations on theirs: no local error and no clipping anywhere."""
    rng = np.random.default_rng(0)
    proto = _model(rng, _on_grid(rng, (8, 16)), _on_grid(rng, (16, 4)))
    ranges = {"x": TensorRange(-1.0, 1.0, 10), "r": TensorRange(0.0, 1e4, 10)}
    model, plan = _quantize(proto, ranges)
    qp = plan.activations["x"]
    x = fake_quantize(rng.uniform(-0.9, 0.9, size=(6, 8)).astype(np.float32), qp)
    report = layer_report(proto, model, plan, [{"x": x}])
    first = report.layers[0]
    assert first.name == "MatMul_0" and first.local_sqnr_db > 100 and first.clip_rate == 0.0
    assert first.local_cosine == pytest.approx(1.0)
    assert [s.position for s in report.layers] == [0, 1]


def test_first_node_local_equals_cumulative_and_known_clip_rate():
    rng = np.random.default_rng(1)
    proto = _model(rng)
    ranges = {"x": TensorRange(-1.0, 1.0, 10), "r": TensorRange(0.0, 3.0, 10)}
    model, plan = _quantize(proto, ranges)
    x = rng.uniform(-0.9, 0.9, size=(10, 8)).astype(np.float32)
    x[0, 0], x[3, 5], x[7, 7] = 2.0, -2.0, 5.0  # 3 of 80 values saturate
    batches = [{"x": x[:5]}, {"x": x[5:]}]
    report = layer_report(proto, model, plan, batches)
    first, second = report.layers
    # The first node reads graph inputs: the error it adds is all the error it sees.
    assert first.local_sqnr_db == pytest.approx(first.cumulative_sqnr_db, abs=0.05)
    assert first.activations == {"x": pytest.approx(3 / 80)}
    assert first.clip_rate == pytest.approx(3 / 80)
    # Its error reaches the second node: cumulative is worse than local there.
    assert second.cumulative_sqnr_db < second.local_sqnr_db
    assert report.num_samples == 10
    assert set(report.outputs) == {"y"} and 0 < report.outputs["y"]["cosine_mean"] <= 1


def test_local_error_matches_numpy_oracle():
    rng = np.random.default_rng(2)
    proto = _model(rng)
    ranges = {"x": TensorRange(-2.0, 2.0, 10), "r": TensorRange(0.0, 6.0, 10)}
    model, plan = _quantize(proto, ranges)
    x = rng.standard_normal((7, 8)).astype(np.float32)
    report = layer_report(proto, model, plan, [{"x": x}])
    w2 = onnx.numpy_helper.to_array(proto.graph.initializer[1])
    r = np.maximum(x @ onnx.numpy_helper.to_array(proto.graph.initializer[0]), 0)
    got = fake_quantize(r, plan.activations["r"]) @ dequantized_weight(w2, plan.weights["w2"])
    expected = 10 * math.log10(np.sum((r @ w2) ** 2) / np.sum((r @ w2 - got) ** 2))
    assert report.layers[1].local_sqnr_db == pytest.approx(expected, abs=0.01)


def test_gemm_and_conv_nodes():
    rng = np.random.default_rng(3)
    m = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 2, 6, 6] x) => (float[N, 5] y) <float[3, 2, 3, 3] wc, float[3] bc, float[5, 48] wg, float[5] bg> {
          c = Conv <pads = [0, 0, 0, 0]> (x, wc, bc)
          f = Flatten(c)
          y = Gemm <transB = 1> (f, wg, bg)
        }"""
    )
    for name, shape in (("wc", (3, 2, 3, 3)), ("bc", (3,)), ("wg", (5, 48)), ("bg", (5,))):
        m.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(m, full_check=True)
    batches = [{"x": rng.standard_normal((4, 2, 6, 6)).astype(np.float32)}]
    ranges = {"x": TensorRange(-3.0, 3.0, 10), "f": TensorRange(-8.0, 8.0, 10)}
    model, plan = _quantize(m, ranges)
    report = layer_report(m, model, plan, batches)
    assert [s.op_type for s in report.layers] == ["Conv", "Gemm"]
    assert all(15 < s.local_sqnr_db < 80 for s in report.layers)
    assert report.layers[0].local_sqnr_db == pytest.approx(report.layers[0].cumulative_sqnr_db, abs=0.05)


def test_save_writes_json_markdown_png(tmp_path):
    rng = np.random.default_rng(4)
    proto = _model(rng)
    model, plan = _quantize(proto, {"x": TensorRange(-2.0, 2.0, 10), "r": TensorRange(0.0, 6.0, 10)})
    report = layer_report(proto, model, plan, _batches(rng))
    written = report.save(tmp_path)
    data = json.loads((tmp_path / "layer_report.json").read_text())
    assert data["num_quantized_nodes"] == 2 and len(data["layers"]) == 2
    assert {"local_sqnr_db", "cumulative_sqnr_db", "local_cosine", "cumulative_cosine", "clip_rate"} <= set(
        data["layers"][0]
    )
    md = (tmp_path / "layer_report.md").read_text()
    assert "MatMul_0" in md and "| # | node |" in md
    pytest.importorskip("matplotlib")
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_without_matplotlib_skips_png(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    proto = _model(rng)
    model, plan = _quantize(proto, {"x": TensorRange(-2.0, 2.0, 10), "r": TensorRange(0.0, 6.0, 10)})
    report = layer_report(proto, model, plan, _batches(rng))

    def missing(*args, **kwargs):
        raise MissingDependencyError("matplotlib is required")

    monkeypatch.setattr(layers.LayerReport, "plot", missing)
    written = report.save(tmp_path)
    assert "png" not in written and not (tmp_path / "layer_report.png").exists()
    assert any("matplotlib" in n for n in json.loads((tmp_path / "layer_report.json").read_text())["notes"])


def test_plan_from_another_model_is_rejected():
    rng = np.random.default_rng(6)
    proto = _model(rng)
    model, plan = _quantize(proto, {"x": TensorRange(-2.0, 2.0, 10), "r": TensorRange(0.0, 6.0, 10)})
    plan.decisions[0].name = "not_there"
    with pytest.raises(ModelError, match="not_there"):
        layer_report(proto, model, plan, _batches(rng))
