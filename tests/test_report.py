"""ortq.validate.report: thresholds, violations, atomic JSON/Markdown/PNG files, matplotlib optional."""

from __future__ import annotations

import json
import math
import sys

import pytest

from ortq.errors import ConfigError, ValidationFailed
from ortq.validate.report import Thresholds, ValidationReport, render_markdown


def _row(name="cpu", cosine=0.995, sqnr=25.0, ratio=0.8, agreement=0.9, ppl=None):
    task = {"task": "feature-extraction", "metric": "top5_neighbour_agreement", "agreement": agreement, "output": "h"}
    if ppl is not None:
        task["perplexity_delta_pct"] = ppl
    return {
        "name": name,
        "execution_provider": "CPUExecutionProvider",
        "status": "ok",
        "reason": None,
        "fidelity": {
            "primary_output": "h",
            "cosine": cosine,
            "cosine_min": cosine - 0.01,
            "max_abs_error": 0.3,
            "sqnr_db": sqnr,
            "outputs": {"h": {"cosine_mean": cosine, "cosine_min": cosine - 0.01, "max_abs_error": 0.3,
                              "mean_abs_error": 0.01, "sqnr_db": sqnr, "sqnr_db_min": sqnr - 3, "samples": 8}},
        },
        "task": task,
        "latency": {
            "batch_size": 8, "warmup_runs": 3, "runs": 10, "ratio": ratio, "speedup": 1 / ratio,
            "pairwise_ratio_median": ratio,
            "reference": {"first_run_ms": 20.0, "warmup_ms": 12.0, "median_ms": 10.0, "p90_ms": 11.0,
                          "min_ms": 9.5, "mean_ms": 10.2, "throughput_per_s": 800.0},
            "quantized": {"first_run_ms": 15.0, "warmup_ms": 9.0, "median_ms": 10.0 * ratio, "p90_ms": 9.0,
                          "min_ms": 7.5, "mean_ms": 8.2, "throughput_per_s": 1000.0},
        },
    }


def _data(rows, thresholds=None):
    return {
        "schema": "ortq.validation-report",
        "schema_version": 1,
        "models": {"quantized": {"path": "q/model.onnx", "size_bytes": 25}, "reference": {"path": "f/model.onnx", "size_bytes": 90}},
        "data": {"source": "test", "num_samples": 8, "batch_size": 8, "num_batches": 1},
        "task": "feature-extraction",
        "settings": {"intra_op_num_threads": 2, "inter_op_num_threads": 1, "warmup_runs": 3, "latency_runs": 10},
        "providers": rows,
        "thresholds": (thresholds or Thresholds()).to_dict(),
    }


SKIPPED = {"name": "cuda", "execution_provider": "CUDAExecutionProvider", "status": "skipped", "reason": "no GPU"}


def test_threshold_validation():
    with pytest.raises(ConfigError):
        Thresholds(min_cosine=1.5)
    with pytest.raises(ConfigError):
        Thresholds(max_latency_ratio=0)
    with pytest.raises(ConfigError):
        Thresholds(min_sqnr_db="20")
    with pytest.raises(ConfigError):
        Thresholds.from_dict({"min_cosin": 0.9})
    t = Thresholds(min_cosine=0.99, max_latency_ratio=1.0)
    assert Thresholds.from_dict(t.to_dict()) == t
    assert t.active and not Thresholds().active


def test_violations_name_provider_figure_and_limit():
    t = Thresholds(min_cosine=0.999, min_sqnr_db=30, max_latency_ratio=0.5, min_task_agreement=0.95,
                   max_perplexity_delta_pct=1.0, max_abs_error=0.1)
    report = ValidationReport(_data([_row(ppl=2.5), SKIPPED], t))
    v = report.violations
    assert not report.ok
    assert "cpu: cosine 0.99500 < --min-cosine 0.999" in v
    assert "cpu: SQNR 25.00 dB < --min-sqnr 30 dB" in v
    assert any(s.startswith("cpu: latency ratio") and "> --max-latency-ratio 0.5" in s for s in v)
    assert any("--min-task-agreement" in s for s in v)
    assert any("perplexity delta 2.50% > --max-perplexity-delta 1.0%" in s for s in v)
    assert any("max abs error 0.3 > --max-abs-error 0.1" in s for s in v)
    assert not any(s.startswith("cuda") for s in v)  # skipped rows are not checked
    with pytest.raises(ValidationFailed) as exc:
        report.raise_for_violations()
    assert exc.value.exit_code == 1


