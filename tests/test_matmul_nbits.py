"""MatMul -> MatMulNBits: packing, RTN / GPTQ, overrides and the report, with ONNX Runtime as the oracle."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortq.config import WeightOnlyConfig
from ortq.errors import CalibrationDataError, ConfigError
from ortq.passes._int4 import BlockQuantized, on_grid, pack, quantize_gptq, quantize_rtn, unpack
from ortq.passes.matmul_nbits import MatMulNBitsPass, quantize_weight_only
from ortq.quantize_steps import weight_only_statistics


def _mlp_model(rng, k=64, n=48, hidden=96, bias=True, out_proj=False):
    """A -> MatMul(W1) [+ b1] -> Relu -> MatMul(W2) -> Y (W2 optionally a graph-output projection)."""
    w1 = rng.standard_normal((k, hidden)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((hidden, n)).astype(np.float32) * 0.1
    b1 = rng.standard_normal(hidden).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["A", "W1"], ["h0"], name="fc1")]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    last = "h0"
    if bias:
        nodes.append(helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"))
        inits.append(numpy_helper.from_array(b1, "b1"))
        last = "h1"
    nodes.append(helper.make_node("Relu", [last], ["r"], name="act"))
    nodes.append(helper.make_node("MatMul", ["r", "W2"], ["Y" if out_proj else "y0"], name="fc2"))
    if not out_proj:
        nodes.append(helper.make_node("Relu", ["y0"], ["Y"], name="act2"))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "s", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model, {"W1": w1, "W2": w2, "b1": b1 if bias else np.zeros(hidden, np.float32)}


def _run(proto: onnx.ModelProto, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _quantize(proto, config, calibration_batches=None, **kw):
    model = ir.from_proto(proto)
    if calibration_batches is not None:
        kw.update(weight_only_statistics(model, config, calibration_batches))
    model, report = quantize_weight_only(model, config, **kw)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    return out, report


def _init(proto, name):
    """An initializer by name; a float16 one read through its Cast (``float16_scales``) as float32."""
    inits = {t.name: t for t in proto.graph.initializer}
    if name not in inits:
        return numpy_helper.to_array(inits[name + "_f16"]).astype(np.float32)
    return numpy_helper.to_array(inits[name])


def _dequant_from_proto(proto, node: onnx.NodeProto) -> np.ndarray:
    """Numpy reference: rebuild W [K, N] from a MatMulNBits node's initializers and attributes."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, bs = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    b = _init(proto, node.input[1])
    nb = b.shape[1]
    q = unpack(b.reshape(n, -1), bits, nb * bs)
    scales = _init(proto, node.input[2]).reshape(n, nb)
    zp = None
    if len(node.input) > 3 and node.input[3]:
        zp = unpack(_init(proto, node.input[3]), bits, nb)
    bq = BlockQuantized(q=q, scales=scales, zero_points=zp, bits=bits, block_size=bs, k=k)
    return bq.dequantize().T


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_roundtrip(bits):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 1 << bits, (5, 37)).astype(np.uint8)
    packed = pack(q, bits)
    assert packed.shape == (5, 37 if bits == 8 else 19)
    np.testing.assert_array_equal(unpack(packed, bits, 37), q)
    if bits == 4:  # first code in the low nibble
        assert packed[0, 0] == (q[0, 0] | (q[0, 1] << 4))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("search", [False, True])
def test_on_grid_weights_roundtrip_exactly(symmetric, bits, search):
    rng = np.random.default_rng(1)
    w = on_grid(np.zeros((24, 96)), bits, 32, symmetric, rng)
    bq = quantize_rtn(w, bits, 32, symmetric, search=search)
    np.testing.assert_array_equal(bq.dequantize(), w)
    assert (bq.zero_points is None) == symmetric


