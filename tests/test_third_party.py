"""Graphs that other exporters write: old opsets, Constant-node weights, If/Loop subgraphs, LSTM/GRU,
tf2onnx and paddle2onnx naming and layouts. Each is quantized and checked against its float model (checker,
ONNX Runtime, outputs close), or refused with a clear ModelError."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from ortq import AutoQuantizationConfig
from ortq.errors import ModelError
from ortq.passes.prepare import prepare_model
from ortq.quantizer import ORTQuantizer

RNG = np.random.default_rng(0)


def _w(*shape, scale=0.3):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _const(name, array):
    return h.make_node("Constant", [], [name], value=nh.from_array(array, name), name=f"{name}_const")


def _model(nodes, inputs, outputs, initializers=(), opset=13, ir_version=None, producer=None):
    graph = h.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = ir_version or max(onnx.helper.find_min_ir_version_for(list(model.opset_import)), 7)
    if producer:
        model.producer_name = producer
    onnx.checker.check_model(model)
    return model


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _quantize_and_compare(tmp_path, model, feeds_fn, *, min_cos=0.99, n=64):
    """Quantize ``model`` on ``n`` samples and compare with the float model on held-out samples."""
    src = tmp_path / "float.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    cal = feeds_fn(n)
    np.savez(tmp_path / "cal.npz", **cal)
    q = ORTQuantizer.from_pretrained(src)
    out = q.quantize(
        AutoQuantizationConfig.avx2(), tmp_path / "int8", calibration_data=tmp_path / "cal.npz"
    )
    assert src.read_bytes() == before  # the input is never modified
    qproto = onnx.load(out)
    onnx.checker.check_model(qproto, full_check=True)
    assert any(n.op_type == "QuantizeLinear" for n in qproto.graph.node)
    held = feeds_fn(16)
    ref, got = _run(src, held), _run(out, held)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        a, b = r.ravel().astype(np.float64), g.ravel().astype(np.float64)
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
        assert cos > min_cos, cos
    report = json.loads((out.parent / "quantization_report.json").read_text())
    return q, report


def _x(name, *dims):
    return h.make_tensor_value_info(name, T.FLOAT, list(dims))


# ------------------------------------------------------------------------------------- old opsets


@pytest.mark.parametrize("opset", [11, 12])
def test_constant_weights_matmul_old_opset(tmp_path, opset):
    nodes = [
        _const("W1", _w(16, 32)),
        _const("B1", _w(32)),
        h.make_node("MatMul", ["x", "W1"], ["h0"], name="mm1"),
        h.make_node("Add", ["h0", "B1"], ["h1"], name="add1"),
        h.make_node("Relu", ["h1"], ["h2"], name="relu"),
        _const("W2", _w(32, 8)),
        h.make_node("MatMul", ["h2", "W2"], ["y"], name="mm2"),
    ]
    model = _model(nodes, [_x("x", "N", 16)], [_x("y", "N", 8)], opset=opset)
    q, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 16, scale=1.0)})
    prep = report["prepare"]
    assert prep["source_opset"] == opset and prep["opset"] == 13
    assert prep["lifted_constants"] == 3
    quantized = {n["name"] for n in report["plan"]["nodes"] if n["quantized"]}
    assert quantized == {"mm1", "mm2"}


def test_gemm_trans_b_opset11(tmp_path):
    nodes = [
        _const("fc.weight", _w(10, 24)),
        _const("fc.bias", _w(10)),
        h.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1),
    ]
    model = _model(nodes, [_x("x", "N", 24)], [_x("y", "N", 10)], opset=11)
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 24, scale=1.0)})
    fc = next(n for n in report["plan"]["nodes"] if n["name"] == "fc")
    assert fc["quantized"] and "per-channel axis 0" in fc["reason"]


def test_conv_constant_weight_opset12(tmp_path):
    nodes = [
        _const("conv.w", _w(8, 3, 3, 3)),
        _const("conv.b", _w(8)),
        h.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    model = _model(nodes, [_x("x", "N", 3, 8, 8)], [_x("y", "N", 8, 8, 8)], opset=12)
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 3, 8, 8, scale=1.0)})
    assert report["plan"]["num_quantized"] == 1


def test_model_zoo_opsets_are_upgraded(tmp_path):
    """Opset 7-9 graphs (the ONNX model zoo's) are upgraded with onnx.version_converter, then quantized."""
    nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = _model(nodes, [_x("x", "N", 4)], [_x("y", "N", 4)], [nh.from_array(_w(4, 4), "W")], opset=8)
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 4, scale=1.0)})
    assert report["plan"]["num_quantized"] == 1
    assert report["prepare"]["source_opset"] == 8 and report["prepare"]["opset"] == 13


