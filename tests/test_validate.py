"""ortq.validate.validate end to end: provider rows, tasks, thresholds, data sources, session settings and
report files (metrics, placement, latency and the report have their own test modules)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ortq.errors import ConfigError, ValidationFailed
from ortq.validate import GenerativeOptions, Thresholds, normalize_provider, validate
from tests.validate_models import BATCH, make_lm_models, make_mlp_models, mlp, qdq

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TRT = "TensorrtExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def mlp_models(tmp_path_factory):
    return make_mlp_models(tmp_path_factory.mktemp("mlp"))


@pytest.fixture(scope="module")
def lm_models(tmp_path_factory):
    return make_lm_models(tmp_path_factory.mktemp("lm"))


def test_normalize_provider():
    assert normalize_provider("CPU") == "cpu"
    assert normalize_provider("trt") == "tensorrt"
    assert normalize_provider("CUDAExecutionProvider") == "cuda"
    with pytest.raises(ConfigError):
        normalize_provider("tpu")


# --------------------------------------------------------------------------------------------- validate


def test_validate_cpu_row_and_skipped_gpu_rows(mlp_models, tmp_path, monkeypatch):
    fp32, q, held = mlp_models
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    report = validate(q, fp32, held, providers=("cpu", "cuda", "tensorrt"), latency_runs=4, report_dir=tmp_path)
    rows = {p["name"]: p for p in report.providers}
    cpu = rows["cpu"]
    assert cpu["status"] == "ok"
    assert 0.99 < cpu["fidelity"]["cosine"] < 1.0
    assert cpu["fidelity"]["cosine_min"] <= cpu["fidelity"]["cosine"]
    assert cpu["fidelity"]["sqnr_db"] > 15
    assert cpu["fidelity"]["outputs"]["y"]["samples"] == 4 * BATCH
    lat = cpu["latency"]
    assert lat["runs"] == 4 and lat["batch_size"] == BATCH
    assert lat["ratio"] == pytest.approx(lat["quantized"]["median_ms"] / lat["reference"]["median_ms"])
    for name in ("cuda", "tensorrt"):
        assert rows[name]["status"] == "skipped"
        assert "not in this onnxruntime build" in rows[name]["reason"]
    assert report.ok and report.violations == []
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["settings"]["intra_op_num_threads"] == 2
    assert d["data"]["num_samples"] == 4 * BATCH
    assert d["host"]["onnxruntime"] == ort.__version__
    md = (tmp_path / "report.md").read_text()
    assert "| cuda | skipped:" in md and "| cpu | ok |" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_require_missing_provider_raises(mlp_models, monkeypatch):
    fp32, q, held = mlp_models
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ValidationFailed, match="required provider cuda is not available") as exc:
        validate(q, fp32, held, require=("cuda",))
    assert exc.value.exit_code == 1


def test_identical_models_are_perfect(mlp_models):
    fp32, _, held = mlp_models
    report = validate(fp32, fp32, held, latency_runs=2, placement=False, thresholds=Thresholds(min_cosine=1.0))
    fid = report.provider("cpu")["fidelity"]
    assert fid["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert fid["max_abs_error"] == 0.0
    assert fid["sqnr_db"] == math.inf
    assert report.ok
    json.loads(report.to_json())  # inf is written as a string, never as a bare Infinity


def test_thresholds_produce_violations(mlp_models):
    fp32, q, held = mlp_models
    report = validate(
        q,
        fp32,
        held,
        latency_runs=2,
        placement=False,
        thresholds=Thresholds(min_cosine=0.99999999, max_latency_ratio=1e-6, min_sqnr_db=200.0),
    )
    assert not report.ok
    text = "\n".join(report.violations)
    assert "cpu: cosine" in text and "--min-cosine" in text
    assert "--max-latency-ratio" in text
    assert "--min-sqnr" in text
    with pytest.raises(ValidationFailed):
        report.raise_for_violations()


def test_threshold_on_missing_metric_is_a_violation(mlp_models):
    fp32, q, held = mlp_models
    report = validate(q, fp32, held, latency_runs=0, placement=False, thresholds=Thresholds(min_task_agreement=0.9))
    assert report.provider("cpu")["task"] is None
    assert any("not available" in v for v in report.violations)


def test_classifier_argmax_agreement(tmp_path):
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((BATCH, 32)).astype(np.float32)} for _ in range(3)]
    fp32 = mlp(tmp_path / "fp32.onnx", out_name="logits", n_out=3)
    q = qdq(fp32, tmp_path / "q.onnx", feeds)
    report = validate(q, fp32, feeds, latency_runs=0, placement=False)
    task = report.provider("cpu")["task"]
    assert report.to_dict()["task"] == "text-classification"
    assert task["metric"] == "argmax_agreement" and task["samples"] == 3 * BATCH
    assert 0.5 <= task["agreement"] <= 1.0


def test_task_names_old_aliases_and_none(tmp_path):
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((BATCH, 32)).astype(np.float32)} for _ in range(2)]
    fp32 = mlp(tmp_path / "fp32.onnx", out_name="logits", n_out=3)
    alias = validate(fp32, fp32, feeds, task="classification", latency_runs=0, placement=False)
    assert alias.to_dict()["task"] == "text-classification"
    assert alias.provider("cpu")["task"]["agreement"] == 1.0
    none = validate(fp32, fp32, feeds, task="none", latency_runs=0, placement=False)
    assert none.to_dict()["task"] == "none" and none.provider("cpu")["task"] is None
    # A model whose output says nothing about the task is judged without a task metric.
    y = mlp(tmp_path / "y.onnx")
    plain = validate(y, y, feeds, latency_runs=0, placement=False)
    assert plain.to_dict()["task"] == "none"


def test_settings_are_read_back_from_the_sessions(mlp_models):
    fp32, q, held = mlp_models
    report = validate(q, fp32, held, latency_runs=0, placement=False, intra_op_num_threads=1)
    s = report.to_dict()["settings"]
    assert s["intra_op_num_threads"] == 1 and s["inter_op_num_threads"] == 1
    assert s["execution_mode"] == "ORT_SEQUENTIAL" and s["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert s["allow_spinning"] is False and "providers" not in s
    row = report.provider("cpu")
    assert row["session"]["providers"] == ["CPUExecutionProvider"] == row["session_providers"]
    assert row["session"]["intra_op_num_threads"] == 1
    assert "intra_op=1" in report.to_markdown()


def test_causal_lm_perplexity(lm_models):
    fp32, q, held = lm_models
    report = validate(q, fp32, held, latency_runs=0, placement=False, thresholds=Thresholds(max_perplexity_delta_pct=1e6))
    task = report.provider("cpu")["task"]
    assert report.to_dict()["task"] == "causal-lm"
    assert task["tokens"] == 3 * (3 * 11 + 7)  # 3 full rows + 1 row padded after 8 tokens, per batch
    assert task["perplexity_reference"] > 1
    expected = 100 * (task["perplexity_quantized"] - task["perplexity_reference"]) / task["perplexity_reference"]
    assert task["perplexity_delta_pct"] == pytest.approx(expected)
    assert report.ok
    # The padded positions of row 1 are left out of the fidelity figures.
    assert report.provider("cpu")["fidelity"]["outputs"]["logits"]["samples"] == 3 * 4


def test_synthetic_data_when_no_data_and_no_tokenizer(lm_models):
    fp32, q, _ = lm_models
    report = validate(q, fp32, None, num_samples=6, batch_size=4, latency_runs=0, placement=False)
    d = report.to_dict()["data"]
    assert d["source"].startswith("synthetic")
    assert d["num_samples"] == 6 and d["num_batches"] == 2


def test_bad_arguments(mlp_models):
    fp32, q, held = mlp_models
    with pytest.raises(ConfigError):
        validate(q, fp32, held, task="translation")
    with pytest.raises(ConfigError):
        validate(q, fp32, held, providers=("npu",))


# ------------------------------------------------------------------------------------------------ cuda


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDAExecutionProvider (pip install 'ortq[gpu]')")
def test_cuda_row_parity_and_placement(mlp_models, tmp_path):
    fp32, q, held = mlp_models
    report = validate(q, fp32, held, providers=("cpu", "cuda"), require=("cuda",), latency_runs=4, report_dir=tmp_path)
    row = report.provider("cuda")
    assert row["status"] == "ok", row.get("reason")
    assert row["fidelity"]["cosine"] > 0.99
    assert row["parity_vs_cpu"]["reference"]["cosine_min"] > 0.9999
    pq = row["placement"]["quantized"]
    assert pq["nodes_per_provider"].get("CUDAExecutionProvider", 0) > 0
    # The CUDA EP has no QLinearMatMul: QDQ groups run as DequantizeLinear -> float MatMul.
    assert "QLinearMatMul" not in pq["integer_kernels"]
    assert isinstance(report.to_dict()["host"]["gpus"], list)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRT, reason="onnxruntime has no TensorrtExecutionProvider")
def test_tensorrt_row(mlp_models):
    fp32, q, held = mlp_models
    report = validate(q, fp32, held, providers=("tensorrt",), latency_runs=2)
    row = report.provider("tensorrt")
    assert row["status"] in ("ok", "skipped")
    if row["status"] == "ok":
        assert row["fidelity"]["cosine"] > 0.99


# ------------------------------------------------------------------------------ exported transformer folders


def _qdq_folder(src_dir: Path, dst_dir: Path, n: int = 16) -> Path:
    """Quantize an exported folder with onnxruntime's quantize_static (the oracle), tokenizer files copied."""
    from ortq.data import load_batches, real_text
    from ortq.io import copy_side_files

    dst_dir.mkdir(parents=True, exist_ok=True)
    feeds = list(load_batches(real_text("calibration", n), model=src_dir / "model.onnx", batch_size=8))
    qdq(src_dir / "model.onnx", dst_dir / "model.onnx", feeds)
    copy_side_files(src_dir, dst_dir)
    return dst_dir


