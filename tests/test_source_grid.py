"""Weights already on a block grid (GGUF Q4_0 / Q4_1 / Q8_0 sources) keep it exactly."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from ortq.config import WeightOnlyConfig
from ortq.passes._int4 import find_source_grid
from tests.test_matmul_nbits import _mlp_model, _quantize, _run


def q4_1(rng, rows, k, bs=32):
    """GGUF Q4_1 as dequantized by gguf: ``d * q + m`` in float32, ``d`` and ``m`` float16, q in 0..15."""
    nb = k // bs
    d = (rng.random((rows, nb, 1)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-rng.random((rows, nb, 1)) * 0.1).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (rows, nb, bs)).astype(np.float32)
    q[:, :, 0], q[:, :, 1] = 0, 15
    return (d * q + m).reshape(rows, k)


def q_sym(rng, rows, k, bits, bs=32):
    """GGUF Q4_0 (``d * (q - 8)``) / Q8_0 (``d * q``, |q| <= 127) with float16 ``d``."""
    nb, half = k // bs, 1 << (bits - 1)
    d = (rng.random((rows, nb, 1)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    q = rng.integers(-half + 1, half, (rows, nb, bs)).astype(np.float32)
    q[:, :, 0] = half - 1
    return (d * q).reshape(rows, k)


def test_q4_1_grid_is_found_bit_exactly():
    rng = np.random.default_rng(0)
    w = q4_1(rng, 40, 96)
    grid = find_source_grid(w, 4, 32)
    assert grid is not None and grid.offsets is not None
    assert np.array_equal(grid.dequantize(), w)
    assert grid.blocks.q.max() <= 15 and grid.blocks.zero_points.max() <= 15


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_grids_need_no_offsets(bits):
    rng = np.random.default_rng(1)
    w = q_sym(rng, 24, 64, bits)
    grid = find_source_grid(w, bits, 32)
    assert grid is not None and grid.offsets is None and grid.blocks.zero_points is None
    assert np.array_equal(grid.blocks.dequantize(), w)


def test_float_weights_and_mismatched_blocks_are_not_a_grid():
    rng = np.random.default_rng(2)
    assert find_source_grid(rng.standard_normal((16, 64)).astype(np.float32), 4, 32) is None
    assert find_source_grid(q4_1(rng, 16, 64, bs=64), 4, 32) is None  # 64-blocks are not 32-blocks
    assert find_source_grid(q4_1(rng, 16, 96), 4, 64) is None  # K=96 is not a whole number of 64-blocks


@pytest.mark.parametrize("bias", [False, True])
def test_pass_carries_q4_1_and_q4_0_grids_and_matches_the_float_model(bias):
    rng = np.random.default_rng(3)
    proto, _ = _mlp_model(rng, k=64, hidden=64, bias=bias)
    w1 = q4_1(rng, 64, 64).T.copy()  # blocks run along K, the first axis of a MatMul weight
    w2 = (q_sym(rng, 48, 64, 4)).T.copy()
    for t in proto.graph.initializer:
        if t.name in ("W1", "W2"):
            t.CopyFrom(numpy_helper.from_array({"W1": w1, "W2": w2}[t.name], t.name))
    qproto, report = _quantize(proto, WeightOnlyConfig(accuracy_level=None, keep_source_grid=True))
    assert report["source_grid"] == {"carried": ["fc1", "fc2"], "requantized": []}
    by_node = {e["node"]: e for e in report["nodes"]}
    assert by_node["fc1"].get("block_offsets") and not by_node["fc2"].get("block_offsets")
    assert {e["weight_rel_rmse"] for e in report["nodes"]} == {0.0}
    ops = [n.op_type for n in qproto.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 2  # block sums, offsets
    a = rng.standard_normal((2, 5, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(qproto, {"A": a}), _run(proto, {"A": a}), rtol=1e-4, atol=1e-4)

    _, again = _quantize(proto, WeightOnlyConfig(accuracy_level=None, keep_source_grid=False, sensitive_budget=0.0,
                                                symmetric=False))
    assert again["source_grid"]["carried"] == []
    assert all(e["weight_rel_rmse"] > 0 for e in again["nodes"])
