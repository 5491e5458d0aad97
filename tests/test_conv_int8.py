"""Convolution int8 on the CPU EP: a small convnet (conv + BN + ReLU, depthwise conv with ReLU6, residual
Add, max pooling, global average pooling, a Linear head) quantized by ortq runs every convolution as
``QLinearConv``, its Add / pooling as QLinear kernels and the head as ``QGemm`` — per ONNX Runtime's own
profile — and agrees with fp32."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import export_and_int8

from ortq.calibrators.base import TensorRange
from ortq.config import QuantizationConfig, QuantType
from ortq.passes.plan import QParams, _fold_qparams, make_plan
from ortq.runtime import create_session
from ortq.validate.placement import inspect_placement


def _convnet():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6())
            self.pw = nn.Conv2d(c, c, 1)

        def forward(self, x):
            return torch.relu(x + self.pw(self.dw(self.a(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.block = Block(16)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.block(self.stem(x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BatchNorm statistics, folded into the convs at export
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def convnet_int8(tmp_path_factory):
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(16, 3, 32, 32)).astype(np.float32)
    return export_and_int8(_convnet(), tmp_path_factory.mktemp("convnet"), calib, "pixel_values")


def test_every_convolution_runs_as_an_integer_kernel(convnet_int8):
    fp32, path = convnet_int8
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    feeds = {"pixel_values": np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)}
    placement = inspect_placement(path, "cpu", feeds, runs=1)
    assert placement.convolutions == {"total": 4, "int8": 4, "float": 0}
    assert placement.integer_kernels == {"QGemm": 1, "QLinearConv": 4}
    assert placement.qlinear_elementwise == {"QLinearAdd": 1, "QLinearGlobalAveragePool": 1}
    assert placement.unfused_qdq_groups == [] and placement.flops["int8_fraction"] == 1.0
    report = json.loads((path.parent / "quantization_report.json").read_text())
    assert report["placement"]["convolutions"]["int8"] == 4
    reasons = {n["op_type"]: n["reason"] for n in report["plan"]["nodes"] if not n["quantized"]}
    assert "folded" in reasons["Relu"] and "folded" in reasons["Clip"]


def test_int8_convnet_agrees_with_fp32(convnet_int8):
    fp32, path = convnet_int8
    x = np.random.default_rng(2).normal(size=(8, 3, 32, 32)).astype(np.float32)
    ref = create_session(fp32).run(None, {"pixel_values": x})[0]
    out = create_session(path).run(None, {"pixel_values": x})[0]
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    assert cos.min() > 0.98, cos


def test_int8_chain_off_quantizes_inputs_only(convnet_int8, tmp_path):
    fp32, _ = convnet_int8
    model = ir.load(fp32)
    ranges = {v.name: TensorRange(-4.0, 4.0, 10, 0) for n in model.graph for v in (*n.inputs, *n.outputs)
              if v is not None and v.const_value is None}
    on = make_plan(model, QuantizationConfig(), ranges)
    off = make_plan(model, QuantizationConfig(int8_chain=False), ranges)
    assert off.rewire_all == set() and len(on.rewire_all) > 0
    assert {d.op_type for d in off.decisions if d.quantized} == {"Conv", "Gemm"}
    assert len(on.biases) == len(off.biases) == 5  # every Conv (BatchNorm folded in: a bias) and the head


def test_clip_folds_only_when_the_integer_range_lies_inside_it():
    rng = TensorRange(0.0, 6.0, 100, 0)
    qp = _fold_qparams(rng, (0.0, 6.0), QuantizationConfig())
    assert isinstance(qp, QParams) and int(qp.zero_point) == 0
    assert np.float32(255) * np.float32(qp.scale) <= 6.0  # ONNX Runtime then drops the Clip
    # symmetric int8 activations put zero mid-range: a Relu cannot fold
    sym = QuantizationConfig(activations_dtype=QuantType.QInt8, activations_symmetric=True)
    assert _fold_qparams(rng, (0.0, float("inf")), sym) is None
