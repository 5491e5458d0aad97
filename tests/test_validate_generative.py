"""``ortq validate`` on decoders: the generative evaluation in the CLI, the JSON report and the verdict."""

from __future__ import annotations

import json

import pytest

from ortq.cli import main
from ortq.corpus import news_path
from ortq.validate import Thresholds, ValidationReport

SMALL = ["--num-samples", "8", "--latency-runs", "0", "--max-length", "24", "--eval-passages", "2",
         "--new-tokens", "3"]


@pytest.fixture(scope="module")
def llama_int4(tmp_path_factory, tiny_llama_src):
    """The tiny Llama through the CLI: export, then int4 weight-only (rtn: no calibration pass, faster)."""
    root = tmp_path_factory.mktemp("cli-llama")
    assert main(["-q", "export", str(tiny_llama_src), "-o", str(root / "fp32")]) == 0
    assert main(["-q", "quantize", str(root / "fp32"), "-o", str(root / "int4"), "--weight-only", "int4",
                 "--algorithm", "rtn"]) == 0
    return root / "fp32", root / "int4"


def test_validate_a_decoder_end_to_end(llama_int4, tmp_path, capsys):
    fp32, int4 = llama_int4
    code = main(["validate", str(int4), "--reference", str(fp32), "--report-dir", str(tmp_path), *SMALL])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    gen = doc["generative"]
    assert gen["status"] == "ok" and gen["max_length"] == 24 and gen["peak_rss_mb"] > 0
    domains = ["python-docs", "news"] if news_path() is not None else ["python-docs"]
    assert list(gen["domains"]) == domains
    for d in gen["domains"].values():
        assert d["passages"] == 2 and d["tokens"] > 0
        assert d["perplexity_reference"] > 0 and d["perplexity_quantized"] > 0
        assert abs(d["perplexity_delta_pct"]) < 25 and 0.65 <= d["top1_agreement"] <= d["top5_agreement"] <= 1
    g = gen["generation"]
    assert len(g["first_divergence"]) == len(g["prompts"]) == 4 and g["new_tokens"] == 3
    assert g["tokens_per_s"]["quantized"]["prefill"] > 0 and g["threads"] == 2
    assert doc["thresholds"]["max_ppl_increase_pct"] == 25.0 and doc["thresholds"]["min_top1_agreement"] == 0.65
    assert doc["ok"] is True
    assert "generative metrics on python-docs" in out and "## Generative (decoder)" in out
    assert "## Generative (decoder)" in (tmp_path / "report.md").read_text()


def test_a_limit_exceeded_on_a_text_file_fails(llama_int4, tmp_path, capsys):
    fp32, int4 = llama_int4
    text = tmp_path / "mine.txt"
    text.write_text("The first passage of my own text.\n\nAnd a second one, about something else entirely.\n")
    code = main(["validate", str(int4), "--reference", str(fp32), "--report-dir", str(tmp_path / "r"), *SMALL,
                 "--eval-text", str(text), "--max-ppl-increase", "-50"])
    captured = capsys.readouterr()
    assert code == 1
    doc = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(doc["generative"]["domains"]) == ["mine.txt"] and doc["ok"] is False
    assert "**FAIL**" in captured.out
    assert any(line.startswith("error: generative (mine.txt): perplexity increase") and "--max-ppl-increase -50"
               in line for line in captured.err.splitlines())


def test_turned_off_is_reported_as_not_run(llama_int4, tmp_path, capsys):
    fp32, int4 = llama_int4
    code = main(["validate", str(int4), "--reference", str(fp32), "--report-dir", str(tmp_path),
                 "--num-samples", "8", "--latency-runs", "0", "--no-generative"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["generative"] == {"status": "skipped", "reason": "turned off (--no-generative)"}
    assert "Generative evaluation NOT run: turned off" in out and "generative metrics" not in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-passages", "2"], "not a decoder language model"),
        (["--min-top1-agreement", "0.5"], "not a decoder language model"),
    ],
)
def test_generative_options_on_an_encoder_are_one_line_errors(tiny_bert_dir, extra, message, capsys):
    code = main(["validate", str(tiny_bert_dir), "--reference", str(tiny_bert_dir), "--latency-runs", "0", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eval-text", "missing.txt"], "no such file"),
        (["--no-generative", "--new-tokens", "4"], "contradicts --new-tokens"),
        (["--min-top1-agreement", "2"], "must be in [0, 1]"),
    ],
)
def test_bad_generative_requests_are_one_line_errors(llama_int4, extra, message, capsys, tmp_path, monkeypatch):
    fp32, int4 = llama_int4
    monkeypatch.chdir(tmp_path)
    code = main(["validate", str(int4), "--reference", str(fp32), "--latency-runs", "0", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_missing_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["validate", str(tmp_path / "nope"), "--reference", str(tmp_path / "nope2"), "--eval-passages", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error: ")


def _report(generative: dict, **limits) -> ValidationReport:
    return ValidationReport({"providers": [], "generative": generative,
                             "thresholds": Thresholds(**limits).to_dict()})


def test_verdict_covers_only_what_ran():
    domain = {"passages": 2, "tokens": 10, "perplexity_reference": 10.0, "perplexity_quantized": 14.0,
              "perplexity_delta_pct": 40.0, "top1_agreement": 0.6, "top5_agreement": 0.9}
    ran = {"status": "ok", "source": "s", "skipped_domains": {"news": "not installed"}, "max_length": 8,
           "threads": 2, "domains": {"python-docs": domain}, "generation_skipped": "--new-tokens 0",
           "peak_rss_mb": 1.0}
    failed = _report(ran)
    assert len(failed.violations) == 2 and not failed.ok
    md = failed.to_markdown()
    assert "Text domain news NOT evaluated: not installed" in md and "speed not measured" in md
    assert _report(ran, max_ppl_increase_pct=None, min_top1_agreement=None).ok
    assert _report(ran, max_ppl_increase_pct=50, min_top1_agreement=0.5).ok
    skipped = _report({"status": "skipped", "reason": "no tokenizer"})
    assert skipped.ok and "Generative evaluation NOT run: no tokenizer" in skipped.to_markdown()
    assert "generative metrics" not in skipped.to_markdown()
    assert not Thresholds().active


def test_help_states_the_default_limits(capsys):
    from ortq.validate.report import DEFAULT_MAX_PPL_INCREASE_PCT, DEFAULT_MIN_TOP1_AGREEMENT

    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {DEFAULT_MAX_PPL_INCREASE_PCT:g})" in text and f"(default {DEFAULT_MIN_TOP1_AGREEMENT:g})" in text


def test_one_session_at_a_time_gives_the_same_generative_figures(llama_int4):
    from ortq.validate.generative import evaluate_generative

    fp32, int4 = llama_int4
    texts = {"t": ["The history of the city begins with a small port on the river.", "def f(x):\n    return x + 1"]}
    kw = {"max_length": 24, "prompts": ("Once upon a time",), "new_tokens": 3, "threads": 1}
    both = evaluate_generative(int4, fp32, texts, **kw)
    one = evaluate_generative(int4, fp32, texts, one_at_a_time=True, **kw)
    assert one["domains"] == both["domains"]
    assert one["generation"]["first_divergence"] == both["generation"]["first_divergence"]
    assert one["generation"]["continuation_lengths"] == both["generation"]["continuation_lengths"]
