"""The whole pipeline: ``ortq run`` on the tiny recipe, the deploy example, and (slow) the real MiniLM."""

import subprocess
import sys
from pathlib import Path

import pytest

from ortq.pipeline import run_recipe

ROOT = Path(__file__).resolve().parents[1]


def _cpu(row):
    return next(p for p in row.report["providers"] if p["name"] == "cpu")


def test_run_tiny_recipe_table(tmp_path):
    result = run_recipe("tiny-bert", work_dir=tmp_path / "run", num_samples=32, num_heldout=32)
    names = [r.name for r in result.rows]
    assert names[0].startswith("int8") and "W4A8" in names[1] and "MatMulNBits" in names[2]
    table = result.table()
    assert "| fp32 |" in table and "speedup" in table
    for row in result.rows:
        assert _cpu(row)["status"] == "ok"
        assert (row.path.parent / "report" / "report.json").exists()
    assert result.to_dict()["rows"][0]["size_mb"] < result.to_dict()["fp32_size_mb"]


def _deploy(tmp_path, source, min_cosine):
    cmd = [sys.executable, str(ROOT / "examples" / "deploy.py"), str(source), "--work-dir", str(tmp_path / "d"),
           "--calibration-samples", "32", "--num-samples", "16", "--min-cosine", str(min_cosine)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_deploy_example_fails_above_what_the_model_reaches(tmp_path, tiny_bert_src):
    ok = _deploy(tmp_path / "a", tiny_bert_src, 0.9)
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = _deploy(tmp_path / "b", tiny_bert_src, 0.999999)
    assert refused.returncode == 1, refused.stderr[-2000:]


@pytest.mark.slow
def test_minilm_end_to_end(tmp_path):
    result = run_recipe("minilm", work_dir=tmp_path / "run", num_samples=256, num_heldout=128)
    int8, w4a8, int4 = result.rows
    assert _cpu(int8)["task"]["embedding_cosine_mean"] >= 0.99
    assert _cpu(w4a8)["task"]["embedding_cosine_mean"] >= 0.985
    assert _cpu(int4)["task"]["embedding_cosine_mean"] >= 0.985
    assert int8.size_mb < 30 and w4a8.size_mb <= 20 and int4.size_mb <= 20
    assert result.export_max_abs_diff < 1e-4


def test_run_without_work_dir_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = run_recipe("tiny-bert", num_samples=16, num_heldout=16, with_int4=False)
    assert list(tmp_path.iterdir()) == [], "the temporary work folder is removed"
    assert result.kept is False and result.to_dict()["work_dir"] is None
    assert "outputs removed with their temporary folder (pass --work-dir DIR to keep them)" in result.table()
    assert result.fp32_size_mb > result.rows[0].size_mb > 0