def test_search_never_worse_than_minmax():
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, (64, 256)).astype(np.float32)
    for sym in (False, True):
        e0 = np.square(quantize_rtn(w, 4, 32, sym, search=False).dequantize() - w).sum()
        e1 = np.square(quantize_rtn(w, 4, 32, sym, search=True).dequantize() - w).sum()
        assert e1 < e0


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matmulnbits_equals_numpy_reference(block_size, symmetric):
    rng = np.random.default_rng(3)
    proto, _ = _mlp_model(rng, k=80, hidden=96)  # K=80: the last block is padded for bs 32/64/128
    cfg = WeightOnlyConfig(block_size=block_size, symmetric=symmetric, accuracy_level=None)
    qproto, report = _quantize(proto, cfg)
    ops = [n.op_type for n in qproto.graph.node]
    assert ops.count("MatMulNBits") == 2 and "MatMul" not in ops and "Add" not in ops  # bias fused
    a = rng.standard_normal((2, 3, 80)).astype(np.float32)
    nodes = {n.name: n for n in qproto.graph.node if n.op_type == "MatMulNBits"}
    w1 = _dequant_from_proto(qproto, nodes["fc1_Q4"])
    w2 = _dequant_from_proto(qproto, nodes["fc2_Q4"])
    b1 = _init(qproto, nodes["fc1_Q4"].input[5])
    ref = np.maximum(np.maximum(a @ w1 + b1, 0) @ w2, 0)
    np.testing.assert_allclose(_run(qproto, {"A": a}), ref, rtol=1e-5, atol=1e-5)
    assert report["num_quantized"] == 2
    assert report["bytes_after"] < report["bytes_before"] / 4
    for entry in report["nodes"]:
        assert entry["bits"] == 4 and entry["block_size"] == block_size and entry["weight_rel_rmse"] < 0.2


@pytest.mark.parametrize("symmetric", [False, True])
def test_on_grid_model_is_reproduced(symmetric):
    rng = np.random.default_rng(4)
    proto, w = _mlp_model(rng, k=64, hidden=64, bias=False)
    w1 = on_grid(np.zeros((64, 64)), 4, 32, symmetric, rng).T.copy()  # rows of W^T lie on the grid
    w2 = on_grid(np.zeros((48, 64)), 4, 32, symmetric, rng).T.copy()
    for t in proto.graph.initializer:
        t.CopyFrom(numpy_helper.from_array({"W1": w1, "W2": w2}[t.name], t.name))
    qproto, report = _quantize(proto, WeightOnlyConfig(symmetric=symmetric, accuracy_level=None))
    assert all(e["weight_rel_rmse"] == 0.0 for e in report["nodes"])
    a = rng.standard_normal((1, 5, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(qproto, {"A": a}), _run(proto, {"A": a}), rtol=1e-5, atol=1e-5)


def test_accuracy_level_4_is_close():
    rng = np.random.default_rng(5)
    proto, _ = _mlp_model(rng)
    qproto, _ = _quantize(proto, WeightOnlyConfig(accuracy_level=4))
    attrs = [a for n in qproto.graph.node if n.op_type == "MatMulNBits" for a in n.attribute]
    assert any(a.name == "accuracy_level" and a.i == 4 for a in attrs)
    ref_proto, _ = _quantize(proto, WeightOnlyConfig(accuracy_level=None))
    a = rng.standard_normal((2, 4, 64)).astype(np.float32)
    y, ref = _run(qproto, {"A": a}), _run(ref_proto, {"A": a})
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


def test_int8_overrides_by_pattern_and_auto_output_projection():
    rng = np.random.default_rng(6)
    proto, _ = _mlp_model(rng, out_proj=True)
    _, report = _quantize(proto, WeightOnlyConfig(accuracy_level=None))
    bits = {e["node"]: e["bits"] for e in report["nodes"]}
    assert bits == {"fc1": 4, "fc2": 8}  # fc2 feeds the graph output
    _, report = _quantize(proto, WeightOnlyConfig(auto_int8_sensitive=False, int8_nodes=("fc1*",)))
    assert {e["node"]: e["bits"] for e in report["nodes"]} == {"fc1": 8, "fc2": 4}
    qproto, report = _quantize(proto, WeightOnlyConfig(nodes_to_exclude=("fc2",), accuracy_level=None))
    assert report["float_nodes"] == {"fc2": "excluded by nodes_to_exclude"}
    assert [n.op_type for n in qproto.graph.node].count("MatMul") == 1


def test_8bit_matmulnbits_equals_reference():
    rng = np.random.default_rng(7)
    proto, _ = _mlp_model(rng, bias=False)
    qproto, _ = _quantize(proto, WeightOnlyConfig(bits=8, accuracy_level=None))
    nodes = {n.name: n for n in qproto.graph.node if n.op_type == "MatMulNBits"}
    a = rng.standard_normal((2, 3, 64)).astype(np.float32)
    w1, w2 = (_dequant_from_proto(qproto, nodes[k]) for k in ("fc1_Q8", "fc2_Q8"))
    ref = np.maximum(np.maximum(a @ w1, 0) @ w2, 0)
    np.testing.assert_allclose(_run(qproto, {"A": a}), ref, rtol=1e-5, atol=1e-5)


def test_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(8)
    k, n = 128, 64
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 16.0)
    x = rng.standard_normal((2048, k)) @ mix
    w = rng.standard_normal((n, k)).astype(np.float32)
    h = x.T @ x
    e_rtn = x @ (quantize_rtn(w, 4, 32).dequantize() - w).T
    e_gptq = x @ (quantize_gptq(w, h, 4, 32).dequantize() - w).T
    assert np.square(e_gptq).sum() < 0.7 * np.square(e_rtn).sum()


