"""ortq.validate.compare: sessions per provider, the outputs and task chosen, and batch-by-batch figures."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from ortq.errors import ModelError, ValidationFailed
from ortq.runtime import SessionSettings, create_session
from ortq.validate.compare import SessionPair, choose_outputs, compare, open_sessions, session_settings
from ortq.validate.inputs import load_model_file
from tests.validate_models import BATCH, make_mlp_models, mlp

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def mlp_models(tmp_path_factory):
    return make_mlp_models(tmp_path_factory.mktemp("mlp"))


def _pair(fp32, q) -> SessionPair:
    settings = SessionSettings(threads=1)
    return SessionPair(create_session(fp32, settings=settings), create_session(q, settings=settings))


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_open_sessions_rows_and_required(mlp_models, tmp_path, monkeypatch):
    fp32, q, _ = mlp_models
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    ref, quant = load_model_file(fp32), load_model_file(q)
    availability = {"cpu": (True, None), "cuda": (False, "not here")}
    rows, sessions = open_sessions(
        ["cpu", "cuda"], availability, set(), ref, quant, settings=SessionSettings(threads=1), cache_dir=str(tmp_path)
    )
    assert list(sessions) == ["cpu"] and rows["cuda"] == {
        "name": "cuda", "execution_provider": "CUDAExecutionProvider", "status": "skipped", "reason": "not here",
    }
    assert rows["cpu"]["session"]["intra_op_num_threads"] == 1
    assert session_settings(sessions)["allow_spinning"] is False and session_settings({}) == {}
    if HAS_CUDA:
        return
    # A provider listed by the build whose session falls back to the CPU is a failure when required.
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ValidationFailed, match="required provider cuda cannot run"):
        open_sessions(["cuda"], {"cuda": (True, None)}, {"cuda"}, ref, quant, settings=SessionSettings(threads=1),
                      cache_dir=str(tmp_path))


def test_choose_outputs(mlp_models, tmp_path):
    fp32, q, held = mlp_models
    sessions = {"cpu": _pair(fp32, q)}
    auto = choose_outputs(sessions, held[0], None)
    assert (auto.task, auto.task_output, auto.names, auto.primary) == ("none", None, ["y"], "y")
    forced = choose_outputs(sessions, held[0], "text-classification")
    assert (forced.task, forced.task_output) == ("text-classification", "y")  # judged on the first output
    assert choose_outputs(sessions, held[0], "none").task_output is None
    assert choose_outputs({}, held[0], None).names == []
    other = mlp(tmp_path / "other.onnx", out_name="z")
    with pytest.raises(ModelError, match="share no float output"):
        choose_outputs({"cpu": _pair(fp32, other)}, held[0], None)


def test_compare_accumulates_every_batch(mlp_models):
    fp32, q, held = mlp_models
    sessions = {"cpu": _pair(fp32, q)}
    outputs = choose_outputs(sessions, held[0], None)
    row = compare(sessions, held, outputs, 5)["cpu"].row()
    assert row["fidelity"]["outputs"]["y"]["samples"] == len(held) * BATCH
    assert 0.99 < row["fidelity"]["cosine"] < 1.0 and row["task"] is None and "parity_vs_cpu" not in row
    same = compare({"cpu": _pair(fp32, fp32)}, held, outputs, 5)["cpu"].row()
    assert same["fidelity"]["max_abs_error"] == 0.0


def test_a_failing_run_names_the_provider(mlp_models):
    fp32, q, held = mlp_models
    sessions = {"cpu": _pair(fp32, q)}
    outputs = choose_outputs(sessions, held[0], None)
    bad = [{"x": np.zeros((2, 7), np.float32)}]  # wrong inner dimension: onnxruntime refuses the run
    with pytest.raises(ModelError, match="failed to run the models on cpu"):
        compare(sessions, bad, outputs, 5)
