"""Weights mapped from an external data file are read one at a time and unmapped after: weight-only and static
int8 (SmoothQuant included) never hold a model's mapped pages all at once, and give the same model, to the
bit, as from a source with its weights inline."""

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ortq import AutoCalibrationConfig, QuantizationConfig, WeightOnlyConfig
from ortq.data import real_text
from ortq.passes._int4 import quantize_rtn
from ortq.passes.weight_budget import relative_errors
from ortq.quantizer import ORTQuantizer


@pytest.fixture
def external_llama(tiny_llama_dir, tmp_path):
    """The tiny Llama with every initializer in ``model.onnx.data`` (as an export over 2 GB writes it)."""
    out = tmp_path / "external"
    shutil.copytree(tiny_llama_dir, out)
    proto = onnx.load(str(out / "model.onnx"))
    onnx.save_model(proto, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    return out


@pytest.fixture
def mapped(monkeypatch):
    """How many external tensors are mapped at most at the same time (``peak``), and how many are now."""
    state = {"now": set(), "peak": 0}
    load, release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def _load(self):
        load(self)
        state["now"].add(id(self))
        state["peak"] = max(state["peak"], len(state["now"]))

    def _release(self):
        release(self)
        state["now"].discard(id(self))

    monkeypatch.setattr(ir.ExternalTensor, "_load", _load)
    monkeypatch.setattr(ir.ExternalTensor, "release", _release)
    return state


def _weights(path):
    proto = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def _count_initializers(folder) -> int:
    return len(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer)


def test_weight_only_maps_one_weight_at_a_time(tiny_llama_dir, external_llama, tmp_path, mapped):
    config = WeightOnlyConfig(bits=4, block_size=16, algorithm="rtn")
    path = ORTQuantizer.from_pretrained(external_llama).quantize(config, tmp_path / "ext")
    assert 0 < mapped["peak"] <= 3 < _count_initializers(external_llama)
    inline = ORTQuantizer.from_pretrained(tiny_llama_dir).quantize(config, tmp_path / "inline")
    _same_weights(path, inline)


def test_static_int8_with_smoothquant_maps_one_weight_at_a_time(tiny_llama_dir, external_llama, tmp_path, mapped):
    text = real_text("calibration", 8)
    config = QuantizationConfig(smooth_quant_alpha="auto")
    calib = AutoCalibrationConfig.minmax(batch_size=4)
    q = ORTQuantizer.from_pretrained(external_llama)
    path = q.quantize(config, tmp_path / "ext", calibration_data=text, calibration_config=calib)
    assert q.last_report["smooth_quant"]["activations"]
    assert 0 < mapped["peak"] <= 3 < _count_initializers(external_llama)
    inline = ORTQuantizer.from_pretrained(tiny_llama_dir).quantize(config, tmp_path / "inline", calibration_data=text,
                                                                   calibration_config=calib)
    _same_weights(path, inline)


def test_relative_errors_by_row_chunks_match_one_pass():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(37, 64)).astype(np.float32)
    bq = quantize_rtn(w, 4, 16, False)
    x = rng.normal(size=(200, 64))
    xtx = x.T @ x
    whole = relative_errors(w, bq, xtx, chunk_values=w.size)
    chunked = relative_errors(w, bq, xtx, chunk_values=5 * 64)  # 5 rows at a time, the last chunk shorter
    assert whole.keys() == chunked.keys() == {"weight_rel_rmse", "output_rel_rmse"}
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-12)


def test_smoothquant_rows_fetched_in_groups_are_the_same(tiny_llama_dir, monkeypatch):
    """Whole activations for SmoothQuant's row sample come a few per run, and batches a few samples per run,
    under a byte budget: the same rows and maxima as all in one run."""
    from ortq.calibrators import activations
    from ortq.passes.smooth import smooth_groups
    from ortq.quantize_steps import QuantizeSteps

    steps = QuantizeSteps(tiny_llama_dir / "model.onnx")
    feeds = list(steps.batches(real_text("calibration", 8), batch_size=4))
    names = [g.activation for g in smooth_groups(steps.model.clone())]
    assert len(names) > 2
    one = activations.channel_absmax(steps.model, names, feeds, sample_rows=64)
    monkeypatch.setattr(activations, "ROW_FETCH_BYTES", 1)  # one activation per run
    widths = activations._last_dims(steps.model, names)
    assert len(activations._fetch_groups(names, widths, feeds[0])) == len(names)
    # ... and each batch runs a sample at a time: ONNX Runtime holds every activation output until a run ends.
    parts = activations._parts(feeds[0], names, widths)
    assert len(parts) == len(feeds[0]["input_ids"]) == 4
    for key, value in feeds[0].items():
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    grouped = activations.channel_absmax(steps.model, names, feeds, sample_rows=64)
    for name in names:
        np.testing.assert_array_equal(one.absmax[name], grouped.absmax[name])
        np.testing.assert_array_equal(one.rows[name], grouped.rows[name])