def test_gptq_through_the_pass_uses_calibration_data():
    rng = np.random.default_rng(9)
    proto, _ = _mlp_model(rng)
    batches = [{"A": rng.standard_normal((2, 8, 64)).astype(np.float32)} for _ in range(4)]
    qproto, report = _quantize(
        proto, WeightOnlyConfig(algorithm="gptq", accuracy_level=None), calibration_batches=batches
    )
    assert {e["algorithm"] for e in report["nodes"]} == {"gptq"}
    assert report["calibration"]["tokens"] == 64
    assert all("output_rel_rmse" in e for e in report["nodes"])
    a = batches[0]["A"]
    y, ref = _run(qproto, {"A": a}), _run(proto, {"A": a})
    assert np.abs(y - ref).max() < 0.2 * np.abs(ref).max()


def test_errors():
    rng = np.random.default_rng(10)
    proto, _ = _mlp_model(rng)
    _, report = quantize_weight_only(ir.from_proto(proto), WeightOnlyConfig(algorithm="gptq"))
    assert report["notes"] == ["gptq without calibration statistics: rtn used"]  # the default, without data
    assert {e["algorithm"] for e in report["nodes"]} == {"rtn"}
    with pytest.raises(ConfigError):
        WeightOnlyConfig(algorithm="awq")
    with pytest.raises(CalibrationDataError):
        _quantize(proto, WeightOnlyConfig(algorithm="gptq"), calibration_batches=[])


def test_matmul_nbits_pass_reports_in_one_shape():
    rng = np.random.default_rng(11)
    proto, _ = _mlp_model(rng)
    config = WeightOnlyConfig(accuracy_level=None)
    model = ir.from_proto(proto)
    quantize = MatMulNBitsPass(config)
    result = quantize(model)
    assert result.modified and result.model is model
    assert quantize.report_key == "weight_only" and quantize.report["num_quantized"] == 2
    assert {n.op_type for n in model.graph} >= {"MatMulNBits"}
    assert quantize.report["calibration"] is None


def test_codes_spilled_to_files_give_the_same_model(monkeypatch):
    """Large weights: the plans' packed codes wait in files until written, with the same result (GPTQ, and a
    sensitivity budget that re-plans layers at 8 bits)."""
    import ortq.passes.matmul_nbits as mn

    proto, _ = _mlp_model(np.random.default_rng(3), k=64, hidden=96, n=32)
    rng = np.random.default_rng(4)
    batches = [{"A": rng.standard_normal((2, 4, 64)).astype(np.float32)} for _ in range(4)]
    config = WeightOnlyConfig(bits=4, block_size=16, algorithm="gptq", sensitive_budget=0.5)
    kept, report = _quantize(proto, config, batches)
    monkeypatch.setattr(mn, "SPILL_BYTES", 0)
    saved = []
    real_save = np.save
    monkeypatch.setattr(mn.np, "save", lambda path, a: (saved.append(path), real_save(path, a))[1])
    spilled, spilled_report = _quantize(proto, config, batches)
    assert len(saved) >= 2 and not any(p.exists() for p in saved)  # written, then cleaned up
    assert kept.SerializeToString() == spilled.SerializeToString()
    assert any(str(e.get("bits_reason", "")).startswith("sensitive") for e in report["nodes"])