def test_exported_bert_folder_uses_heldout_text_and_embeddings(tiny_bert_dir, tmp_path):
    q = _qdq_folder(tiny_bert_dir, tmp_path / "q")
    report = validate(q, tiny_bert_dir, num_samples=16, batch_size=8, latency_runs=2, report_dir=tmp_path / "r")
    d = report.to_dict()
    assert d["task"] == "feature-extraction"
    assert d["data"]["source"].startswith("real held-out text")
    task = report.provider("cpu")["task"]
    assert task["metric"] == "top5_neighbour_agreement" and 0.0 <= task["agreement"] <= 1.0
    assert task["samples"] == 16
    pq = report.provider("cpu")["placement"]["quantized"]
    assert pq["qdq_groups"]["total"] > 0
    assert sum(pq["integer_kernels"].values()) == pq["qdq_groups"]["fused"]
    assert 0.0 < pq["flops"]["int8_fraction"] <= 1.0


def test_exported_llama_folder_is_a_causal_lm(tiny_llama_dir, tmp_path):
    q = _qdq_folder(tiny_llama_dir, tmp_path / "q", n=8)
    small = GenerativeOptions(num_passages=1, max_length=16, new_tokens=2)
    report = validate(q, tiny_llama_dir, num_samples=8, batch_size=4, latency_runs=0, placement=False,
                      generative=small)
    task = report.provider("cpu")["task"]
    assert report.to_dict()["task"] == "causal-lm"
    assert task["tokens"] > 0 and task["perplexity_reference"] > 1
    assert report.to_dict()["generative"]["status"] == "ok"


