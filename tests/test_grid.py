"""ortq.passes.grid: QuantizeLinear / DequantizeLinear emulated in numpy, ONNX Runtime as the oracle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ortq.calibrators.base import TensorRange
from ortq.config import QuantType
from ortq.passes.grid import dequantized_weight, fake_quantize, representable_range, saturated_count
from ortq.passes.plan import QParams, activation_qparams, quantize_weight


def test_fake_quantize_matches_onnx_runtime():
    import onnxruntime as ort

    qp = activation_qparams(TensorRange(-1.5, 2.5, 10), QuantType.QUInt8, symmetric=False)
    m = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N] x, float s, uint8 z) => (float[N] y) { q = QuantizeLinear(x, s, z)  y = DequantizeLinear(q, s, z) }"""
    )
    x = np.linspace(-3, 4, 1001).astype(np.float32)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"x": x, "s": qp.scale, "z": qp.zero_point})
    np.testing.assert_array_equal(fake_quantize(x, qp), ref)


def test_representable_range_uint8_known_answer():
    qp = QParams(np.array(2 / 255, np.float32), np.array(128, np.uint8), QuantType.QUInt8)
    lo, hi = representable_range(qp)
    assert lo == pytest.approx(-128 * 2 / 255) and hi == pytest.approx(127 * 2 / 255)




def test_saturated_count_only_counts_clipped_values():
    qp = QParams(np.array(0.1, np.float32), np.array(0, np.int8), QuantType.QInt8)
    lo, hi = representable_range(qp)
    x = np.array([0.0, hi, hi + 0.04, hi + 0.06, lo - 0.06, -100.0], np.float32)
    assert saturated_count(x, qp) == 3  # hi + 0.04 only rounds onto the last step


def test_dequantized_weight_per_channel_is_on_the_grid():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    qp = QParams(scale, np.zeros(4, np.int8), QuantType.QInt8, axis=1)
    deq = dequantized_weight(w, qp)
    assert deq.dtype == np.float32 and deq.shape == w.shape
    np.testing.assert_allclose(deq, quantize_weight(w, qp).astype(np.float32) * scale[None, :], rtol=1e-6)
    assert np.abs(deq - w).max() <= scale.max() / 2 + 1e-6
    np.testing.assert_array_equal(fake_quantize(deq, qp), deq)  # already on the grid
