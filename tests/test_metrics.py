"""ortq.validate.metrics: known answers for every metric and the streaming accumulators."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ortq.errors import ModelError, ValidationFailed
from ortq.validate.metrics import (
    ErrorStats,
    OutputStats,
    TaskStats,
    argmax_agreement,
    cosine_similarity,
    fitting_mask,
    masked,
    max_abs_error,
    mean_pool,
    next_token_nll,
    sample_cosines,
    sqnr_db,
    sqnr_from_sums,
    topk_neighbour_agreement,
)


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


def test_error_stats_and_sample_cosines():
    s = ErrorStats()
    s.update(np.array([3.0, 4.0]), np.array([3.0, 4.0]))
    assert s.sqnr_db == math.inf and s.cosine == 1.0
    s.update(np.array([0.0, 0.0]), np.array([1.0, 0.0]))  # signal 25, noise 1
    assert s.sqnr_db == pytest.approx(10 * math.log10(25.0))
    ref = np.array([[[1.0, 0.0], [5.0, 5.0]], [[0.0, 1.0], [0.0, 1.0]]])
    test = np.array([[[1.0, 0.0], [-5.0, 9.0]], [[0.0, 1.0], [0.0, 1.0]]])
    mask = np.array([[1, 0], [1, 1]])
    assert sample_cosines(ref, test, mask) == pytest.approx([1.0, 1.0])  # the padded position is ignored
    assert sample_cosines(ref, test)[0] < 0.9


def test_sqnr_from_sums_edge_cases():
    assert sqnr_from_sums(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_from_sums(0.0, 0.0) == math.inf
    assert sqnr_from_sums(0.0, 1.0) == -math.inf
    s = ErrorStats()
    with pytest.raises(ModelError):
        s.update(np.zeros(3), np.zeros(4))


def test_masks_line_up_with_batch_and_seq_only():
    x = np.arange(12.0).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert fitting_mask(x, mask).dtype == bool
    assert fitting_mask(x, mask[:, :2]) is None and fitting_mask(x[0, 0], mask) is None
    assert masked(x, mask).shape == (3, 2)
    assert masked(x, None) is not None and masked(x, None).shape == x.shape


def test_mean_pool_ignores_padding():
    h = np.array([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    np.testing.assert_allclose(mean_pool(h, np.array([[1, 1, 0]])), [[2.0, 2.0]])
    np.testing.assert_allclose(mean_pool(h, None), [[104 / 3, 104 / 3]])
    np.testing.assert_array_equal(mean_pool(h[:, 0], None), h[:, 0])


def test_output_stats_known_answers():
    s = OutputStats()
    ref = np.array([[1.0, 0.0, 5.0], [0.0, 2.0, 0.0]])
    test = np.array([[1.0, 0.0, 9.0], [0.0, 2.0, 0.0]])
    s.update(ref, test, np.array([[True, True, False], [True, True, True]]))
    r = s.result()
    assert r["samples"] == 2 and r["cosine_mean"] == 1.0 and r["max_abs_error"] == 0.0
    assert r["sqnr_db"] == math.inf and r["mean_abs_error"] == 0.0
    s.update(np.ones((1, 3)), np.ones((1, 3)) * 2, None)  # signal 1 + 4 + 3 over all samples, noise 3
    r = s.result()
    assert r["max_abs_error"] == 1.0 and r["sqnr_db"] == pytest.approx(10 * math.log10(8 / 3))
    assert r["mean_abs_error"] == pytest.approx(3 / 8)
    assert r["sqnr_db_min"] == pytest.approx(0.0) and r["cosine_min"] == pytest.approx(1.0)
    assert s.summary().keys() == {"cosine_mean", "cosine_min", "max_abs_error", "sqnr_db"}
    with pytest.raises(ValidationFailed):
        s.update(np.zeros((1, 2)), np.zeros((1, 3)), None)
    assert math.isnan(OutputStats().result()["cosine_mean"])


def test_task_stats_per_task():
    cls = TaskStats("text-classification", "logits", 5)
    cls.update(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([[0.2, 0.8], [0.4, 0.6]]), {})
    assert cls.result() == {
        "task": "text-classification", "output": "logits", "metric": "argmax_agreement", "agreement": 0.5,
        "samples": 2,
    }
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((6, 4, 8))
    fx = TaskStats("feature-extraction", "last_hidden_state", 3)
    fx.update(hidden, hidden, {"attention_mask": np.ones((6, 4), np.int64)})
    r = fx.result()
    assert r["metric"] == "top3_neighbour_agreement" and r["agreement"] == 1.0 and r["samples"] == 6
    assert r["embedding_cosine_min"] == pytest.approx(1.0)
    lm = TaskStats("causal-lm", "logits", 5)
    ids = np.array([[1, 2, 3]])
    lm.update(np.zeros((1, 3, 5)), np.zeros((1, 3, 5)), {"input_ids": ids})
    r = lm.result()
    assert r["tokens"] == 2 and r["perplexity_reference"] == pytest.approx(5.0) and r["perplexity_delta_pct"] == 0.0
    assert TaskStats("none", None, 5).result() is None


def test_output_with_one_value_per_sample_takes_its_cosine_over_the_samples():
    """A per-sample cosine of one number is only its sign: 1.0 for any pair of positive scores. Over the
    samples, scores that have nothing to do with the reference's are no longer a perfect match."""
    ref = np.array([[0.9], [0.1], [0.5], [0.2]])
    test = np.array([[0.1], [0.9], [0.2], [0.5]])
    s = OutputStats()
    s.update(ref[:2], test[:2], None)
    s.update(ref[2:], test[2:], None)
    r = s.result()
    expected = float(ref.ravel() @ test.ravel() / (np.linalg.norm(ref) * np.linalg.norm(test)))
    assert r["cosine_mean"] == r["cosine_min"] == pytest.approx(expected) and expected < 0.6
    assert r["cosine_over"].startswith("samples") and r["samples"] == 4
