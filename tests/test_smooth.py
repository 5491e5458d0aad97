import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ortq.calibrators.activations import channel_absmax
from ortq.passes.smooth import SmoothQuantPass, apply_smoothing, smooth_groups, smoothing_scales

PRE_LN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 4] y, float[N, 4] z) {
    h = LayerNormalization<axis = -1>(x, gamma, beta)
    y = MatMul(h, w1)
    z = MatMul(h, w2)
}
"""

POST_LN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 8] y) {
    h = LayerNormalization<axis = -1>(x, gamma, beta)
    p = MatMul(h, w1)
    y = Add(h, p)
}
"""


def _model(text, weights):
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    return proto


def _run(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _weights(rng, out_dim):
    return {
        "gamma": rng.normal(size=8).astype(np.float32) * np.array([1, 1, 20, 1, 1, 1, 1, 5], np.float32),
        "beta": rng.normal(size=8).astype(np.float32),
        "w1": rng.normal(size=(8, out_dim)).astype(np.float32),
        "w2": rng.normal(size=(8, 4)).astype(np.float32),
    }


def test_scales_known_answer():
    s = smoothing_scales(np.array([4.0, 1.0]), [np.array([[1.0, -1.0], [0.25, 0.0]])], alpha=0.5)
    np.testing.assert_allclose(s, [2.0, 2.0], rtol=1e-6)


def test_fold_into_layernorm_preserves_outputs(tmp_path):
    rng = np.random.default_rng(0)
    proto = _model(PRE_LN, _weights(rng, 4))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    model = ir.from_proto(proto)
    groups = smooth_groups(model)
    assert len(groups) == 1 and groups[0].folded_into is not None and len(groups[0].matmuls) == 2
    absmax = channel_absmax(ir.load(path), ["h"], [{"x": x}]).absmax
    np.testing.assert_allclose(absmax["h"], np.abs(_ln(x, proto)).max(axis=0), rtol=1e-5)
    summary = apply_smoothing(model, groups, absmax, alpha=0.5)
    assert summary["h"]["folded"]
    smoothed = ir.to_proto(model)
    onnx.checker.check_model(smoothed)
    assert [n.op_type for n in smoothed.graph.node] == ["LayerNormalization", "MatMul", "MatMul"]
    for a, b in zip(_run(proto, x), _run(smoothed, x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_post_ln_inserts_a_mul_and_keeps_the_residual(tmp_path):
    rng = np.random.default_rng(1)
    proto = _model(POST_LN, {k: v for k, v in _weights(rng, 8).items() if k != "w2"})
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x = rng.normal(size=(16, 8)).astype(np.float32)
    model = ir.from_proto(proto)
    groups = smooth_groups(model)
    assert groups[0].folded_into is None
    apply_smoothing(model, groups, channel_absmax(ir.load(path), ["h"], [{"x": x}]).absmax, alpha=0.8)
    smoothed = ir.to_proto(model)
    onnx.checker.check_model(smoothed)
    assert "Mul" in [n.op_type for n in smoothed.graph.node]
    np.testing.assert_allclose(_run(proto, x)[0], _run(smoothed, x)[0], rtol=1e-4, atol=1e-4)


def _ln(x, proto):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * inits["gamma"] + inits["beta"]


def test_alpha_search_prefers_smoothing_for_outlier_channels():
    from ortq.passes.smooth import search_alpha

    rng = np.random.default_rng(3)
    rows = rng.normal(size=(256, 16)).astype(np.float32)
    rows[:, 3] *= 60.0  # one outlier channel, as in transformer LayerNorm outputs
    w = rng.normal(size=(16, 8)).astype(np.float32)
    best, errors = search_alpha(rows, [w], np.abs(rows).max(axis=0))
    assert best is not None and errors[f"{best:.2f}"] < 0.5 * errors["none"]
    flat = rng.normal(size=(256, 16)).astype(np.float32)
    _, errors = search_alpha(flat, [w], np.abs(flat).max(axis=0))
    assert min(errors.values()) <= errors["none"]


def test_smoothquant_pass_from_calibration_statistics(tmp_path):
    rng = np.random.default_rng(4)
    proto = _model(PRE_LN, _weights(rng, 4))
    x = rng.normal(size=(64, 8)).astype(np.float32)
    stats = channel_absmax(ir.from_proto(proto), ["h"], [{"x": x}], sample_rows=32)
    assert stats.rows["h"].shape == (32, 8)
    model = ir.from_proto(proto)
    smooth = SmoothQuantPass("auto", stats.absmax, stats.rows)
    smooth(model)
    assert smooth.report_key == "smooth_quant" and smooth.report["alpha"] == "auto"
    assert "relative_error_unsmoothed" in smooth.report["activations"]["h"]
    smoothed = ir.to_proto(model)
    for a, b in zip(_run(proto, x), _run(smoothed, x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
