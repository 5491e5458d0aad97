"""Generative validation on a tiny exported Llama with a KV cache, and the offline text domains."""

from __future__ import annotations

import pytest

from ortq import WeightOnlyConfig
from ortq.corpus import news_path, passages
from ortq.errors import CalibrationDataError
from ortq.quantizer import ORTQuantizer
from ortq.validate.generative import evaluate_generative


def test_a_model_against_itself_agrees_fully(tiny_llama_dir):
    texts = {"docs": passages("python-docs", "heldout", 3)}
    r = evaluate_generative(tiny_llama_dir, tiny_llama_dir, texts, max_length=32, prompts=("Hello",),
                            new_tokens=4, threads=1)
    d = r["domains"]["docs"]
    assert d["perplexity_delta_pct"] == pytest.approx(0.0, abs=1e-9)
    assert d["top1_agreement"] == 1.0 and d["top5_agreement"] == 1.0 and d["tokens"] > 0
    assert r["generation"]["first_divergence"] == [None]
    assert r["generation"]["tokens_per_s"]["quantized"]["prefill"] > 0 and r["peak_rss_mb"] > 0


def test_passages_are_cut_to_the_models_context(tiny_llama_dir):
    """The tiny Llama's context is 256 positions: longer passages would index past its position tables."""
    r = evaluate_generative(tiny_llama_dir, tiny_llama_dir, {"docs": passages("python-docs", "heldout", 1)},
                            max_length=4096, prompts=(), threads=1)
    assert r["max_length"] == 256 and r["domains"]["docs"]["tokens"] <= 255


def test_int4_default_on_a_kv_cache_model_without_data(tiny_llama_dir, tmp_path):
    # The default (gptq) without data calibrates on mixed passages through the KV-cache graph.
    q = ORTQuantizer.from_pretrained(tiny_llama_dir)
    q.quantize(WeightOnlyConfig(accuracy_level=None), tmp_path / "int4")
    r = evaluate_generative(tmp_path / "int4", tiny_llama_dir, {"docs": passages("python-docs", "heldout", 2)},
                            max_length=32, prompts=())
    assert 0.0 <= r["domains"]["docs"]["top1_agreement"] <= 1.0 and "generation" not in r


def test_text_domains_and_splits_are_disjoint():
    docs_c, docs_h = passages("python-docs", "calibration"), passages("python-docs", "heldout")
    assert docs_c and docs_h and not set(docs_c) & set(docs_h)
    with pytest.raises(CalibrationDataError):
        passages("poetry")
    if news_path() is None:
        pytest.skip("the news corpus (gensim wheel) is not installed")
    news_c, news_h = passages("news", "calibration"), passages("news", "heldout")
    assert news_c and news_h and not set(news_c) & set(news_h)
    assert set(passages("mixed", "calibration")) == set(docs_c) | set(news_c)
