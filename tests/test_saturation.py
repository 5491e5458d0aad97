"""Activation ranges cut to what the consumers tell apart (:mod:`ortq.passes.saturation`): a Hardswish input
needs nothing below -3, a Hardsigmoid input nothing outside [-3, 3], a SiLU input nothing below where its int8
Sigmoid rounds to zero; the int8 model gets a finer step there and stays at least as close to fp32."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortq.calibrators.base import TensorRange
from ortq.config import CalibrationConfig, QuantizationConfig
from ortq.passes.convnet_rewrites import decompose_hard_activations
from ortq.passes.saturation import narrowed_range, needed_interval
from ortq.quantizer import ORTQuantizer
from ortq.runtime import create_session
from ortq.validate.placement import inspect_placement


def _graph(tail: list[onnx.NodeProto], out: str, extra_inits=()) -> ir.Model:
    """``x -> Conv -> y -> tail``; returns the model as onnx_ir."""
    w = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), *extra_inits]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv"), *tail], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _c(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def _rng(low: float, high: float) -> TensorRange:
    return TensorRange(low=low, high=high, num_values=100, num_excluded=0)


def _y(model: ir.Model) -> ir.Value:
    return next(n for n in model.graph if n.name == "conv").outputs[0]


def _hard(op: str, **attrs) -> ir.Model:
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node(op, ["y"], ["z"], **attrs), helper.make_node("Conv", ["z", "w2"], ["out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"),
         numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "w2")]),
        opset_imports=[helper.make_opsetid("", 17)])
    rewritten, n = decompose_hard_activations(proto)
    assert n == 1
    return ir.from_proto(rewritten)


def test_decomposed_hardswish_input_needs_nothing_below_minus_three():
    model = _hard("HardSwish")
    lo, hi = needed_interval(_y(model), {"y": _rng(-40.0, 50.0)})
    assert lo == pytest.approx(-3.0, abs=0.01) and lo <= -3.0 and hi == math.inf
    cut = narrowed_range(_y(model), _rng(-40.0, 50.0), {"y": _rng(-40.0, 50.0)})
    assert cut.low == lo and cut.high == 50.0


def test_decomposed_hardsigmoid_input_needs_only_its_linear_part():
    model = _hard("HardSigmoid", alpha=1 / 6, beta=0.5)
    assert needed_interval(_y(model), {}) == pytest.approx((-3.0, 3.0))


def test_silu_input_needs_nothing_below_where_the_int8_sigmoid_is_zero():
    model = _graph([helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Mul", ["y", "s"], ["out"])], "out")
    ranges = {"y": _rng(-30.0, 20.0), "s": _rng(0.0, 1.0)}
    lo, hi = needed_interval(_y(model), ranges)
    half = 1 / 255 / 2
    assert lo == pytest.approx(-math.log(1 / half - 1), abs=0.01) and hi == math.inf
    # the Sigmoid of every cut value rounds to the zero point of the Sigmoid's grid
    assert 1 / (1 + math.exp(-lo)) <= half


def test_clip_and_scalar_ops_map_the_bounds_back():
    model = _graph([helper.make_node("Mul", ["y", "two"], ["m"]), helper.make_node("Sub", ["m", "one"], ["d"]),
                    helper.make_node("Clip", ["d", "lo", "hi"], ["out"])], "out",
                   [_c("two", 2.0), _c("one", 1.0), _c("lo", -1.0), _c("hi", 5.0)])
    assert needed_interval(_y(model), {}) == pytest.approx((0.0, 3.0))
    relu = _graph([helper.make_node("Relu", ["y"], ["out"])], "out")
    assert needed_interval(_y(relu), {}) == (0.0, math.inf)


@pytest.mark.parametrize("tail, out", [
    ([helper.make_node("Add", ["y", "y"], ["out"])], "out"),
    ([], "y"),
])
def test_other_consumers_need_everything(tail, out):
    model = _graph(tail, out)
    assert needed_interval(_y(model), {}) == (-math.inf, math.inf)
    assert narrowed_range(_y(model), _rng(-4.0, 4.0), {}) == _rng(-4.0, 4.0)


def test_a_value_also_read_by_a_convolution_keeps_its_range():
    model = _graph([helper.make_node("Clip", ["y", "lo", "hi"], ["c"]), helper.make_node("Conv", ["y", "w3"], ["z"]),
                    helper.make_node("Add", ["c", "z"], ["out"])], "out",
                   [_c("lo", 0.0), _c("hi", 6.0), numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w3")])
    assert needed_interval(_y(model), {}) == (-math.inf, math.inf)


def _mobile_block():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 3, 1, 1), nn.Conv2d(16, 16, 3, 1, 1, groups=16)
            self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
            self.c3 = nn.Conv2d(16, 8, 1)

        def forward(self, x):
            x = nn.functional.hardswish(self.c1(x))
            x = nn.functional.silu(self.c2(x))
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            x = x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))
            return self.c3(x)

    torch.manual_seed(0)
    block = Block().eval()
    with torch.no_grad():  # outputs well beyond the gates' saturation points on both sides
        block.c2.weight.mul_(4.0)
        block.fc2.weight.mul_(40.0)
    return block


def test_narrowed_int8_model_is_valid_finer_and_closer_to_fp32(tmp_path):
    torch = pytest.importorskip("torch")
    from ortq.export import export

    rng = np.random.default_rng(0)
    calib = (rng.normal(size=(16, 3, 12, 12)) * 3).astype(np.float32)
    export(_mobile_block(), tmp_path / "fp32", example_inputs=(torch.from_numpy(calib[:1]),), input_names=["x"],
           output_names=["y"])
    np.savez(tmp_path / "calib.npz", x=calib)
    x = (rng.normal(size=(16, 3, 12, 12)) * 3).astype(np.float32)
    ref = create_session(str(tmp_path / "fp32" / "model.onnx")).run(None, {"x": x})[0]
    errors, scales = {}, {}
    for narrow in (False, True):
        q = ORTQuantizer.from_pretrained(tmp_path / "fp32")
        q.show_progress = False
        out = tmp_path / f"q{narrow}"
        path = q.quantize(QuantizationConfig(narrow_saturated_ranges=narrow), out,
                          calibration_data=str(tmp_path / "calib.npz"), calibration_config=CalibrationConfig(batch_size=8))
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        placement = inspect_placement(path, "cpu", {"x": x[:2]}, runs=1)
        assert placement.convolutions["int8"] >= 4  # all but the last (its float output is the graph's)
        got = create_session(str(path)).run(None, {"x": x})[0]
        errors[narrow] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        report = json.loads((out / "quantization_report.json").read_text())
        scales[narrow] = {k: v["scale"] for k, v in report["plan"]["activations"].items() if "Conv_output" in k}
    # every convolution output feeding a Hardswish / SiLU / Hardsigmoid gets a finer step, none a coarser one
    finer = [k for k in scales[True] if scales[True][k] < scales[False][k] * 0.99]
    assert len(finer) == 3 and all(scales[True][k] <= scales[False][k] for k in scales[True])
    assert errors[True] <= errors[False] * 1.02
    assert errors[True] < 0.05