def test_failed_opset_upgrade_is_a_model_error(tmp_path, monkeypatch):
    from onnx import version_converter

    def fail(model, target):
        raise RuntimeError("No Adapter For Current Version $ 11 for FancyOp")

    monkeypatch.setattr(version_converter, "convert_version", fail)
    nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = _model(nodes, [_x("x", "N", 4)], [_x("y", "N", 4)], [nh.from_array(_w(4, 4), "W")], opset=11)
    with pytest.raises(ModelError, match=r"opset 11 could not be upgraded to 13.*re-export"):
        prepare_model(model, source="m.onnx")


# ---------------------------------------------------------------------------------------- subgraphs


def _branch(name, op, out, extra_inputs=()):
    nodes = [h.make_node(op, ["h1", *extra_inputs], [out], name=f"{name}_{op}")]
    return h.make_graph(nodes, name, [], [_x(out, "N", 16)])


def test_if_subgraph_stays_float_main_graph_quantized(tmp_path):
    then_g = h.make_graph(
        [_const("two", np.array(2.0, np.float32)), h.make_node("Mul", ["h1", "two"], ["t_out"], name="then_mul")],
        "then", [], [_x("t_out", "N", 16)],
    )
    else_g = _branch("else", "Neg", "e_out")
    nodes = [
        h.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        h.make_node("ReduceSum", ["h1"], ["s"], name="sum", keepdims=0),
        h.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
        h.make_node("If", ["cond"], ["h2"], name="branch", then_branch=then_g, else_branch=else_g),
        h.make_node("MatMul", ["h2", "W2"], ["y"], name="mm2"),
    ]
    inits = [nh.from_array(_w(16, 16), "W1"), nh.from_array(_w(16, 4), "W2"), nh.from_array(np.array(0.0, np.float32), "zero")]
    model = _model(nodes, [_x("x", "N", 16)], [_x("y", "N", 4)], inits, opset=13)
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 16, scale=1.0)})
    assert "branch" in report["prepare"]["float_nodes"]
    assert "only the main graph is quantized" in report["prepare"]["float_nodes"]["branch"]
    quantized = {n["name"] for n in report["plan"]["nodes"] if n["quantized"]}
    assert quantized == {"mm1", "mm2"}


def test_loop_subgraph_stays_float(tmp_path):
    body = h.make_graph(
        [
            h.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
            h.make_node("Add", ["acc_in", "step"], ["acc_out"], name="body_add"),
        ],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         _x("acc_in", "N", 16)],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), _x("acc_out", "N", 16)],
    )
    nodes = [
        h.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        h.make_node("Loop", ["trips", "true", "h1"], ["h2"], name="loop", body=body),
        h.make_node("MatMul", ["h2", "W2"], ["y"], name="mm2"),
    ]
    inits = [
        nh.from_array(_w(16, 16), "W1"), nh.from_array(_w(16, 4), "W2"),
        nh.from_array(np.array(3, np.int64), "trips"), nh.from_array(np.array(True), "true"),
        nh.from_array(np.full((16,), 0.1, np.float32), "step"),
    ]
    model = _model(nodes, [_x("x", "N", 16)], [_x("y", "N", 4)], inits, opset=13)
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 16, scale=1.0)})
    assert "Loop holds subgraphs" in report["prepare"]["float_nodes"]["loop"]


# ---------------------------------------------------------------------------------------- recurrent


