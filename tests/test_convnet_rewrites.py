"""Exact convnet rewrites before planning (:mod:`ortq.passes.convnet_rewrites`): TensorFlow-style ``Pad -> Conv``
folds into the convolution (no float Q/DQ pair left between int8 convolutions), and an ``AveragePool`` over its
whole input becomes ``GlobalAveragePool`` (ONNX Runtime's int8 average pool divides such a window by its full
size: all-zero logits, a NaN cosine, on Hugging Face's EfficientNet)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import export_and_int8
from onnx import TensorProto, helper, numpy_helper

from ortq.config import QuantizationConfig
from ortq.passes.convnet_rewrites import (
    decompose_hard_activations,
    fold_pads_into_convs,
    global_average_pools,
    rewrite_convnet,
)
from ortq.runtime import create_session
from ortq.validate.placement import inspect_placement


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return create_session(model.SerializeToString()).run(None, {"x": x})[0]


def _pad_conv(pads: list[int], value: float = 0.0, auto_pad: str | None = None) -> onnx.ModelProto:
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    conv_attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": [1, 0, 0, 1]}
    nodes = [
        # pads computed from constants, as the exporters write TensorFlow "same" padding
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
        helper.make_node("Concat", ["zeros", "tail"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads", "value"], ["padded"], mode="constant"),
        helper.make_node("Conv", ["padded", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], **conv_attrs),
    ]
    inits = [numpy_helper.from_array(np.array([4], np.int64), "shape"),
             numpy_helper.from_array(np.array(pads, np.int64), "tail"),
             numpy_helper.from_array(np.array(value, np.float32), "value"),
             numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, None, None])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("auto_pad", [None, "VALID"])
def test_zero_pad_folds_into_the_convolution(auto_pad):
    model = _pad_conv([0, 0, 1, 2], auto_pad=auto_pad)  # end pads of H and W (begin pads all zero)
    folded, n = fold_pads_into_convs(model)
    assert n == 1
    onnx.checker.check_model(folded, full_check=True)
    assert [node.op_type for node in folded.graph.node] == ["Conv"]
    assert {i.name for i in folded.graph.initializer} == {"w"}  # the pads' constant chain is gone
    x = np.random.default_rng(1).normal(size=(2, 3, 9, 10)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert len(model.graph.node) == 4  # the input model is left alone


@pytest.mark.parametrize("pads, value", [([1, 0, 1, 2], 0.0), ([0, 0, 1, 2], 1.0), ([0, 0, -1, 2], 0.0)])
def test_pads_that_are_not_convolution_padding_stay(pads, value):
    # channel padding, a non-zero fill value, a crop: not the convolution's zero padding
    model = _pad_conv(pads, value)
    assert fold_pads_into_convs(model)[1] == 0


def _pool(kernel: int, ceil_mode: int, size: int = 7) -> onnx.ModelProto:
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[kernel, kernel], strides=[kernel, kernel],
                            ceil_mode=ceil_mode, count_include_pad=1, pads=[0, 0, 0, 0])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 1, 1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_average_pool_over_the_whole_input_becomes_global():
    x = np.random.default_rng(0).uniform(0, 2, size=(2, 4, 7, 7)).astype(np.float32)
    for kernel, ceil in ((1280, 1), (7, 0)):
        model = _pool(kernel, ceil)
        rewritten, n = global_average_pools(model)
        assert n == 1 and rewritten.graph.node[0].op_type == "GlobalAveragePool"
        np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=1e-6)
    for kernel, ceil in ((3, 1), (5, 0)):  # several windows: a real average pool
        assert global_average_pools(_pool(kernel, ceil))[1] == 0


def test_efficientnet_pooler_quantizes_to_nonzero_logits(tmp_path):
    """Regression: ``AvgPool2d(1280, ceil_mode=True)`` on a 7x7 map (Hugging Face's EfficientNet pooler) gave
    all-zero int8 logits, a NaN cosine to fp32."""
    torch = pytest.importorskip("torch")

    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(3, 8, 3, stride=2), nn.SiLU(),
                        nn.AvgPool2d(1280, ceil_mode=True), nn.Flatten(), nn.Linear(8, 10)).eval()
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(16, 3, 14, 14)).astype(np.float32)
    fp32_path, path = export_and_int8(net, tmp_path, calib, "x")
    _, done = rewrite_convnet(onnx.load(str(fp32_path)))
    assert done == {"evaluated_weights": 0, "sums_as_adds": 0, "folded_batch_norms": 0, "folded_pads": 1,
                    "global_pools": 1, "hard_activations": 0}
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = rng.normal(size=(8, 3, 14, 14)).astype(np.float32)
    ref = create_session(fp32_path).run(None, {"x": x})[0]
    out = create_session(path).run(None, {"x": x})[0]
    assert np.isfinite(out).all() and (np.linalg.norm(out, axis=1) > 0).all()
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cos.min() > 0.99, cos
    placement = inspect_placement(path, "cpu", {"x": x[:2]}, runs=1)
    assert placement.convolutions == {"total": 1, "int8": 1, "float": 0}
    assert placement.qlinear_elementwise.get("QLinearGlobalAveragePool") == 1
    assert "QLinearAveragePool" not in placement.qlinear_elementwise
    assert placement.unfused_qdq.get("DequantizeLinear", 0) == 0  # no Q/DQ pair left around the folded Pad


def test_an_initializer_that_is_also_an_input_survives_the_cleanup():
    model = _pad_conv([0, 0, 1, 2])
    model.graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "knob"))
    model.graph.input.append(helper.make_tensor_value_info("knob", TensorProto.FLOAT, [2]))
    folded, n = fold_pads_into_convs(model)
    assert n == 1 and {i.name for i in folded.graph.initializer} == {"w", "knob"}


def _conv_then(op: str, **attrs) -> onnx.ModelProto:
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 9, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 9, 10])],
                              initializer=[numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op, attrs, ops", [
    ("HardSwish", {}, ["Conv", "Add", "Clip", "Mul", "Mul"]),
    ("HardSigmoid", {"alpha": 0.2, "beta": 0.4}, ["Conv", "Add", "Clip", "Mul"]),
])
def test_hard_activations_after_a_conv_become_add_clip_mul(op, attrs, ops):
    model = _conv_then(op, **attrs)
    rewritten, n = decompose_hard_activations(model)
    assert n == 1 and [node.op_type for node in rewritten.graph.node] == ops
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(1).normal(size=(2, 3, 9, 10)).astype(np.float32) * 3
    np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=1e-5, atol=1e-6)


def _hard_net():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, 8, 1), nn.Conv2d(8, c, 1)

        def forward(self, x):
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.Hardswish(),
                        nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.Hardswish(), SE(16),
                        nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.05, 0.2)  # activations spread over Hardswish's curved part
    return net.eval()


def test_hardswish_and_squeeze_excitation_run_in_int8_kernels(tmp_path):
    """MobileNetV3's activations: Hardswish and the Hardsigmoid gate run as QLinearAdd / QLinearMul (the
    division by 6 is a scale, no kernel), with no float op or Q/DQ pair left between the convolutions."""
    pytest.importorskip("torch")

    rng = np.random.default_rng(0)
    calib = rng.normal(size=(16, 3, 16, 16)).astype(np.float32)
    _, path = export_and_int8(_hard_net(), tmp_path, calib, "x")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = rng.normal(size=(8, 3, 16, 16)).astype(np.float32)
    placement = inspect_placement(path, "cpu", {"x": x[:2]}, runs=1)
    assert placement.convolutions == {"total": 5, "int8": 5, "float": 0}
    # 2 Hardswish (an Add and a Mul each) and the SE gate (an Add, then the Mul by the block's input)
    assert placement.qlinear_elementwise == {"QLinearAdd": 3, "QLinearMul": 3, "QLinearGlobalAveragePool": 2}
    assert placement.unfused_qdq == {"QuantizeLinear": 1}  # the graph input only
    report = json.loads((path.parent / "quantization_report.json").read_text())
    assert report["prepare"]["hard_activations"] == 3
    assert len(report["plan"]["rescaled_outputs"]) == 3
    ref = create_session(tmp_path / "fp32" / "model.onnx").run(None, {"x": x})[0]
    out = create_session(path).run(None, {"x": x})[0]
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cos.min() > 0.99, cos


@pytest.mark.parametrize("factor", [0.5, -0.5])
def test_mul_by_a_scalar_between_int8_convs(factor):
    """A Mul by a positive scalar is a change of scale (no node left); by a negative one, a QLinearMul with
    the constant quantized on the activations' type."""
    import onnx_ir as ir

    from ortq.calibrators.base import TensorRange
    from ortq.passes.insert_qdq import insert_qdq
    from ortq.passes.plan import make_plan

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[1, 1], name="conv1"),
             helper.make_node("Mul", ["a", "k"], ["b"], name="scale"),
             helper.make_node("Conv", ["b", "w2"], ["y"], kernel_shape=[1, 1], name="conv2")]
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array(factor, np.float32), "k"),
             numpy_helper.from_array(rng.normal(size=(2, 4, 1, 1)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 5, 5])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
    a = _run(helper.make_model(helper.make_graph(nodes[:1], "a", graph.input, [helper.make_tensor_value_info(
        "a", TensorProto.FLOAT, None)], initializer=inits[:1]), opset_imports=proto.opset_import), x)
    lo, hi = float(a.min()), float(a.max())
    ranges = {"x": TensorRange(float(x.min()), float(x.max()), x.size, 0), "a": TensorRange(lo, hi, a.size, 0),
              "b": TensorRange(min(lo * factor, hi * factor), max(lo * factor, hi * factor), a.size, 0)}
    model = ir.from_proto(proto)
    plan = make_plan(model, QuantizationConfig(), ranges)
    out = ir.to_proto(insert_qdq(model, plan))
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    if factor > 0:
        assert plan.rescaled == {"b": "a"} and "Mul" not in ops and "k" not in plan.weights
        assert np.isclose(float(plan.activations["b"].scale), float(plan.activations["a"].scale) * factor)
    else:
        assert plan.rescaled == {} and "Mul" in ops and "k" in plan.weights
    np.testing.assert_allclose(_run(out, x), _run(proto, x), atol=0.05 * np.abs(_run(proto, x)).max())


