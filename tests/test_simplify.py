"""ortq.export.simplify: packed QKV for GroupQueryAttention and identity reshapes, exact by ONNX Runtime."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from ortq.export.simplify import _symbolic_dims, drop_identity_reshapes, pack_qkv, simplify_decoder
from ortq.runtime import create_session


def _decoder(same_input: bool = True, bias: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal((16, k)).astype(np.float32) for n, k in (("wq", 16), ("wk", 8), ("wv", 8))}
    inits = [numpy_helper.from_array(a, n) for n, a in w.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bk"))
    inits.append(numpy_helper.from_array(np.array([0, 0, 2, 8], np.int64), "heads"))
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x" if same_input else "x2", "wk"], ["k0"]),
        helper.make_node("Add", ["k0", "bk"] if bias else ["k0", "k0"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total"],
                         ["o", "present_k", "present_v"], domain="com.microsoft", num_heads=2, kv_num_heads=1),
        # torch's reshape(*input_shape, -1) of a [batch, seq, heads, dim] view: an identity on the op's output
        helper.make_node("Reshape", ["o", "heads"], ["o4"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Gather", ["shape", "one"], ["s"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Unsqueeze", ["s", "axes"], ["s1"]),
        helper.make_node("Concat", ["b1", "s1", "minus_one"], ["flat"], axis=0),
        helper.make_node("Reshape", ["o4", "flat"], ["o3"]),
        helper.make_node("Relu", ["o3"], ["y"]),
    ]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("zero", 0), ("one", 1), ("axes", [0]), ("minus_one", [-1]))]
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("x", f, ["batch", "seq", 16]),
        helper.make_tensor_value_info("x2", f, ["batch", "seq", 16]),
        helper.make_tensor_value_info("pk", f, ["batch", 1, "past", 8]),
        helper.make_tensor_value_info("pv", f, ["batch", 1, "past", 8]),
        helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("y", f, ["batch", "seq", 16]),
               helper.make_tensor_value_info("present_k", f, ["batch", 1, "total", 8]),
               helper.make_tensor_value_info("present_v", f, ["batch", 1, "total", 8])]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run(proto: onnx.ModelProto) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((1, 3, 16)).astype(np.float32),
            "x2": rng.standard_normal((1, 3, 16)).astype(np.float32),
            "pk": np.zeros((1, 1, 0, 8), np.float32), "pv": np.zeros((1, 1, 0, 8), np.float32),
            "seqlens": np.array([2], np.int32), "total": np.array(3, np.int32)}
    session = create_session(proto)
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in names})


def test_qkv_packed_and_identity_reshapes_dropped_exactly():
    proto = _decoder()
    before = _run(proto)
    simplified = simplify_decoder(proto)
    onnx.checker.check_model(simplified)
    ops = [n.op_type for n in simplified.graph.node]
    assert ops.count("MatMul") == 1 and "Reshape" not in ops and "Shape" not in ops
    gqa = next(n for n in simplified.graph.node if n.op_type == "GroupQueryAttention")
    assert gqa.input[1] == gqa.input[2] == ""
    for a, b in zip(before, _run(simplified), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_projections_of_different_inputs_are_not_packed():
    model = ir.serde.deserialize_model(_decoder(same_input=False))
    assert pack_qkv(model) == 0


def test_a_reshape_that_changes_the_shape_stays():
    proto = _decoder()
    model = ir.serde.deserialize_model(proto)
    dims = _symbolic_dims(proto)
    assert dims["o4"] == ("batch", "seq", 2, 8)
    assert drop_identity_reshapes(model, dims) == 1  # o3 (back to o's shape) goes; o4 alone would not
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert relu.inputs[0].name == "o"