def _recurrent_model(op, gates, opset=13):
    hidden, inp = 8, 6
    w = _w(1, gates * hidden, inp)
    r = _w(1, gates * hidden, hidden)
    b = _w(1, 2 * gates * hidden, scale=0.1)
    nodes = [
        h.make_node(op, ["x", "W", "R", "B"], ["Y", "Y_h"], name="rnn", hidden_size=hidden),
        h.make_node("Squeeze", ["Y", "axes1"], ["Ys"], name="squeeze"),  # [seq, batch, hidden]
        h.make_node("MatMul", ["Ys", "Wout"], ["y"], name="head"),
    ]
    inits = [
        nh.from_array(w, "W"), nh.from_array(r, "R"), nh.from_array(b, "B"),
        nh.from_array(np.array([1], np.int64), "axes1"), nh.from_array(_w(hidden, 3), "Wout"),
    ]
    return _model(nodes, [_x("x", 5, "N", inp)], [_x("y", 5, "N", 3)], inits, opset=opset)


@pytest.mark.parametrize(("op", "gates"), [("LSTM", 4), ("GRU", 3)])
def test_recurrent_ops_stay_float(tmp_path, op, gates):
    model = _recurrent_model(op, gates)
    # Samples on the batch axis (axis 1 of [seq, batch, input]) do not fit the npz convention (first axis =
    # samples): calibrate on feed dicts instead.
    src = tmp_path / "float.onnx"
    onnx.save(model, src)
    feeds = [{"x": _w(5, 4, 6, scale=1.0)} for _ in range(8)]
    q = ORTQuantizer.from_pretrained(src)
    out = q.quantize(AutoQuantizationConfig.avx2(), tmp_path / "int8", calibration_data=feeds)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    held = {"x": _w(5, 4, 6, scale=1.0)}
    ref, got = _run(src, held)[0], _run(out, held)[0]
    cos = ref.ravel() @ got.ravel() / (np.linalg.norm(ref) * np.linalg.norm(got))
    assert cos > 0.99
    report = q.last_report
    assert f"recurrent op {op}" in report["prepare"]["float_nodes"]["rnn"]
    head = next(n for n in report["plan"]["nodes"] if n["name"] == "head")
    assert head["quantized"]


def test_only_recurrent_ops_is_nothing_to_quantize(tmp_path):
    hidden, inp = 8, 6
    nodes = [h.make_node("GRU", ["x", "W", "R"], ["Y"], name="gru", hidden_size=hidden)]
    inits = [nh.from_array(_w(1, 3 * hidden, inp), "W"), nh.from_array(_w(1, 3 * hidden, hidden), "R")]
    model = _model(nodes, [_x("x", 5, 2, inp)], [_x("Y", 5, 1, 2, hidden)], inits)
    onnx.save(model, tmp_path / "gru.onnx")
    q = ORTQuantizer.from_pretrained(tmp_path / "gru.onnx")
    with pytest.raises(ModelError, match="nothing to quantize"):
        q.quantize(AutoQuantizationConfig.avx2(), tmp_path / "out", calibration_data=[{"x": _w(5, 2, 6)}])
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ other exporters' style


