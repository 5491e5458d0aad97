import json

import numpy as np
import onnx
import pytest

from ortq.data import graph_inputs, load_batches, real_text
from ortq.errors import CalibrationDataError

TEXT_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64[B, S] input_ids, int64[B, S] attention_mask) => (float[B, S] y) {
    f = Cast<to = 1>(input_ids)
    y = Mul(f, f)
}
"""


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(onnx.parser.parse_model(TEXT_MODEL), path)
    return path


class FakeTokenizer:
    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = [[len(w) for w in t.split()][:max_length] for t in texts]
        width = max(map(len, ids))
        out = np.zeros((len(ids), width), np.int64)
        mask = np.zeros_like(out)
        for i, row in enumerate(ids):
            out[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": out, "attention_mask": mask}


def test_real_text_splits_are_disjoint_and_stable():
    cal = real_text("calibration")
    held = real_text("heldout")
    assert len(cal) >= 2048 and len(held) >= 256
    assert not set(cal) & set(held)
    assert real_text("heldout", 5) == held[:5]


def test_text_is_padded_per_batch_with_mask(model, tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("one two\nthree four five six\n\nseven\n")
    batches = load_batches(f, model=model, tokenizer=FakeTokenizer(), batch_size=2)
    got = list(batches)
    assert batches.num_samples == 3 and batches.num_batches == 2
    assert got[0]["input_ids"].shape == (2, 4) and got[1]["input_ids"].shape == (1, 1)
    np.testing.assert_array_equal(got[0]["attention_mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_jsonl_text_and_columns(model, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["a b", "c d e"]))
    assert list(load_batches(f, model=model, tokenizer=FakeTokenizer()))[0]["input_ids"].shape == (2, 3)
    g = tmp_path / "e.jsonl"
    g.write_text(
        "\n".join(json.dumps({"input_ids": r, "attention_mask": [1] * len(r)}) for r in [[1, 2], [3, 4, 5]])
    )
    feeds = list(load_batches(g, model=model))[0]
    np.testing.assert_array_equal(feeds["input_ids"], [[1, 2, 0], [3, 4, 5]])


def test_npz_and_feed_dicts(model, tmp_path):
    f = tmp_path / "d.npz"
    ids = np.arange(20, dtype=np.int64).reshape(10, 2)
    np.savez(f, input_ids=ids, attention_mask=np.ones_like(ids))
    batches = load_batches(f, model=model, batch_size=4, num_samples=6)
    shapes = [b["input_ids"].shape for b in batches]
    assert shapes == [(4, 2), (2, 2)]
    feeds = [{"input_ids": ids[:3], "attention_mask": np.ones_like(ids[:3])}]
    assert list(load_batches(feeds, model=model))[0]["input_ids"].shape == (3, 2)


RECURRENT_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[batch, 4] x, float[2, batch, 3] state, int64 sr) => (float[batch, 4] y) {
    y = Identity(x)
}
"""


def test_npz_samples_run_along_each_inputs_batch_axis(tmp_path):
    """A recurrent state ``[2, batch, 3]`` is cut along its batch axis (the one named like the other inputs'
    first), and a scalar input (a sample rate) goes whole to every batch."""
    path = tmp_path / "rnn.onnx"
    onnx.save(onnx.parser.parse_model(RECURRENT_MODEL), path)
    f = tmp_path / "d.npz"
    state = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    np.savez(f, x=np.zeros((5, 4), np.float32), state=state, sr=np.array(16000, np.int64))
    got = list(load_batches(f, model=path, batch_size=2))
    assert [b["state"].shape for b in got] == [(2, 2, 3), (2, 2, 3), (2, 1, 3)]
    np.testing.assert_array_equal(got[1]["state"], state[:, 2:4])
    assert all(b["sr"].shape == () and int(b["sr"]) == 16000 for b in got)
    np.savez(f, x=np.zeros((5, 4), np.float32), state=state[:, :4], sr=np.array(16000, np.int64))
    with pytest.raises(CalibrationDataError, match="state: axis 1"):
        load_batches(f, model=path)


def test_graph_inputs(model):
    specs = graph_inputs(model)
    assert list(specs) == ["input_ids", "attention_mask"]
    assert specs["input_ids"].dtype == np.int64 and specs["input_ids"].rank == 2


@pytest.mark.parametrize(
    "content,suffix,match",
    [
        ("", ".txt", "no samples"),
        ("{not json", ".jsonl", "invalid JSON"),
        ('{"other": 1}', ".jsonl", "text"),
        ("garbage", ".npz", "not a readable .npz"),
        ("x", ".xlsx", "unsupported"),
    ],
)
def test_bad_files(model, tmp_path, content, suffix, match):
    f = tmp_path / f"d{suffix}"
    f.write_text(content)
    with pytest.raises(CalibrationDataError, match=match):
        list(load_batches(f, model=model, tokenizer=FakeTokenizer()))


def test_bad_arrays(model, tmp_path):
    ids = np.ones((4, 3), np.int64)
    with pytest.raises(CalibrationDataError, match="missing input"):
        load_batches([{"input_ids": ids}], model=model)
    with pytest.raises(CalibrationDataError, match="rank"):
        load_batches([{"input_ids": ids[0], "attention_mask": ids[0]}], model=model)
    with pytest.raises(CalibrationDataError, match="dtype"):
        load_batches([{"input_ids": ids.astype(np.float32), "attention_mask": ids}], model=model)
    with pytest.raises(CalibrationDataError, match="no such file"):
        load_batches(tmp_path / "missing.txt", model=model)
    with pytest.raises(CalibrationDataError, match="tokenizer"):
        list(load_batches(["some text"], model=model))
    with pytest.raises(CalibrationDataError, match="positive"):
        load_batches(["x"], model=model, num_samples=0)


def test_nan_in_float_inputs_is_refused(tmp_path):
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2] x) => (float[N, 2] y) { y = Relu(x) }
    """
    path = tmp_path / "f.onnx"
    onnx.save(onnx.parser.parse_model(text), path)
    bad = np.array([[1.0, np.nan]], np.float32)
    with pytest.raises(CalibrationDataError, match="NaN"):
        load_batches({"x": bad}, model=path)


def test_a_fixed_batch_dimension_sets_the_batch_size(tmp_path):
    """Model-zoo graphs fix the batch at 1 (``[1, 3, 224, 224]``): calibration feeds one sample at a time."""
    path = tmp_path / "fixed.onnx"
    onnx.save(onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4] x) => (float[1, 4] y) {
    y = Identity(x)
}
"""), path)
    f = tmp_path / "d.npz"
    np.savez(f, x=np.zeros((5, 4), np.float32))
    batches = load_batches(f, model=path, batch_size=16)
    assert [b["x"].shape for b in batches] == [(1, 4)] * 5
