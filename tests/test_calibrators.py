import math

import numpy as np
import onnx
import pytest

from ortq.calibrators import CalibrationState, RangeCollector, make_observer
from ortq.calibrators._histogram import StreamingHistogram
from ortq.calibrators.entropy import kl_threshold_bins
from ortq.config import AutoCalibrationConfig, CalibrationConfig

METHODS = {
    "minmax": AutoCalibrationConfig.minmax(),
    "percentile": AutoCalibrationConfig.percentiles(percentile=99.9),
    "entropy": AutoCalibrationConfig.entropy(),
}


def _feed(obs, data, batch):
    for i in range(0, data.size, batch):
        obs.update(data[i : i + batch])
    return obs


def test_minmax_known_answer_and_moving_average():
    obs = _feed(make_observer(METHODS["minmax"]), np.array([1.0, -2.0, 3.0, 0.5], np.float32), 2)
    r = obs.compute_range()
    assert (r.low, r.high, r.num_values) == (-2.0, 3.0, 4)
    ma = make_observer(AutoCalibrationConfig.minmax(moving_average=True, averaging_constant=0.5))
    ma.update(np.array([0.0, 4.0], np.float32))
    ma.update(np.array([-2.0, 2.0], np.float32))
    r = ma.compute_range()
    assert (r.low, r.high) == (-1.0, 3.0)  # 0 + 0.5 * (-2 - 0), 4 + 0.5 * (2 - 4)