# ------------------------------------------------------------------------------------------- real MiniLM


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_minilm_report_cpu_rows_filled_gpu_rows_skipped(minilm_dir, tmp_path, kind):
    quantizer_mod = pytest.importorskip("ortq.quantizer")
    from ortq.config import AutoQuantizationConfig, WeightOnlyConfig
    from ortq.data import real_text

    quantizer = quantizer_mod.ORTQuantizer.from_pretrained(minilm_dir)
    if kind == "int8":
        q = quantizer.quantize(
            AutoQuantizationConfig.for_host(), tmp_path / "q", calibration_data=real_text("calibration", 64)
        )
    else:
        q = quantizer.quantize(WeightOnlyConfig(bits=4), tmp_path / "q")
    report = validate(Path(q).parent, minilm_dir, providers=("cpu", "cuda", "tensorrt"), report_dir=tmp_path / "r")
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert files == ["report.json", "report.md", "report.png"]
    cpu = report.provider("cpu")
    assert cpu["status"] == "ok" and cpu["fidelity"]["cosine"] > 0.9 and cpu["latency"]["ratio"] > 0
    kernels = cpu["placement"]["quantized"]["integer_kernels" if kind == "int8" else "nbits_kernels"]
    assert sum(kernels.values()) > 0
    for name in ("cuda", "tensorrt"):
        row = report.provider(name)
        if not (HAS_CUDA if name == "cuda" else HAS_TRT):
            assert row["status"] == "skipped" and row["reason"]


def test_one_session_at_a_time_gives_the_same_figures(lm_models, monkeypatch):
    """Models over the size limit are validated with one session alive at a time: same fidelity and task
    figures, latency timed one model after the other."""
    import ortq.validate as v
    from ortq.validate import sequential

    fp32, q, held = lm_models
    kwargs = {"latency_runs": 2, "warmup_runs": 1, "placement": False, "thresholds": Thresholds(max_perplexity_delta_pct=1e6)}
    both = validate(q, fp32, held, one_session_at_a_time=False, **kwargs).to_dict()
    opened = []
    real = sequential.create_session

    def counted(path, **kw):
        assert not [s for s in opened if s() is not None], "a second session opened while one is alive"
        sess = real(path, **kw)
        import weakref

        opened.append(weakref.ref(sess))
        return sess

    monkeypatch.setattr(sequential, "create_session", counted)
    monkeypatch.setattr(v, "ONE_SESSION_BYTES", 1)  # the automatic choice: every model is "large"
    one = validate(q, fp32, held, **kwargs).to_dict()
    assert len(opened) == 2
    a, b = both["providers"][0], one["providers"][0]
    assert a["fidelity"] == b["fidelity"] and a["task"] == b["task"]
    assert b["latency"]["reference"]["median_ms"] > 0 and b["latency"]["ratio"] > 0
    assert one["settings"]["latency_order"].startswith("one model after the other")
    # one at a time, the sessions hand back what a run allocated (no arena, no per-shape plan); the rest is alike
    memory = ("latency_order", "enable_mem_pattern", "enable_cpu_mem_arena")
    assert one["settings"]["enable_mem_pattern"] is False
    assert {k: v for k, v in one["settings"].items() if k not in memory} == \
        {k: v for k, v in both["settings"].items() if k not in memory}