def test_passing_thresholds_and_no_provider_ran():
    assert ValidationReport(_data([_row()], Thresholds(min_cosine=0.99, max_latency_ratio=1.0))).ok
    r = ValidationReport(_data([SKIPPED], Thresholds(min_cosine=0.99)))
    assert r.violations == ["no requested provider ran, so nothing was validated (cuda: no GPU)"]
    # Nothing asked is no excuse: a validation that ran nowhere does not pass.
    bare = ValidationReport(_data([SKIPPED]))
    assert not bare.ok and "FAIL" in bare.to_markdown() and "PASS" not in bare.to_markdown()


def test_a_different_model_fails_the_sanity_floor_by_default():
    row = _row()
    row["fidelity"]["cosine"] = -0.03
    report = ValidationReport(_data([row]))
    assert not report.ok
    assert report.violations[0].startswith("cpu: cosine -0.0300 is below the sanity floor 0.9")
    assert ValidationReport(_data([row], Thresholds(cosine_floor=None))).ok


def test_a_quantized_model_without_integer_kernels_is_flagged():
    row = _row()
    row["placement"] = {"quantized": {"integer_kernels": {}, "nbits_kernels": {}, "flops": {"int8_fraction": 0.0}}}
    data = _data([row])
    data["models"] = {"quantized": {"op_types": {"QuantizeLinear": 4, "DequantizeLinear": 8, "Conv": 2}}}
    report = ValidationReport(data)
    assert report.ok  # a warning, not a violation
    assert report.warnings == [
        "cpu: the quantized model runs no integer or low-bit kernel: every quantized node is emulated in float "
        "(QuantizeLinear/DequantizeLinear around float ops), so it is not int8 here"
    ]
    assert "**WARNING**" in report.to_markdown()
    row["placement"]["quantized"]["integer_kernels"] = {"QLinearConv": 2}
    assert ValidationReport(_data([row]) | {"models": data["models"]}).warnings == []


def test_save_writes_three_files_atomically(tmp_path):
    row = _row()
    row["fidelity"]["outputs"]["h"]["sqnr_db"] = math.inf
    report = ValidationReport(_data([row, SKIPPED], Thresholds(min_cosine=0.9)))
    paths = report.save(tmp_path / "rep")
    out = tmp_path / "rep"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "report.png"]
    d = json.loads((out / "report.json").read_text())  # strict JSON: no NaN / Infinity tokens
    assert d["ok"] is True and d["violations"] == []
    assert d["providers"][0]["fidelity"]["outputs"]["h"]["sqnr_db"] == "inf"
    assert d["artifacts"]["png"] == "report.png"
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert paths["png"].endswith("report.png")
    loaded = ValidationReport.load(out)
    assert loaded.provider("cpu")["fidelity"]["outputs"]["h"]["sqnr_db"] == math.inf
    assert loaded.to_markdown() == (out / "report.md").read_text()


def test_markdown_rows():
    md = render_markdown(ValidationReport(_data([_row(), SKIPPED])).to_dict())
    assert md.startswith("# ortq validation report")
    assert "**PASS**" in md
    assert "| cpu | ok | 0.99500 / 0.98500 |" in md
    assert "| cuda | skipped: no GPU |" in md
    assert "0.800" in md  # latency ratio


def test_png_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = ValidationReport(_data([_row()]))
    paths = report.save(tmp_path)
    assert paths["png"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    d = json.loads((tmp_path / "report.json").read_text())
    assert d["artifacts"]["png"] is None and "matplotlib" in d["artifacts"]["png_skipped_reason"]
    assert "report.png skipped" in (tmp_path / "report.md").read_text()


def test_picture_headline_says_the_verdict_in_words():
    from ortq.validate.picture import headline, render_png

    data = _data([_row()])
    data["models"] = {"quantized": {"size_bytes": 25e6}, "reference": {"size_bytes": 90e6}}
    report = ValidationReport(data)
    line = headline(report.to_dict())
    assert line.startswith("PASS — cpu: cosine 0.9950 (worst")
    assert "3.6x smaller" in line
    png = render_png(report.to_dict())
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert headline(ValidationReport(_data([SKIPPED])).to_dict()) == "FAIL — no provider ran"
