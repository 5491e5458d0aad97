"""ortq.validate: metrics with known answers, provider handling, thresholds, placement, report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortq.errors import ConfigError, ValidationFailed
from ortq.validate import (
    Thresholds,
    argmax_agreement,
    cosine_similarity,
    infer_task,
    inspect_placement,
    max_abs_error,
    next_token_nll,
    normalize_provider,
    sqnr_db,
    topk_neighbour_agreement,
    validate,
)

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TRT = "TensorrtExecutionProvider" in ort.get_available_providers()
BATCH = 8


# ------------------------------------------------------------------------------------------ tiny models


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _mlp(path: Path, *, out_name: str = "y", n_out: int = 16, seed: int = 0) -> Path:
    """x[b, 32] -> MatMul(32x64) -> Add -> Relu -> MatMul(64 x n_out) -> out_name."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((32, 64)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((64, n_out)) * 0.2).astype(np.float32)
    b1 = (rng.standard_normal(64) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "B1"], ["h2"], name="add1"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "W2"], [out_name], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b1, "B1")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def _lm(path: Path, vocab: int = 50, dim: int = 16, seed: int = 0) -> Path:
    """input_ids[b, s] -> Gather(emb) -> MatMul(dim x vocab) -> logits[b, s, vocab]."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((vocab, dim)).astype(np.float32)
    w = (rng.standard_normal((dim, vocab)) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "W"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "lm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "W")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def _qdq(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
    )
    onnx.checker.check_model(onnx.load(str(dst)))
    return dst


def _weight_only_dq(src: Path, dst: Path) -> Path:
    """Only the weight of mm1 goes through an int8 DequantizeLinear; the activation stays float."""
    m = onnx.load(str(src))
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W1"))
    scale = np.float32(np.abs(w).max() / 127)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "W1"))
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(q, "W1_q"),
            numpy_helper.from_array(np.array(scale, np.float32), "W1_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "W1_zp"),
        ]
    )
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["W1_q", "W1_scale", "W1_zp"], ["W1"], name="W1_dq"))
    return _save(m, dst)


@pytest.fixture(scope="module")
def mlp_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp")
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((BATCH, 32)).astype(np.float32)} for _ in range(4)]
    held = [{"x": rng.standard_normal((BATCH, 32)).astype(np.float32)} for _ in range(4)]
    fp32 = _mlp(d / "fp32.onnx")
    q = _qdq(fp32, d / "qdq.onnx", calib)
    return fp32, q, held


@pytest.fixture(scope="module")
def lm_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    rng = np.random.default_rng(2)

    def batch():
        ids = rng.integers(0, 50, size=(4, 12)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, 8:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    fp32 = _lm(d / "fp32.onnx")
    q = _qdq(fp32, d / "qdq.onnx", [batch() for _ in range(3)])
    return fp32, q, [batch() for _ in range(3)]


# --------------------------------------------------------------------------------------- known answers


def test_cosine_known_answers():
    a = np.array([1.0, 2.0, 3.0], np.float32)
    assert cosine_similarity(a, a) == pytest.approx(1.0, abs=1e-12)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert cosine_similarity([1.0, 0.0], [0.0, 1.0]) == 0.0
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine_similarity(np.zeros(3), a) == 0.0
    with pytest.raises(ValueError):
        cosine_similarity(a, a[:2])


def test_sqnr_known_noise():
    ref = np.ones(1000, np.float32)
    assert sqnr_db(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-4)  # signal 1000, noise 1000 * 0.01
    assert sqnr_db(ref, ref + 0.01) == pytest.approx(40.0, abs=1e-3)
    assert sqnr_db(ref, ref) == math.inf
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    noise = rng.standard_normal(200_000) * 0.1
    assert sqnr_db(x, x + noise) == pytest.approx(20.0, abs=0.1)


def test_max_abs_error_and_argmax():
    assert max_abs_error([1.0, 2.0, 3.0], [1.0, 2.5, 2.0]) == 1.0
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    test = np.array([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9], [0.9, 0.1]])
    assert argmax_agreement(ref, test) == 0.75


def test_topk_neighbour_agreement():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((20, 8))
    assert topk_neighbour_agreement(e, e, k=5) == 1.0
    assert topk_neighbour_agreement(e, e * 3.0, k=5) == 1.0  # cosine neighbours ignore scale
    # Four points on a line-ish layout: swapping two points changes exactly known neighbour sets.
    ref = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    test = ref[[0, 2, 1, 3]]  # rows 1 and 2 swapped embeddings
    # k=1: ref neighbours 0->1, 1->0, 2->3, 3->2; test: 0->2?, compute expected by hand below.
    agreement = topk_neighbour_agreement(ref, test, k=1)
    # test rows: 0=[1,0], 1=[0,1], 2=[.9,.1], 3=[.1,.9] -> neighbours 0->2, 1->3, 2->0, 3->1: none kept.
    assert agreement == 0.0
    assert topk_neighbour_agreement(ref[:1], ref[:1], k=5) == 1.0  # a single row has no neighbours


def test_next_token_nll_uniform_logits_give_vocab_perplexity():
    vocab = 7
    ids = np.array([[1, 2, 3, 4], [5, 6, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int64)
    logits = np.zeros((2, 4, vocab), np.float32)
    total, count = next_token_nll(logits, ids, mask)
    assert count == 3 + 1
    assert math.exp(total / count) == pytest.approx(vocab, rel=1e-9)


def test_infer_task():
    assert infer_task(["last_hidden_state"], [(2, 5, 8)], ["input_ids", "attention_mask"]) == (
        "embeddings",
        "last_hidden_state",
    )
    assert infer_task(["logits"], [(2, 3)], ["input_ids"]) == ("classification", "logits")
    assert infer_task(["logits"], [(2, 5, 100)], ["input_ids", "attention_mask"]) == ("causal-lm", "logits")
    assert infer_task(["sentence_embedding"], [(2, 8)], ["input_ids"]) == ("embeddings", "sentence_embedding")
    assert infer_task(["y"], [(2, 16)], ["x"]) == ("none", None)


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
    fp32 = _mlp(tmp_path / "fp32.onnx", out_name="logits", n_out=3)
    q = _qdq(fp32, tmp_path / "q.onnx", feeds)
    report = validate(q, fp32, feeds, latency_runs=0, placement=False)
    task = report.provider("cpu")["task"]
    assert report.to_dict()["task"] == "classification"
    assert task["metric"] == "argmax_agreement" and task["samples"] == 3 * BATCH
    assert 0.5 <= task["agreement"] <= 1.0


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


# -------------------------------------------------------------------------------------------- placement


def test_placement_detects_integer_kernels(mlp_models):
    fp32, q, held = mlp_models
    pq = inspect_placement(q, "cpu", held[0])
    assert pq.integer_kernels.get("QLinearMatMul") == 2
    assert pq.integer_node_names >= {"mm1", "mm2"}
    assert sorted(pq.fused_qdq_groups) == ["mm1", "mm2"] and pq.unfused_qdq_groups == []
    assert pq.nodes_per_provider == {"CPUExecutionProvider": len(pq.nodes)}
    expected = 2 * BATCH * (32 * 64 + 64 * 16)
    assert pq.flops["total"] == expected and pq.flops["int8"] == expected
    assert pq.flops["int8_fraction"] == 1.0
    assert pq.optimized_model_saved
    pf = inspect_placement(fp32, "cpu", held[0])
    assert pf.integer_kernels == {} and pf.flops["int8_fraction"] == 0.0
    assert pf.flops["total"] == expected
    d = pq.to_dict()
    assert d["qdq_groups"] == {"total": 2, "fused": 2, "unfused": []}
    json.dumps(d)


def test_placement_reports_unfused_qdq_group(mlp_models, tmp_path):
    fp32, _, held = mlp_models
    wq = _weight_only_dq(fp32, tmp_path / "wdq.onnx")
    p = inspect_placement(wq, "cpu", held[0])
    assert p.qdq_groups == ["mm1"]
    assert p.unfused_qdq_groups == ["mm1"]
    assert p.integer_kernels == {}
    assert p.flops["int8_fraction"] == 0.0


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
    _qdq(src_dir / "model.onnx", dst_dir / "model.onnx", feeds)
    copy_side_files(src_dir, dst_dir)
    return dst_dir


def test_exported_bert_folder_uses_heldout_text_and_embeddings(tiny_bert_dir, tmp_path):
    q = _qdq_folder(tiny_bert_dir, tmp_path / "q")
    report = validate(q, tiny_bert_dir, num_samples=16, batch_size=8, latency_runs=2, report_dir=tmp_path / "r")
    d = report.to_dict()
    assert d["task"] == "embeddings"
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
    report = validate(q, tiny_llama_dir, num_samples=8, batch_size=4, latency_runs=0, placement=False)
    task = report.provider("cpu")["task"]
    assert report.to_dict()["task"] == "causal-lm"
    assert task["tokens"] > 0 and task["perplexity_reference"] > 1


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
