"""ortq.validate.inputs: the models compared, their summaries and the held-out batches."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ortq.errors import CalibrationDataError, ModelError
from ortq.validate.inputs import load_model_file, model_summary, pick_batches, synthetic_batches
from tests.validate_models import lm, mlp


def test_load_model_file_finds_the_tokenizer_folder(tmp_path):
    path = mlp(tmp_path / "model.onnx")
    m = load_model_file(tmp_path)
    assert m.path == path and m.folder == tmp_path and m.proto.graph.node
    assert load_model_file(path).folder is None  # a file without tokenizer files beside it
    (tmp_path / "tokenizer.json").write_text("{}")
    assert load_model_file(path).folder == tmp_path
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError):
        load_model_file(tmp_path / "bad.onnx")


def test_model_summary_counts_external_data(tmp_path):
    path = mlp(tmp_path / "fp32.onnx")
    inline = model_summary(load_model_file(path))
    assert inline["nodes"] == 4 and inline["opset"] == 17 and inline["op_types"]["MatMul"] == 2
    m = onnx.load(str(path))
    onnx.save_model(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    ext = model_summary(load_model_file(tmp_path / "ext.onnx"))
    assert ext["size_bytes"] == (tmp_path / "ext.onnx").stat().st_size + (tmp_path / "ext.data").stat().st_size


def test_synthetic_batches_fit_the_graph(tmp_path):
    model = onnx.load(str(lm(tmp_path / "lm.onnx", vocab=50)))
    batches = synthetic_batches(model, batch_size=4, num_samples=6, seq_len=10)
    assert [b["input_ids"].shape for b in batches] == [(4, 10), (2, 10)]
    for b in batches:
        assert b["input_ids"].dtype == np.int64 and b["input_ids"].max() < 50
        assert b["attention_mask"][0].all()  # the first row is full length
        assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    again = synthetic_batches(model, batch_size=4, num_samples=6, seq_len=10)
    np.testing.assert_array_equal(again[1]["input_ids"], batches[1]["input_ids"])  # seeded


def test_pick_batches_sources(tmp_path):
    ref = load_model_file(mlp(tmp_path / "fp32.onnx"))
    feeds = [{"x": np.zeros((3, 32), np.float32)}]
    batches, source = pick_batches(feeds, ref, batch_size=3, num_samples=3)
    assert source == "user-supplied batches" and batches[0]["x"].shape == (3, 32)
    batches, source = pick_batches(None, ref, batch_size=2, num_samples=3)
    assert source.startswith("synthetic") and sum(len(b["x"]) for b in batches) == 3
    with pytest.raises(CalibrationDataError):
        pick_batches([], ref, batch_size=2, num_samples=3)
