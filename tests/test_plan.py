import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ortq.calibrators.base import TensorRange
from ortq.config import AutoQuantizationConfig, PerTensor, QuantizationConfig, QuantType
from ortq.passes.plan import (
    activation_qparams,
    calibration_targets,
    make_plan,
    mask_only_values,
    quantize_weight,
    weight_qparams,
)


def R(low, high, excluded=0, n=100):
    return TensorRange(low=low, high=high, num_values=n, num_excluded=excluded)


def _model(text: str, weights: dict[str, np.ndarray]) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    for name, arr in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(arr, name))
    return ir.from_proto(proto)


BERTISH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 4] x, int64[B, S] attention_mask) => (float[B, S, 4] y) {
    h = MatMul(x, w)
    m = Cast<to = 1>(attention_mask)
    one = Constant<value = float {1.0}>()
    inv = Sub(one, m)
    big = Constant<value = float {-3.4e38}>()
    add_mask = Mul(inv, big)
    t = Transpose<perm = [0, 2, 1]>(h)
    scores = MatMul(h, t)
    masked = Add(scores, add_mask)
    p = Softmax(masked)
    y = MatMul(p, h)
}
"""


def test_activation_qparams_known_answers():
    qp = activation_qparams(R(-1.0, 3.0), QuantType.QUInt8, symmetric=False)
    assert qp.scale == pytest.approx(4.0 / 255)
    assert int(qp.zero_point) == 64  # round(1 / (4/255)) = round(63.75)
    qp = activation_qparams(R(-2.0, 1.0), QuantType.QInt8, symmetric=True)
    assert qp.scale == pytest.approx(2.0 / 127)
    assert int(qp.zero_point) == 0
    # Ranges always include zero.
    qp = activation_qparams(R(2.0, 4.0), QuantType.QUInt8, symmetric=False)
    assert int(qp.zero_point) == 0 and qp.scale == pytest.approx(4.0 / 255)


@pytest.mark.parametrize("low,high", [(0.0, 0.0), (-math.inf, 1.0), (math.nan, 1.0), (-1.0, math.inf)])
def test_activation_qparams_never_infinite_or_nan(low, high):
    qp = activation_qparams(R(low, high), QuantType.QUInt8, symmetric=False)
    assert np.isfinite(qp.scale) and qp.scale > 0
    assert np.isfinite(qp.zero_point.astype(np.float64))


def test_weight_on_grid_round_trips_exactly():
    rng = np.random.default_rng(0)
    scales = np.array([0.01, 0.5, 2.0], dtype=np.float32)
    q = rng.integers(-127, 128, size=(8, 3))
    q[0] = 127  # absmax of every column sits on the grid's end
    w = (q * scales).astype(np.float32)
    qp = weight_qparams(w, axis=1, dtype=QuantType.QInt8, symmetric=True, reduce_range=False)
    np.testing.assert_allclose(qp.scale, scales, rtol=1e-7)
    wq = quantize_weight(w, qp)
    np.testing.assert_array_equal(wq.astype(np.int64), q)
    np.testing.assert_array_equal(wq.astype(np.float32) * qp.scale, w)


def test_reduce_range_uses_seven_bits():
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    qp = weight_qparams(w, axis=None, dtype=QuantType.QInt8, symmetric=True, reduce_range=True)
    wq = quantize_weight(w, qp)
    assert wq.min() == -63 and wq.max() == 63


def test_plan_records_a_reason_for_every_float_node():
    w = np.ones((4, 4), dtype=np.float32)
    model = _model(BERTISH, {"w": w})
    targets = calibration_targets(model, QuantizationConfig())
    assert targets == ["x"]  # attention MatMuls are activation x activation: kept in float on CPU
    plan = make_plan(model, QuantizationConfig(), {"x": R(-1, 1)})
    assert len(plan.quantized_nodes) == 1
    names = {d.name: d for d in plan.decisions}
    assert len(names) == len(plan.decisions)
    for d in plan.decisions:
        if not d.quantized:
            assert d.reason
    assert "w" in plan.weights and plan.weights["w"].axis == 1


def test_mask_path_is_never_quantized():
    model = _model(BERTISH, {"w": np.ones((4, 4), dtype=np.float32)})
    masked = mask_only_values(model.graph)
    assert "add_mask" in masked and "scores" not in masked and "masked" not in masked
    config = QuantizationConfig(quantize_activation_matmuls=True, operators_to_quantize=("MatMul", "Add"))
    # Even if asked, a tensor holding float-min values is kept in float with the reason.
    ranges = {"x": R(-1, 1), "h": R(-4, 4), "t": R(-4, 4), "p": R(0, 1, excluded=0)}
    plan = make_plan(model, config, ranges)
    assert plan.float_nodes  # the Add with the mask has no rule
    assert all(np.isfinite(qp.scale).all() for qp in plan.activations.values())


def test_excluded_and_non_finite_ranges_stay_float():
    model = _model(BERTISH, {"w": np.ones((4, 4), dtype=np.float32)})
    plan = make_plan(model, QuantizationConfig(), {"x": R(-1, 1, excluded=5)})
    assert plan.quantized_nodes == []
    assert any("mask/non-finite" in r for r in plan.float_nodes.values())
    plan = make_plan(model, QuantizationConfig(nodes_to_exclude=("MatMul_*",)), {"x": R(-1, 1)})
    assert plan.quantized_nodes == []
    assert any("nodes_to_exclude" in r for r in plan.float_nodes.values())


def test_per_tensor_weights():
    model = _model(BERTISH, {"w": np.arange(16, dtype=np.float32).reshape(4, 4)})
    plan = make_plan(model, QuantizationConfig(weights_granularity=PerTensor()), {"x": R(-1, 1)})
    assert plan.weights["w"].axis is None and plan.weights["w"].scale.size == 1


def test_gemm_trans_b_uses_axis_zero():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 3] y) {
        y = Gemm<transB = 1>(x, w, b)
    }
    """
    model = _model(text, {"w": np.ones((3, 4), np.float32), "b": np.zeros(3, np.float32)})
    plan = make_plan(model, AutoQuantizationConfig.avx2(), {"x": R(-1, 1)})
    assert plan.weights["w"].axis == 0
    assert "b" not in plan.weights
