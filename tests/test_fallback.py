"""Accuracy-budget fallback on a tiny graph whose first MatMul has a deliberately bad activation range."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ortq.calibrators.base import TensorRange
from ortq.config import QuantizationConfig
from ortq.errors import ConfigError
from ortq.fallback import _growing_sizes, budget_reason, search_fallback

GRAPH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 8] x) => (float[N, 4] y) <float[8, 16] w1, float[16, 16] w2, float[16, 4] w3> {
  h = MatMul(x, w1)
  r = Relu(h)
  h2 = MatMul(r, w2)
  r2 = Relu(h2)
  y = MatMul(r2, w3)
}
"""


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    m = onnx.parser.parse_model(GRAPH)
    for name, shape in (("w1", (8, 16)), ("w2", (16, 16)), ("w3", (16, 4))):
        m.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(m, full_check=True)
    # x ~ N(0, 1) but calibrated to +-100: its int8 step is 0.8, so MatMul_0 is by far the worst node.
    ranges = {"x": TensorRange(-100.0, 100.0, 10), "r": TensorRange(0.0, 12.0, 10), "r2": TensorRange(0.0, 40.0, 10)}
    batches = [{"x": rng.standard_normal((8, 8)).astype(np.float32)} for _ in range(2)]
    return m, ranges, batches


def _fallback(setup, **kwargs):
    m, ranges, batches = setup
    kwargs.setdefault("latency_runs", 2)
    return search_fallback(m, QuantizationConfig(), ranges, batches, **kwargs)


def test_keeps_the_bad_node_in_float(setup):
    res = _fallback(setup, max_cosine_drop=0.01)
    assert res.met and res.kept_float == ("MatMul_0",)
    base = res.candidates[0]
    assert base.kept_float == () and base.cosine_drop > 0.01 and not base.meets_budget
    assert res.chosen.cosine_drop <= 0.01 and res.chosen.latency_ratio is not None
    assert res.ranking[0] == "MatMul_0"
    reasons = {d.name: d.reason for d in res.plan.decisions}
    assert reasons["MatMul_0"] == budget_reason(0.01) == "kept in float by the accuracy budget (cosine drop 0.01)"
    assert set(res.plan.quantized_nodes) == {"MatMul_2", "MatMul_4"}
    proto = ir.to_proto(res.model)
    onnx.checker.check_model(proto, full_check=True)
    # The simulation agrees with the real model it predicted.
    sim = res.simulated[-1]
    assert sim["num_kept_float"] == 1
    assert sim["cosine_drop"] == pytest.approx(res.chosen.cosine_drop, abs=1e-4)
    d = res.to_dict()
    assert d["met"] and d["kept_float"] == ["MatMul_0"] and d["num_evaluations"] == len(res.candidates)


def test_budget_already_met_keeps_everything_int8(setup):
    res = _fallback(setup, max_cosine_drop=0.5)
    assert res.met and res.kept_float == () and len(res.candidates) == 1
    assert not any("budget" in d.reason for d in res.plan.decisions)


def test_user_metric(setup, tmp_path):
    calls = []

    def eval_fn(path):
        """1.0 when the first MatMul runs in float, else 0.0."""
        proto = onnx.load(path)
        calls.append(path)
        dq_outputs = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        first = next(n for n in proto.graph.node if n.op_type == "MatMul")
        return 0.0 if dq_outputs & set(first.input) else 1.0

    res = _fallback(setup, eval_fn=eval_fn, min_metric=0.5, latency_runs=0)
    assert res.met and res.kept_float == ("MatMul_0",)
    assert res.chosen.metric == 1.0 and res.candidates[0].metric == 0.0
    assert all(p.name == "model.onnx" for p in calls)
    assert "metric >= 0.5" in {d.name: d.reason for d in res.plan.decisions}["MatMul_0"]
    # max_metric_drop scores the fp32 model first.
    res = _fallback(setup, eval_fn=eval_fn, max_metric_drop=0.1, latency_runs=0)
    assert res.reference_metric == 1.0 and res.kept_float == ("MatMul_0",)


def test_unmet_budget_returns_the_most_accurate_candidate(setup):
    res = _fallback(setup, max_cosine_drop=0.0, max_evaluations=1, latency_runs=0)
    assert not res.met and len(res.candidates) == 1
    assert res.chosen.cosine_drop == min(c.cosine_drop for c in res.candidates)
    assert any("no candidate" in n for n in res.notes)


def test_growing_sizes():
    assert _growing_sizes(1, 10) == [1, 2, 4, 8, 10]
    assert _growing_sizes(3, 3) == [3]
    assert _growing_sizes(5, 40) == [5, 6, 8, 12, 20, 36, 40]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_cosine_drop": 1.5},
        {"eval_fn": lambda p: 1.0},
        {"max_cosine_drop": 0.1, "min_metric": 0.5},
        {"max_cosine_drop": 0.1, "max_evaluations": 0},
    ],
)
def test_bad_arguments(setup, kwargs):
    with pytest.raises(ConfigError):
        _fallback(setup, **kwargs)


def test_quantize_with_budget_writes_reports(tiny_bert_dir, tmp_path):
    import json

    from ortq import AutoCalibrationConfig, AutoQuantizationConfig
    from ortq.data import real_text
    from ortq.quantizer import ORTQuantizer

    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    path = q.quantize(
        AutoQuantizationConfig.avx2(),
        tmp_path / "int8",
        calibration_data=real_text("calibration", 32),
        calibration_config=AutoCalibrationConfig.minmax(batch_size=8),
        max_cosine_drop=0.5,
        error_report=True,
        report_data=real_text("heldout", 8),
        budget_options={"latency_runs": 0},
    )
    out = path.parent
    assert {"layer_report.json", "layer_report.md", "quantization_report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "quantization_report.json").read_text())
    assert report == q.last_report
    budget = report["accuracy_budget"]
    assert budget["calibration_samples"] == 24 and budget["budget"]["samples"] == 8
    reasons = {n["name"]: n["reason"] for n in report["plan"]["nodes"]}
    assert all(reasons[n].startswith("kept in float by the accuracy budget") for n in budget["kept_float"])
    assert report["layer_report"]["data"] == "report data"
    onnx.checker.check_model(onnx.load(path), full_check=True)
    with pytest.raises(ConfigError, match="every node in float"):
        q.quantize(
            AutoQuantizationConfig.avx2(), tmp_path / "none", calibration_data=real_text("calibration", 32),
            calibration_config=AutoCalibrationConfig.minmax(batch_size=8), max_cosine_drop=0.0,
            budget_options={"latency_runs": 0},
        )
    assert not (tmp_path / "none").exists()


def test_budget_keeps_the_users_error_report_choice(tiny_bert_dir, tmp_path):
    from ortq import AutoCalibrationConfig, AutoQuantizationConfig
    from ortq.data import real_text
    from ortq.quantizer import ORTQuantizer

    q = ORTQuantizer.from_pretrained(tiny_bert_dir)
    path = q.quantize(
        AutoQuantizationConfig.avx2(), tmp_path / "int8", calibration_data=real_text("calibration", 16),
        calibration_config=AutoCalibrationConfig.minmax(batch_size=8), max_cosine_drop=0.5,
        error_report=False, budget_options={"latency_runs": 0},
    )
    names = {p.name for p in path.parent.iterdir()}
    assert "quantization_report.json" in names and "layer_report.json" not in names
    assert "layer_report" not in q.last_report and "accuracy_budget" in q.last_report