@pytest.mark.parametrize("q", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_a_bin(q):
    rng = np.random.default_rng(0)
    data = rng.standard_normal(200_000).astype(np.float32)
    obs = _feed(make_observer(AutoCalibrationConfig.percentiles(percentile=q)), data, 10_000)
    r = obs.compute_range()
    width = obs.hist.bin_width
    assert r.high == pytest.approx(np.percentile(data, q), abs=width)
    assert r.low == pytest.approx(np.percentile(data, 100 - q), abs=width)
    sym = _feed(make_observer(AutoCalibrationConfig.percentiles(percentile=q, symmetric=True)), data, 10_000)
    t = sym.compute_range().high
    assert t == pytest.approx(np.percentile(np.abs(data), q), abs=width)
    assert sym.compute_range().low == -t


def test_entropy_clips_heavy_tails_but_not_uniform_data():
    rng = np.random.default_rng(1)
    heavy = rng.standard_t(df=2, size=300_000).astype(np.float32)
    ent = _feed(make_observer(METHODS["entropy"]), heavy, 50_000).compute_range()
    mm = _feed(make_observer(METHODS["minmax"]), heavy, 50_000).compute_range()
    assert ent.high < 0.5 * mm.high and ent.low > 0.5 * mm.low
    assert ent.high > np.percentile(heavy, 99)  # but it keeps the bulk
    uniform = rng.uniform(-1, 1, 300_000).astype(np.float32)
    ent_u = _feed(make_observer(METHODS["entropy"]), uniform, 50_000).compute_range()
    assert ent_u.high > 0.9 and ent_u.low < -0.9


def test_kl_search_known_cases():
    # Mass only in the first nq bins: the threshold is where the data ends.
    counts = np.zeros(1024)
    counts[:100] = 5
    assert kl_threshold_bins(counts, 128) == 100
    # One far outlier beyond a decaying bulk: clipped at the end of the bulk.
    counts = np.zeros(1024)
    counts[:300] = np.round(1e5 * np.exp(-np.arange(300) / 40))
    counts[1000] = 1
    assert kl_threshold_bins(counts, 128) <= 300


@pytest.mark.parametrize("method", list(METHODS))
def test_batch_size_order_and_sharding_invariance(method):
    rng = np.random.default_rng(2)
    data = (rng.standard_normal(60_000) * np.exp(rng.standard_normal(60_000))).astype(np.float32)
    config = METHODS[method]
    ranges = []
    for batch in (100, 7_000, 60_000):
        ranges.append(_feed(make_observer(config), data, batch).compute_range())
    shuffled = data[rng.permutation(data.size)]
    ranges.append(_feed(make_observer(config), shuffled, 3_000).compute_range())
    a, b = make_observer(config), make_observer(config)
    _feed(a, data[:25_000], 5_000)
    _feed(b, data[25_000:], 5_000)
    a.merge(b)
    ranges.append(a.compute_range())
    for r in ranges[1:]:
        assert (r.low, r.high, r.num_values) == (ranges[0].low, ranges[0].high, ranges[0].num_values)


def test_histogram_growth_is_exact():
    rng = np.random.default_rng(3)
    small = rng.uniform(-0.3, 0.3, 1000).astype(np.float32)
    big = rng.uniform(-50, 50, 1000).astype(np.float32)
    h1 = StreamingHistogram(256)
    h1.update(small)
    h1.update(big)
    h2 = StreamingHistogram(256)
    h2.update(np.concatenate([big, small]))
    np.testing.assert_array_equal(h1.counts, h2.counts)
    assert h1.radius == 64.0 and h1.total == 2000


@pytest.mark.parametrize("method", list(METHODS))
def test_non_finite_and_mask_values_are_excluded_and_counted(method):
    obs = make_observer(METHODS[method])
    x = np.array([1.0, -1.0, np.inf, -np.inf, np.nan, -3.4028235e38, 0.5], np.float32)
    obs.update(x)
    r = obs.compute_range()
    assert math.isfinite(r.low) and math.isfinite(r.high)
    assert r.num_excluded == 4 and r.num_values == 3
    assert -1.0 <= r.low <= 0 <= r.high <= 1.0
    only_bad = make_observer(METHODS[method])
    only_bad.update(np.array([np.nan, np.inf], np.float32))
    r = only_bad.compute_range()
    assert (r.low, r.high, r.num_values, r.num_excluded) == (0.0, 0.0, 0, 2)


@pytest.mark.parametrize("method", list(METHODS))
def test_state_round_trip(method, tmp_path):
    config = METHODS[method]
    state = CalibrationState(config)
    rng = np.random.default_rng(4)
    state.observer("a").update(rng.standard_normal(5000).astype(np.float32))
    state.observer("b").update(np.array([np.nan, 2.0], np.float32))
    state.num_samples = 10
    state.save(tmp_path / "s.npz")
    loaded = CalibrationState.load(tmp_path / "s.npz")
    assert loaded.compute_ranges() == state.compute_ranges()
    assert loaded.num_samples == 10 and loaded.config == config


SEQ_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 4] x, int64[B, S] attention_mask) => (float[B, S, 4] y) {
    h = Mul(x, two)
    y = Relu(h)
}
"""


def _seq_model():
    proto = onnx.parser.parse_model(SEQ_MODEL)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"))
    return proto


def _batch(rng, lengths, pad_value=1000.0):
    b, s = len(lengths), max(lengths)
    x = rng.standard_normal((b, s, 4)).astype(np.float32)
    mask = np.zeros((b, s), np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        x[i, n:] = pad_value
    return {"x": x, "attention_mask": mask}


@pytest.mark.parametrize("method", list(METHODS))
def test_collector_ignores_padding(method):
    rng = np.random.default_rng(5)
    batches = [_batch(rng, [3, 5, 2]), _batch(rng, [4, 1])]
    real = np.concatenate([2 * f["x"][f["attention_mask"].astype(bool)].ravel() for f in batches])
    collector = RangeCollector(_seq_model(), ["h", "y"], METHODS[method], intra_op_num_threads=1)
    state = collector.collect(batches, show_progress=False)
    r = state.compute_ranges()["h"]
    assert r.high < 100  # the 2000s at padded positions never entered
    if method == "minmax":
        assert (r.low, r.high) == (float(real.min()), float(real.max()))
    assert state.num_samples == 5 and state.num_batches == 2
    with_padding = RangeCollector(
        _seq_model(), ["h"], CalibrationConfig(method=method, exclude_padding=False), intra_op_num_threads=1
    ).collect(batches, show_progress=False)
    assert with_padding.compute_ranges()["h"].high >= 100


def test_collector_counts_mask_sentinels():
    rng = np.random.default_rng(6)
    f = _batch(rng, [2, 2])
    f["x"][0, 0, 0] = -3.4e38
    collector = RangeCollector(_seq_model(), ["h"], METHODS["minmax"], intra_op_num_threads=1)
    r = collector.collect([f], show_progress=False).compute_ranges()["h"]
    assert math.isfinite(r.low) and r.num_excluded >= 1


def _kl_reference(counts, start, end, levels):
    """KL(P || Q) of one candidate, spelled out bin by bin."""
    c = np.asarray(counts, np.float64)
    sliced = c[start:end]
    p = sliced.copy()
    p[0] += c[:start].sum()
    p[-1] += c[end:].sum()
    width = end - start
    group = (np.arange(width) * levels) // width
    nonzero = sliced > 0
    sums = np.bincount(group, weights=sliced, minlength=levels)
    slots = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, np.divide(sums, slots, out=np.zeros(levels), where=slots > 0)[group], 0.0)
    p_n, q_n = p / p.sum(), q / q.sum()
    keep = p_n > 0
    return float(np.sum(p_n[keep] * np.log(p_n[keep] / np.maximum(q_n[keep], 1e-12))))


def test_vectorised_kl_matches_the_bin_by_bin_definition():
    from ortq.calibrators.entropy import kl_divergences

    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(4, 300))
        counts = (rng.integers(0, 6, n) * (rng.random(n) < 0.7)).astype(np.float64)
        levels = int(rng.integers(2, 40))
        start = int(rng.integers(0, n))
        end = int(rng.integers(start + 1, n + 1))
        if counts[start:end].sum() == 0:
            continue
        got = kl_divergences(counts, np.array([start]), np.array([end]), levels)[0]
        assert got == pytest.approx(_kl_reference(counts, start, end, levels), rel=1e-9, abs=1e-12)


def test_joint_kl_search_is_the_grid_minimum():
    from ortq.calibrators.entropy import kl_divergences, kl_range_bins

    rng = np.random.default_rng(8)
    data = np.concatenate([rng.standard_normal(50_000), 40 + rng.standard_normal(20)])
    counts, _ = np.histogram(data, bins=512, range=(-64, 64))
    start, end = kl_range_bins(counts, 256, 64)
    assert start <= 256 <= end and end - start >= 64
    # No single-end move improves it (a local minimum of the exact search), and the far outliers are clipped.
    best = kl_divergences(counts, np.array([start]), np.array([end]), 64)[0]
    ends = np.arange(start + 64, 513)
    assert kl_divergences(counts, np.full_like(ends, start), ends, 64).min() >= best - 1e-12
    assert end < 256 + 40 * 4


def test_entropy_asymmetric_and_symmetric_ranges():
    rng = np.random.default_rng(9)
    # A GELU-like activation: a small negative floor, a heavy positive tail.
    x = rng.standard_normal(400_000).astype(np.float32)
    act = np.where(x > 0, x * np.exp(rng.standard_normal(x.size)).astype(np.float32), -0.17 * (x < -0.5))
    act = act.astype(np.float32)
    mm = _feed(make_observer(METHODS["minmax"]), act, 100_000).compute_range()
    ent = _feed(make_observer(METHODS["entropy"]), act, 100_000).compute_range()
    assert ent.low == pytest.approx(-0.17, abs=1e-6)  # the negative side is narrow: kept whole
    assert np.percentile(act, 99.9) < ent.high < 0.75 * mm.high
    sym = _feed(make_observer(AutoCalibrationConfig.entropy(symmetric=True)), act, 100_000).compute_range()
    assert sym.low == -sym.high and sym.high < mm.high


HEADS_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[B, S, 4] x, int64[B, S] attention_mask) => (float[B, 2, S, 2] heads, float[N, 4] flat) {
    split = Reshape(x, hshape)
    heads = Transpose<perm = [0, 2, 1, 3]>(split)
    flat = Reshape(x, fshape)
}
"""


