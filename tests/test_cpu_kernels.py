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


def test_cpu_kernels_pass_reports_the_summary(monkeypatch):
    from ortq.passes.cpu_kernels import CpuKernelsPass

    monkeypatch.setattr(cpu_kernels, "skip_layernorm_slowdown", lambda hidden: 4.0)
    model = ir.from_proto(_model())
    tune = CpuKernelsPass()
    assert tune(model).modified
    assert tune.report_key == "cpu_kernels" and tune.report["rewritten"] == 1


def test_timing_sessions_do_not_spin(monkeypatch):
    from ortq import runtime

    seen = []
    real = runtime.create_session

    def spy(model, **kwargs):
        session = real(model, **kwargs)
        seen.append(runtime.describe_session(session))
        return session

    monkeypatch.setattr(cpu_kernels, "create_session", spy)
    cpu_kernels._timed(_probe(), {"x": np.ones((1, 2, 8), np.float32)}, runs=1)
    assert seen and not seen[0]["allow_spinning"] and seen[0]["intra_op_num_threads"] == 2


def _probe() -> bytes:
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, S, 8] x) => (float[B, S, 8] y) {
            y = Relu(x)
        }
        """
    )
    return proto.SerializeToString()
