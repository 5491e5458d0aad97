import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ortq.passes import cpu_kernels
from ortq.passes.cpu_kernels import avoid_slow_skip_layernorm, residual_adds

BLOCK = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 8] x) => (float[B, S, 8] y) {
    h = MatMul(x, w)
    hb = Add(h, bias)
    s = Add(hb, x)
    y = LayerNormalization<axis = -1>(s, gamma, beta)
}
"""


def _model():
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(BLOCK)
    for name, shape in (("w", (8, 8)), ("bias", (8,)), ("gamma", (8,)), ("beta", (8,))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name))
    return proto


def test_residual_add_found_and_bias_add_left_alone():
    model = ir.from_proto(_model())
    adds = residual_adds(model)
    assert [n.outputs[0].name for n in adds] == ["s"]


def test_rewrite_is_exact_when_the_fused_kernel_is_slower(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "skip_layernorm_slowdown", lambda hidden: 4.0)
    proto = _model()
    model = ir.from_proto(proto)
    summary = avoid_slow_skip_layernorm(model)
    assert summary["rewritten"] == 1 and summary["hidden_size"] == 8
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node].count("Sum") == 1
    x = np.random.default_rng(1).normal(size=(2, 5, 8)).astype(np.float32)

    def run(p):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(p.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(proto), run(out), rtol=1e-6, atol=1e-6)


def test_no_rewrite_when_not_slower(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "skip_layernorm_slowdown", lambda hidden: 1.0)
    model = ir.from_proto(_model())
    assert avoid_slow_skip_layernorm(model)["rewritten"] == 0
    assert "Sum" not in [n.op_type for n in model.graph]


def test_slowdown_is_measured():
    assert cpu_kernels.skip_layernorm_slowdown(64, tokens=64) > 0