def test_tf2onnx_style_nhwc_graph(tmp_path):
    """tf2onnx: NHWC input named ``input_1:0``, Transposes around Conv, Constant weights, ``:0`` names."""
    nodes = [
        h.make_node("Transpose", ["input_1:0"], ["conv2d/Conv2D__5:0"], name="conv2d/Conv2D__5", perm=[0, 3, 1, 2]),
        _const("conv2d/Conv2D/ReadVariableOp:0", _w(6, 3, 3, 3)),
        _const("conv2d/BiasAdd/ReadVariableOp:0", _w(6)),
        h.make_node(
            "Conv", ["conv2d/Conv2D__5:0", "conv2d/Conv2D/ReadVariableOp:0", "conv2d/BiasAdd/ReadVariableOp:0"],
            ["conv2d/BiasAdd:0"], name="conv2d/BiasAdd", pads=[1, 1, 1, 1], strides=[1, 1],
        ),
        h.make_node("Relu", ["conv2d/BiasAdd:0"], ["conv2d/Relu:0"], name="conv2d/Relu"),
        h.make_node("Transpose", ["conv2d/Relu:0"], ["conv2d/Relu__7:0"], name="conv2d/Relu__7", perm=[0, 2, 3, 1]),
        _const("flatten/Const:0", np.array([-1, 6 * 8 * 8], np.int64)),
        h.make_node("Reshape", ["conv2d/Relu__7:0", "flatten/Const:0"], ["flatten/Reshape:0"], name="flatten/Reshape"),
        _const("dense/MatMul/ReadVariableOp:0", _w(6 * 8 * 8, 10, scale=0.05)),
        h.make_node("MatMul", ["flatten/Reshape:0", "dense/MatMul/ReadVariableOp:0"], ["dense/MatMul:0"],
                    name="dense/MatMul"),
        _const("dense/BiasAdd/ReadVariableOp:0", _w(10)),
        h.make_node("Add", ["dense/MatMul:0", "dense/BiasAdd/ReadVariableOp:0"], ["dense:0"], name="dense/BiasAdd2"),
    ]
    model = _model(
        nodes, [_x("input_1:0", "unk__10", 8, 8, 3)], [_x("dense:0", "unk__11", 10)], opset=13, producer="tf2onnx"
    )
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"input_1:0": _w(n, 8, 8, 3, scale=1.0)})
    quantized = {n["name"] for n in report["plan"]["nodes"] if n["quantized"]}
    # the NHWC Transpose and the Reshape after the int8 conv run on its 8-bit output (int8_chain)
    assert quantized == {"conv2d/BiasAdd", "conv2d/Relu__7", "flatten/Reshape", "dense/MatMul"}


def test_paddle_style_graph(tmp_path):
    """paddle2onnx: ``matmul_v2``/``elementwise_add``/``scale`` naming, opset 11, parameters as initializers."""
    nodes = [
        h.make_node("MatMul", ["x", "linear_0.w_0"], ["matmul_v2_0.tmp_0"], name="p2o.MatMul.0"),
        h.make_node("Add", ["matmul_v2_0.tmp_0", "linear_0.b_0"], ["elementwise_add_0"], name="p2o.Add.0"),
        h.make_node("Relu", ["elementwise_add_0"], ["relu_0.tmp_0"], name="p2o.Relu.0"),
        # paddle's scale op: x * scale + bias, exported as Mul + Add with Constant operands
        _const("p2o.helper.constant.0", np.array(0.5, np.float32)),
        h.make_node("Mul", ["relu_0.tmp_0", "p2o.helper.constant.0"], ["scale_0.tmp_0_mul"], name="p2o.Mul.0"),
        _const("p2o.helper.constant.1", np.array(0.1, np.float32)),
        h.make_node("Add", ["scale_0.tmp_0_mul", "p2o.helper.constant.1"], ["scale_0.tmp_0"], name="p2o.Add.1"),
        h.make_node("MatMul", ["scale_0.tmp_0", "linear_1.w_0"], ["matmul_v2_1.tmp_0"], name="p2o.MatMul.1"),
        h.make_node("Add", ["matmul_v2_1.tmp_0", "linear_1.b_0"], ["save_infer_model/scale_0.tmp_0"], name="p2o.Add.2"),
    ]
    inits = [
        nh.from_array(_w(12, 20), "linear_0.w_0"), nh.from_array(_w(20), "linear_0.b_0"),
        nh.from_array(_w(20, 5), "linear_1.w_0"), nh.from_array(_w(5), "linear_1.b_0"),
    ]
    model = _model(
        nodes, [_x("x", -1, 12)], [_x("save_infer_model/scale_0.tmp_0", -1, 5)], inits, opset=11, producer="paddle2onnx"
    )
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 12, scale=1.0)})
    quantized = {n["name"] for n in report["plan"]["nodes"] if n["quantized"]}
    assert quantized == {"p2o.MatMul.0", "p2o.MatMul.1"}