def test_second_moments_over_batches_cut_along_samples_are_the_same(tiny_llama_dir, monkeypatch):
    """Weight statistics fetch whole activations: under a byte budget each batch runs a sample at a time, and
    the row counts, sums of squares and Hessians are those of whole batches (to float64 rounding)."""
    from ortq.calibrators import activations
    from ortq.passes.matmul_nbits import weight_only_activations
    from ortq.quantize_steps import QuantizeSteps

    steps = QuantizeSteps(tiny_llama_dir / "model.onnx")
    feeds = list(steps.batches(real_text("calibration", 8), batch_size=4))
    names = weight_only_activations(steps.model, WeightOnlyConfig())
    whole = activations.second_moments(steps.model, names, feeds, hessians=True)
    runs = []
    real_run = activations.run_batches
    monkeypatch.setattr(activations, "run_batches", lambda s, b, *a, **k: real_run(s, (runs.append(x) or x for x in b),
                                                                                  *a, **k))
    monkeypatch.setattr(activations, "ROW_FETCH_BYTES", 1)
    cut = activations.second_moments(steps.model, names, feeds, hessians=True)
    assert len(runs) == sum(len(f["input_ids"]) for f in feeds) == 8  # one sample per run
    assert cut.count == whole.count and whole.tokens > 0
    for name in names:
        np.testing.assert_allclose(cut.sum_squares[name], whole.sum_squares[name], rtol=1e-12)
        np.testing.assert_allclose(cut.hessians[name], whole.hessians[name], rtol=1e-9, atol=1e-9)


def test_weight_statistics_fold_in_chunks_matches_the_direct_sums(monkeypatch):
    """Rows are folded a few at a time in float64 (masked positions left out) and X^T X is added by column
    blocks: the same counts, sums of squares and Hessians as the direct float64 formulas."""
    from ortq.calibrators import activations

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7, 24)).astype(np.float32)
    mask = (rng.random((3, 7)) > 0.3).astype(np.int64)
    rows = x[mask.astype(bool)].astype(np.float64)
    monkeypatch.setattr(activations, "FOLD_CHUNK_BYTES", 5 * 24 * 8)  # 5 rows, and 5 columns of X^T X, at a time
    job = activations.MomentsJob(["a"], hessians=True)
    stats = activations.ActivationStatistics()
    for _ in range(2):  # a second batch adds to the first
        job._fold(stats, {"input_ids": np.zeros((3, 7), np.int64), "attention_mask": mask}, {"a": x})
    assert stats.count["a"] == 2 * rows.shape[0]
    np.testing.assert_allclose(stats.sum_squares["a"], 2 * (rows * rows).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.hessians["a"], 2 * rows.T @ rows, rtol=1e-12, atol=1e-12)


def test_bound_heap_growth_hands_freed_large_blocks_back():
    """After ``bound_heap_growth``, freed blocks of a MiB and more leave the process's RSS (checked in a child
    process: the setting lasts for the process)."""
    import subprocess
    import sys

    code = """
import gc, sys, numpy as np
from ortq.runtime import bound_heap_growth
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
if sys.argv[1] == "bound":
    assert bound_heap_growth()
np.ones(1 << 20)  # freed at once: glibc's own threshold rises to its 8 MiB
base = rss()
big, keep = [], []
for i in range(100):  # 2 MiB blocks between small ones that stay: the heap cannot shrink past them
    big.append(np.ones(1 << 18))
    keep.append(np.ones(64))
del big
gc.collect()
print(rss() - base)
"""
    grown = {}
    for mode in ("default", "bound"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        grown[mode] = int(out.stdout.strip())
    assert grown["bound"] < 32 < 150 < grown["default"], grown