def _paddle_block(bias: str = "reshape", readers: int = 1, training: bool = False) -> onnx.ModelProto:
    """``Conv -> Add(bias) -> BatchNormalization -> Hardswish as x * Clip(x + 3, 0, 6) / 6 -> Conv -> Sigmoid``, as
    paddle2onnx writes a MobileNetV3 block (the bias a Reshape of a constant; ``bias="none"``: no Add)."""
    rng = np.random.default_rng(0)
    c = 6
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv")]
    inits = [numpy_helper.from_array(rng.normal(size=(c, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "bias_flat"),
             numpy_helper.from_array(np.array([1, c, 1, 1], np.int64), "bias_shape"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.1, 3, c).astype(np.float32), "var"),
             numpy_helper.from_array(np.array(3.0, np.float32), "three"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(6.0, np.float32), "six"),
             numpy_helper.from_array(rng.normal(size=(4, c, 1, 1)).astype(np.float32), "w2")]
    pre_bn = "conv"
    if bias == "reshape":
        nodes += [helper.make_node("Reshape", ["bias_flat", "bias_shape"], ["bias"]),
                  helper.make_node("Add", ["conv", "bias"], ["biased"], name="bias_add")]
        pre_bn = "biased"
    nodes += [helper.make_node("BatchNormalization", [pre_bn, "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3,
                               name="bn", **({"training_mode": 1} if training else {})),
              helper.make_node("Add", ["bn", "three"], ["shifted"]),
              helper.make_node("Clip", ["shifted", "zero", "six"], ["clipped"]),
              helper.make_node("Mul", ["bn", "clipped"], ["prod"]),
              helper.make_node("Div", ["prod", "six"], ["hs"], name="div"),
              helper.make_node("Conv", ["hs", "w2"], ["logits"], kernel_shape=[1, 1], name="conv2"),
              helper.make_node("Sigmoid", ["logits"], ["y"])]  # (a graph output is left in float)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])]
    if readers == 2:  # the Conv's output read again: not foldable
        outputs.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, [None, c, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bias", ["reshape", "none"])
def test_batch_norm_and_bias_add_fold_into_the_convolution(bias):
    model = _paddle_block(bias)
    folded, n = rewrite_convnet(model)
    assert n["folded_batch_norms"] == (2 if bias == "reshape" else 1)
    assert n["hard_activations"] == 1  # the division after the Clip
    onnx.checker.check_model(folded, full_check=True)
    ops = [node.op_type for node in folded.graph.node]
    assert ops == ["Conv", "Add", "Clip", "Mul", "Mul", "Conv", "Sigmoid"]
    assert "bias_flat" not in {t.name for t in folded.graph.initializer}  # the bias's constant chain is gone
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(model, x), rtol=1e-5, atol=1e-5)
    assert len(model.graph.node) == len(_paddle_block(bias).graph.node)  # the input model is left alone


@pytest.mark.parametrize("kw", [{"readers": 2}, {"training": True}])
def test_batch_norm_that_is_not_the_convolutions_only_reader_stays(kw):
    model = _paddle_block("none", **kw)
    folded, n = rewrite_convnet(model)
    assert n["folded_batch_norms"] == 0
    assert "BatchNormalization" in [node.op_type for node in folded.graph.node]


def test_division_that_is_not_after_a_clip_stays():
    """Only the Hardswish shape becomes a product: a Div elsewhere (attention's scaling) is left as written."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Div", ["c", "six"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w"),
                                           numpy_helper.from_array(np.array(6.0, np.float32), "six")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert rewrite_convnet(model)[1]["hard_activations"] == 0


def test_paddle_style_block_runs_in_int8_kernels(tmp_path):
    """A paddle2onnx MobileNetV3 block (bias Add, BatchNormalization, Hardswish with its division): both
    convolutions in QLinearConv, no float op or Q/DQ pair between them, outputs close to fp32."""
    from ortq.quantizer import ORTQuantizer

    rng = np.random.default_rng(0)
    model = _paddle_block("reshape")
    (tmp_path / "fp32").mkdir()
    onnx.save(model, tmp_path / "fp32" / "model.onnx")
    calib = rng.normal(size=(32, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=calib)
    q = ORTQuantizer.from_pretrained(tmp_path / "fp32" / "model.onnx")
    q.show_progress = False
    path = q.quantize(QuantizationConfig(), tmp_path / "q", calibration_data=str(tmp_path / "calib.npz"))
    written = onnx.load(str(path))
    onnx.checker.check_model(written, full_check=True)
    # no initializer left unread (the division's constant became a scale): ONNX Runtime warns about each one
    read = {v for n in written.graph.node for v in n.input} | {o.name for o in written.graph.output}
    assert [t.name for t in written.graph.initializer if t.name not in read] == []
    x = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)
    placement = inspect_placement(path, "cpu", {"x": x[:2]}, runs=1)
    assert placement.convolutions == {"total": 2, "int8": 2, "float": 0}
    assert placement.unfused_qdq == {"QuantizeLinear": 1, "DequantizeLinear": 1}  # the graph's input and output
    report = json.loads((path.parent / "quantization_report.json").read_text())
    assert report["prepare"]["folded_batch_norms"] == 2
    ref, out = _run(model, x), create_session(path).run(None, {"x": x})[0]
    cos = (ref * out).sum() / (np.linalg.norm(ref) * np.linalg.norm(out))
    assert cos > 0.99, cos


@pytest.mark.parametrize("op", ["ConvTranspose", "Conv"])
def test_per_channel_mul_and_batch_norm_fold_into_conv_and_conv_transpose(op):
    """``Conv / ConvTranspose -> Mul(per-channel constant) -> BatchNormalization``, both folded: one node left,
    the same outputs."""
    rng = np.random.default_rng(0)
    cin, cout = 3, 5
    w = rng.normal(size=(cout, cin, 3, 3) if op == "Conv" else (cin, cout, 3, 3)).astype(np.float32)
    nodes = [helper.make_node(op, ["x", "w", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("Mul", ["scale", "c"], ["m"]),
             helper.make_node("BatchNormalization", ["m", "gamma", "beta", "mean", "var"], ["y"])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(size=cout).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=(cout, 1, 1)).astype(np.float32), "scale")]
    inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in (
        ("gamma", rng.uniform(0.5, 2, cout)), ("beta", rng.normal(size=cout)), ("mean", rng.normal(size=cout)),
        ("var", rng.uniform(0.1, 3, cout)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cin, 7, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, cout, None, None])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, n = rewrite_convnet(model)
    assert n["folded_batch_norms"] == 2 and [node.op_type for node in folded.graph.node] == [op]
    onnx.checker.check_model(folded, full_check=True)
    x = rng.normal(size=(2, cin, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(model, x), rtol=1e-4, atol=1e-4)


def test_sum_becomes_a_chain_of_adds():
    """Caffe2-era residual ``Sum`` nodes (no int8 kernel) become Adds (``QLinearAdd``), same values."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Sum", ["c", "x"], ["s2"], name="two"),
             helper.make_node("Sum", ["s2", "c", "x"], ["y"], name="three")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 4, 4])],
                              initializer=[numpy_helper.from_array(
                                  np.random.default_rng(0).normal(size=(3, 3, 1, 1)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from ortq.passes.convnet_rewrites import sums_as_adds

    rewritten, n = sums_as_adds(model)
    assert n == 2 and [node.op_type for node in rewritten.graph.node] == ["Conv", "Add", "Add", "Add"]
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=1e-6, atol=1e-6)


def test_weights_computed_by_constant_nodes_become_initializers():
    """A Conv weight stored in float16 behind a Cast, and a MatMul weight behind a Transpose, are evaluated
    into initializers (quantized as computed they would be quantized again on every run, never prepacked); a
    random op is never evaluated."""
    from ortq.passes.convnet_rewrites import constant_weights

    rng = np.random.default_rng(0)
    w16 = rng.normal(size=(4, 3, 1, 1)).astype(np.float16)
    wt = rng.normal(size=(5, 4)).astype(np.float32)
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("ReduceMean", ["c", "axes"], ["p"], keepdims=0),
             helper.make_node("Transpose", ["wt"], ["m"], perm=[1, 0]),
             helper.make_node("MatMul", ["p", "m"], ["y"]),
             helper.make_node("RandomNormal", [], ["noise"], shape=[5, 2]),
             helper.make_node("MatMul", ["y", "noise"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 2])],
                              initializer=[numpy_helper.from_array(w16, "w16"), numpy_helper.from_array(wt, "wt"),
                                           numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folded, n = constant_weights(model)
    assert n == 2
    onnx.checker.check_model(folded, full_check=True)
    assert [node.op_type for node in folded.graph.node] == ["Conv", "ReduceMean", "MatMul", "RandomNormal", "MatMul"]
    assert {"w", "m"} <= {t.name for t in folded.graph.initializer}
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(create_session(folded.SerializeToString()).run(["y"], {"x": x})[0],
                               create_session(model.SerializeToString()).run(["y"], {"x": x})[0], rtol=1e-5)


def test_a_tied_tables_transpose_stays():
    """``MatMul(h, Transpose(E))`` where a Gather reads ``E`` too (a tied lm_head) is left for the weight-only
    passes, which quantize the shared table once."""
    from ortq.passes.convnet_rewrites import constant_weights

    table = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "Et"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])],
                              initializer=[numpy_helper.from_array(table, "E")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert constant_weights(model) == (model, 0)
