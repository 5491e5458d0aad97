"""Gemm in int4 weight-only: ``A @ op(B) + C`` becomes MatMulNBits (B transposed when ``transB``, C as its
bias), weights on the 4-bit grid give ONNX Runtime's float answer; Gemms without a MatMulNBits form keep a
reason in the report."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from ortq.config import WeightOnlyConfig
from ortq.passes.matmul_nbits import quantize_weight_only
from ortq.runtime import create_session


def _gemm(b: np.ndarray, c: np.ndarray, **attrs) -> onnx.ModelProto:
    k = b.shape[1] if attrs.get("transB") else b.shape[0]
    n = c.shape[0]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "B", "C"], ["y"], name="gemm", **attrs)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(b, "B"), numpy_helper.from_array(c, "C")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _on_grid(rng, n: int, k: int, block: int) -> np.ndarray:
    """[N, K] weights exactly representable with symmetric 4-bit blocks (scale absmax / 7 per block, a float16
    value as the scales are stored)."""
    codes = rng.integers(-7, 8, size=(n, k)).astype(np.float32)
    codes[:, ::block] = 7  # every block holds +7: its scale is exactly the chosen one
    scales = rng.uniform(0.01, 0.05, size=(n, k // block)).astype(np.float16).astype(np.float32)
    return codes * np.repeat(scales, block, axis=1)


def _run(proto, x):
    return create_session(proto.SerializeToString()).run(None, {"x": x})[0]


def test_gemm_transb_with_bias_becomes_matmulnbits_with_exact_answer():
    rng = np.random.default_rng(0)
    w_nk = _on_grid(rng, 24, 64, 32)
    c = rng.normal(size=24).astype(np.float32)
    proto = _gemm(w_nk, c, transB=1)
    model, report = quantize_weight_only(ir.from_proto(proto), WeightOnlyConfig(bits=4, block_size=32, symmetric=True,
                                                                                auto_int8_sensitive=False,
                                                                                accuracy_level=None))
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node] == ["Cast", "MatMulNBits"]  # Cast: the float16 scales
    assert report["num_quantized"] == 1 and report["nodes"][0]["shape"] == [64, 24]
    x = rng.normal(size=(3, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), x @ w_nk.T + c, rtol=1e-4, atol=1e-4)


def test_gemm_without_matmulnbits_form_keeps_a_reason():
    rng = np.random.default_rng(1)
    proto = _gemm(rng.normal(size=(64, 8)).astype(np.float32), np.zeros(8, np.float32), alpha=0.5)
    model, report = quantize_weight_only(ir.from_proto(proto), WeightOnlyConfig(bits=4, auto_int8_sensitive=False))
    assert report["num_quantized"] == 0
    assert "alpha" in report["float_nodes"]["gemm"]