def _heads_model():
    proto = onnx.parser.parse_model(HEADS_MODEL)
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array([0, 0, 2, 2], np.int64), "hshape"),
            onnx.numpy_helper.from_array(np.array([-1, 4], np.int64), "fshape"),
        ]
    )
    onnx.checker.check_model(proto)
    return proto


@pytest.mark.parametrize("method", list(METHODS))
def test_collector_padding_in_head_and_flattened_layouts(method):
    rng = np.random.default_rng(10)
    # Two tokens per sentence: the sequence axis has the size of the heads axis (2).
    batches = [_batch(rng, [2, 1]), _batch(rng, [1, 2, 2])]
    real = np.concatenate([f["x"][f["attention_mask"].astype(bool)].ravel() for f in batches])
    state = RangeCollector(
        _heads_model(), ["heads", "flat"], METHODS[method], intra_op_num_threads=1
    ).collect(batches, show_progress=False)
    ranges = state.compute_ranges()
    for name in ("heads", "flat"):
        r = ranges[name]
        assert r.high < 100, name  # the 1000s at padded positions never entered
        assert r.num_values == real.size and r.num_excluded == 0
        if method == "minmax":
            assert (r.low, r.high) == (float(real.min()), float(real.max()))


def test_collector_skips_non_float_tensors_and_rejects_unknown_ones():
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[B, S, 4] x, int64[B, S] attention_mask) => (float[B, S, 4] y, int64[B, S] m2) {
            y = Relu(x)
            m2 = Identity(attention_mask)
        }
        """
    )
    c = RangeCollector(proto, ["y", "m2"], METHODS["minmax"])
    assert c.tensor_names == ["y"]
    from ortq.errors import ModelError

    with pytest.raises(ModelError):
        RangeCollector(proto, ["nope"], METHODS["minmax"])


@pytest.mark.parametrize("method", list(METHODS))
def test_collect_in_parts_equals_collect_at_once(method, tmp_path):
    rng = np.random.default_rng(11)
    batches = [_batch(rng, list(rng.integers(1, 9, size=int(rng.integers(1, 5))))) for _ in range(6)]
    once = RangeCollector(_seq_model(), ["h", "y"], METHODS[method]).collect(batches, show_progress=False)
    # partial fits: the same collector twice, and a shard collected elsewhere, saved, loaded, merged
    parts = RangeCollector(_seq_model(), ["h", "y"], METHODS[method])
    parts.collect(batches[:2], show_progress=False)
    parts.collect(batches[2:4], show_progress=False)
    other = RangeCollector(_seq_model(), ["h", "y"], METHODS[method]).collect(
        batches[4:], show_progress=False
    )
    other.save(tmp_path / "shard.npz")
    parts.state.merge(CalibrationState.load(tmp_path / "shard.npz"))
    assert parts.state.compute_ranges() == once.compute_ranges()
    assert parts.state.num_samples == once.num_samples
    summary = parts.state.summary()
    assert summary["num_tensors"] == 2 and summary["num_excluded_values"] == 0


def test_observation_nodes_run_right_after_their_producers():
    """Added nodes are placed after the producers of their inputs, not at the end of the graph (where they
    would keep every observed activation alive until the whole model has run)."""
    from onnx import TensorProto, helper

    from ortq.calibrators.graph import merge_additions

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    additions = onnx.GraphProto()
    additions.node.extend([helper.make_node("Abs", ["a"], ["a_abs"]), helper.make_node("Neg", ["a_abs"], ["o_a"]),
                           helper.make_node("Abs", ["x"], ["o_x"])])
    additions.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("o_a", "o_x"))
    merge_additions(graph, additions)
    assert [n.output[0] for n in graph.node] == ["o_x", "a", "a_abs", "o_a", "b", "y"]
    assert [o.name for o in graph.output] == ["y", "o_a", "o_x"]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([-1.0, 2.0], np.float32)
    y, o_a, o_x = sess.run(None, {"x": x})
    np.testing.assert_array_equal(o_a, -np.abs(np.maximum(x, 0)))
    np.testing.assert_array_equal(o_x, np.abs(x))
