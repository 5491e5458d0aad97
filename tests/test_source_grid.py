"""Weights already on a block grid (GGUF Q4_0 / Q4_1 / Q8_0 sources) keep it exactly."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from ortq.config import WeightOnlyConfig
from ortq.passes._int4 import find_source_grid
from ortq.passes.block_offsets import fold_offsets, folded_weight
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
    qproto, report = _quantize(proto, WeightOnlyConfig(accuracy_level=None, keep_source_grid=True,
                                                       fold_block_offsets=False))
    assert report["source_grid"] == {"carried": ["fc1", "fc2"], "requantized": []}
    by_node = {e["node"]: e for e in report["nodes"]}
    assert by_node["fc1"]["block_offsets"] == "float16" and not by_node["fc2"].get("block_offsets")
    assert {e["weight_rel_rmse"] for e in report["nodes"]} == {0.0}
    ops = [n.op_type for n in qproto.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 2  # block sums, offsets
    a = rng.standard_normal((2, 5, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(qproto, {"A": a}), _run(proto, {"A": a}), rtol=1e-4, atol=1e-4)

    _, again = _quantize(proto, WeightOnlyConfig(accuracy_level=None, keep_source_grid=False, sensitive_budget=0.0,
                                                symmetric=False))
    assert again["source_grid"]["carried"] == []
    assert all(e["weight_rel_rmse"] > 0 for e in again["nodes"])


def q4_1_straddling(rng, rows, k, bs=32):
    """Q4_1 blocks as a real weight has them: the block's range contains 0 (``-m / d`` within 0..15)."""
    nb = k // bs
    d = (rng.random((rows, nb, 1)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-d * rng.random((rows, nb, 1)) * 15).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (rows, nb, bs)).astype(np.float32)
    q[:, :, 0], q[:, :, 1] = 0, 15
    return (d * q + m).reshape(rows, k)


def test_fold_offsets_keeps_the_grid_and_rounds_the_offsets_within_half_a_step():
    rng = np.random.default_rng(5)
    w = q4_1_straddling(rng, 40, 96)
    grid = find_source_grid(w, 4, 32)
    folded = fold_offsets(grid.blocks, grid.offsets)
    assert folded.k == 96 + 3 and folded.n_blocks == 4
    codes = folded.q.reshape(40, 4, 32)
    assert np.array_equal(codes[:, :3], grid.blocks.q.reshape(40, 3, 32))  # the carried codes as they were
    # A new zero point per block leaves at most half a step of offset, rounded to 4 bits in the extra rows:
    # every weight within half an extra step of its value, a small fraction of the block's own step.
    extra_step = np.repeat(folded.scales[:, 3:], 96, axis=1)
    err = np.abs(folded_weight(folded, 96) - w)
    assert np.all(err <= extra_step / 2 + 1e-6)
    assert err.max() <= grid.blocks.scales.max() / 25


@pytest.mark.parametrize("accuracy_level", [None, 4])
def test_folded_offsets_run_in_one_matmulnbits_per_layer(accuracy_level):
    rng = np.random.default_rng(6)
    proto, _ = _mlp_model(rng, k=64, hidden=96, bias=True)
    w1, w2 = q4_1_straddling(rng, 96, 64).T.copy(), q4_1_straddling(rng, 48, 96).T.copy()
    for t in proto.graph.initializer:
        if t.name in ("W1", "W2"):
            t.CopyFrom(numpy_helper.from_array({"W1": w1, "W2": w2}[t.name], t.name))
    qproto, report = _quantize(proto, WeightOnlyConfig(accuracy_level=accuracy_level, keep_source_grid=True))
    assert report["source_grid"]["carried"] == ["fc1", "fc2"]
    for e in report["nodes"]:
        assert e["block_offsets"] == "folded: 4-bit rows" and 0 < e["weight_rel_rmse"] < 0.01
    ops = [n.op_type for n in qproto.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Concat") == 2 and ops.count("MatMul") == 2
    assert "Add" not in ops  # the bias went into MatMulNBits; no offsets Add
    ks = sorted(next(a.i for a in n.attribute if a.name == "K") for n in qproto.graph.node
                if n.op_type == "MatMulNBits")
    assert ks == [64 + 2, 96 + 3]  # a partial last block of block sums
    a = rng.standard_normal((2, 5, 64)).astype(np.float32)
    got, want = _run(qproto, {"A": a}), _run(proto, {"A": a})
    rel = np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))
    assert rel < (0.01 if accuracy_level is None else 0.03), rel
    if accuracy_level is None:  # float activations: the kernel computes exactly with the folded weights
        for t in proto.graph.initializer:
            if t.name in ("W1", "W2"):
                w = {"W1": w1, "W2": w2}[t.name]
                grid = find_source_grid(w.T.copy(), 4, 32)
                folded = fold_offsets(grid.blocks, grid.offsets, float16=True)
                t.CopyFrom(numpy_helper.from_array(folded_weight(folded, w.shape[0]).T.copy(), t.name))
        np.testing.assert_allclose(got, _run(proto, {"A": a}), rtol=1e-4, atol=1e-4)


def test_folded_offsets_bytes_are_what_the_budget_expects():
    from ortq.passes._int4 import SourceGrid
    from ortq.passes.weight_budget import stored_bytes

    rng = np.random.default_rng(7)
    grid = find_source_grid(q4_1_straddling(rng, 24, 128), 4, 32)
    folded = fold_offsets(grid.blocks, grid.offsets, float16=True)
    actual = stored_bytes(folded, SourceGrid(folded, None), float16=True)
    assert stored_bytes(grid.blocks, grid, float16=True, folded=True) == actual
    # Four offsets a column: one extra block of 4-bit codes, its float16 scale and a byte of zero points.
    assert actual - stored_bytes(grid.blocks, float16=True) == 24 * (16 + 2 + 1)


def test_recentered_zero_points_keep_the_weights_and_leave_at_most_half_a_step():
    from ortq.passes._int4 import SourceGrid
    from ortq.passes.block_offsets import recentered

    rng = np.random.default_rng(8)
    w = q4_1_straddling(rng, 16, 64)
    grid = find_source_grid(w, 4, 32)
    bq, offsets = recentered(grid.blocks, grid.offsets)
    assert np.array_equal(bq.q, grid.blocks.q)  # the codes stay; only the zero points move
    np.testing.assert_allclose(SourceGrid(bq, offsets).dequantize(), w, rtol=0, atol=1e-6)
    assert np.all(np.abs(offsets) <= bq.scales / 2 + 1e-7)
    assert bq.zero_points.mean() > 4  # centred: a straddling block's zero point sits inside its codes


def test_folded_offsets_weigh_blocks_by_their_activations():
    """With the activations' X^T X, the offsets of the blocks whose sums are large are rounded more finely."""
    rng = np.random.default_rng(9)
    w = q4_1_straddling(rng, 32, 256)  # 8 blocks a column: the extra rows share one scale
    grid = find_source_grid(w, 4, 32)
    scale = np.repeat(np.array([30.0, 1, 1, 1, 1, 1, 1, 1]), 32)  # block 0's activations 30x the others
    x = rng.standard_normal((512, 256)) * scale
    xtx = x.T @ x
    err = {}
    for name, h in (("plain", None), ("weighted", xtx)):
        folded = fold_offsets(grid.blocks, grid.offsets, xtx=h)
        d = folded_weight(folded, 256) - w
        err[name] = float(np.einsum("rk,kl,rl->", d, xtx, d))  # output error on these activations
    assert err["weighted"] < err["plain"]
