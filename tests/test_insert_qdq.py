import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from ortq.calibrators.base import TensorRange
from ortq.config import QuantizationConfig, QuantType
from ortq.passes.insert_qdq import insert_qdq
from ortq.passes.plan import make_plan

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 3] y) {
    h = MatMul(x, w1)
    r = Relu(h)
    y = MatMul(r, w2)
}
"""


def _build(w1, w2):
    proto = onnx.parser.parse_model(MLP)
    proto.graph.initializer.extend(
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")]
    )
    return proto


def _run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _on_grid(rng, shape, scales):
    q = rng.integers(-127, 128, size=shape)
    q[0] = 127
    return (q * scales).astype(np.float32)


@pytest.mark.parametrize("act_dtype", [QuantType.QUInt8, QuantType.QInt8])
def test_values_on_the_grid_are_exact(act_dtype):
    rng = np.random.default_rng(1)
    w1 = _on_grid(rng, (8, 5), np.array([0.5, 0.25, 1.0, 0.125, 2.0], np.float32))
    w2 = _on_grid(rng, (5, 3), np.array([0.25, 0.5, 1.0], np.float32))
    proto = _build(w1, w2)
    # x on the uint8 grid of [-1, 1.55] ... choose a range whose scale is a power of two: [-1, 1.55]
    x_scale = 1.0 / 64
    x = (rng.integers(-64, 64, size=(6, 8)) * x_scale).astype(np.float32)
    h = np.maximum(x @ w1, 0)
    x_range = TensorRange(low=-128 * x_scale, high=127 * x_scale, num_values=1, num_excluded=0)
    r_scale = 2.0 ** np.ceil(np.log2(h.max() / 127))
    h_grid = np.round(h / r_scale) * r_scale
    r_range = TensorRange(low=-128 * r_scale, high=127 * r_scale, num_values=1, num_excluded=0)
    config = QuantizationConfig(activations_dtype=act_dtype, activations_symmetric=False)
    model = ir.from_proto(proto)
    plan = make_plan(model, config, {"x": x_range, "r": r_range})
    assert sorted(plan.activations) == ["r", "x"]
    assert plan.activations["x"].scale == pytest.approx(x_scale)
    insert_qdq(model, plan)
    qproto = ir.to_proto(model)
    onnx.checker.check_model(qproto, full_check=True)
    # The first MatMul sees exact inputs: its output equals fp32 up to float rounding.
    expected = h_grid @ w2
    got = _run(qproto, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_inputs_are_rewired_and_weights_replaced():
    rng = np.random.default_rng(2)
    proto = _build(rng.normal(size=(8, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32))
    model = ir.from_proto(proto)
    ranges = {k: TensorRange(-3.0, 3.0, 10, 0) for k in ("x", "r")}
    plan = make_plan(model, QuantizationConfig(), ranges)
    insert_qdq(model, plan)
    qproto = ir.to_proto(model)
    ops = [n.op_type for n in qproto.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    inits = {t.name: t for t in qproto.graph.initializer}
    assert "w1" not in inits and inits["w1_quantized"].data_type == onnx.TensorProto.INT8
    dq_w = [n for n in qproto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w1_quantized"][0]
    assert onnx.helper.get_attribute_value(dq_w.attribute[0]) == 1  # per-channel axis of [K, N]
    x = rng.normal(size=(4, 8)).astype(np.float32)
    ref = _run(proto, x)
    got = _run(qproto, x)
    cos = np.sum(ref * got) / (np.linalg.norm(ref) * np.linalg.norm(got))
    assert cos > 0.995


def test_insert_qdq_pass_rewrites_in_place_and_reports():
    from ortq.passes.insert_qdq import InsertQDQPass

    rng = np.random.default_rng(7)
    proto = _build(rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32))
    model = ir.from_proto(proto)
    plan = make_plan(model, QuantizationConfig(), {"x": TensorRange(-3.0, 3.0, 1, 0), "r": TensorRange(0.0, 6.0, 1, 0)})
    qdq = InsertQDQPass(plan)
    result = qdq(model)
    assert result.modified and result.model is model
    assert qdq.report == {"activations": 2, "weights": 2, "int4_weights": 0, "quantized_outputs": 0,
                          "int32_biases": 0, "opset": 17}
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(proto, x), rtol=0.1, atol=0.3)