def test_integer_matmul_is_left_alone(tmp_path):
    """A MatMul on int32 tensors without value_info: shape inference tells the planner it is not float."""
    nodes = [
        h.make_node("Cast", ["x"], ["xi"], name="cast", to=T.INT32),
        h.make_node("MatMul", ["xi", "Wi"], ["yi"], name="int_mm"),
        h.make_node("Cast", ["yi"], ["yf"], name="cast_back", to=T.FLOAT),
        h.make_node("MatMul", ["yf", "W"], ["y"], name="float_mm"),
    ]
    inits = [nh.from_array(np.arange(12, dtype=np.int32).reshape(4, 3), "Wi"), nh.from_array(_w(3, 2), "W")]
    model = _model(nodes, [_x("x", "N", 4)], [_x("y", "N", 2)], inits)
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": np.round(_w(n, 4, scale=3.0))})
    decisions = {n["name"]: n for n in report["plan"]["nodes"]}
    assert decisions["float_mm"]["quantized"] and not decisions["int_mm"]["quantized"]


def test_already_quantized_model_is_refused(tmp_path):
    src = tmp_path / "float.onnx"
    nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    onnx.save(_model(nodes, [_x("x", "N", 8)], [_x("y", "N", 4)], [nh.from_array(_w(8, 4), "W")]), src)
    np.savez(tmp_path / "cal.npz", x=_w(32, 8))
    out = ORTQuantizer.from_pretrained(src).quantize(
        AutoQuantizationConfig.avx2(), tmp_path / "int8", calibration_data=tmp_path / "cal.npz"
    )
    with pytest.raises(ModelError, match="already quantized"):
        ORTQuantizer.from_pretrained(out)


def test_float16_model_is_refused_not_broken(tmp_path):
    """QuantizeLinear takes float32 below opset 19: a float16 graph is refused, never written broken."""
    nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    inits = [nh.from_array(_w(8, 4).astype(np.float16), "W")]
    model = _model(
        nodes, [h.make_tensor_value_info("x", T.FLOAT16, ["N", 8])],
        [h.make_tensor_value_info("y", T.FLOAT16, ["N", 4])], inits,
    )
    onnx.save(model, tmp_path / "f16.onnx")
    np.savez(tmp_path / "cal.npz", x=_w(16, 8).astype(np.float16))
    q = ORTQuantizer.from_pretrained(tmp_path / "f16.onnx")
    with pytest.raises(ModelError, match="nothing to quantize"):
        q.quantize(AutoQuantizationConfig.avx2(), tmp_path / "out", calibration_data=tmp_path / "cal.npz")
    assert not (tmp_path / "out").exists()


def test_opset10_model_with_smoothquant(tmp_path):
    """SmoothQuant statistics run on the prepared (upgraded) model, not on the opset-10 file."""
    nodes = [
        h.make_node("MatMul", ["x", "W1"], ["h0"], name="mm1"),
        h.make_node("Relu", ["h0"], ["h1"], name="relu"),
        h.make_node("MatMul", ["h1", "W2"], ["y"], name="mm2"),
    ]
    inits = [nh.from_array(_w(16, 32), "W1"), nh.from_array(_w(32, 8), "W2")]
    model = _model(nodes, [_x("x", "N", 16)], [_x("y", "N", 8)], inits, opset=10)
    _, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 16, scale=1.0)})
    assert report["prepare"]["source_opset"] == 10
    assert "smooth_quant" in report


def test_initializers_listed_as_inputs(tmp_path):
    """Old exports (``keep_initializers_as_inputs=True``, IR 3): weights are graph inputs with defaults. They
    become plain constants, so quantizing them leaves no required input behind."""
    nodes = [h.make_node("Gemm", ["x", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    w, b = _w(6, 12), _w(6)
    inputs = [_x("x", "N", 12), _x("fc.weight", 6, 12), _x("fc.bias", 6)]
    model = _model(nodes, inputs, [_x("y", "N", 6)], [nh.from_array(w, "fc.weight"), nh.from_array(b, "fc.bias")],
                   opset=11, ir_version=3)
    q, report = _quantize_and_compare(tmp_path, model, lambda n: {"x": _w(n, 12, scale=1.0)})
    assert report["prepare"]["initializers_removed_from_inputs"] == 2
    sess = ort.InferenceSession(str(tmp_path / "int8" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
