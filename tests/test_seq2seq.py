"""Encoder-decoders: three files in Optimum's layout, parity per file, greedy generation equal to
``model.generate`` on fp32, per-file int8 with agreement figures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import _tokenizer
from tiny_models import build

from ortq import AutoQuantizationConfig
from ortq.errors import ConfigError, ModelError
from ortq.export import export
from ortq.generate_seq2seq import Seq2SeqGenerator, compare_generations
from ortq.seq2seq import calibration_feeds, quantize_seq2seq, validate_seq2seq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello!", "A model is exported once and deployed many times.",
         "Quantization makes it smaller and faster."]
FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A tiny T5 with a large initialisation, so that its greedy tokens depend on the input; and its export."""
    root = tmp_path_factory.mktemp("t5")
    src, _ = build("t5", root / "src", _tokenizer(), initializer_factor=8.0)
    return src, export(src, root / "onnx")


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    root = tmp_path_factory.mktemp("whisper")
    src, _ = build("whisper", root / "src", None, init_std=0.2)
    return src, export(src, root / "onnx")


def _hf_tokens(model, enc, n, eos) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, num_beams=1)
    rows = []
    for row in out[:, 1:].tolist():  # the decoder start token is not generated
        seq = []
        for t in row:
            seq.append(t)
            if t in eos:
                break
        rows.append(seq)
    return rows


def test_t5_files_names_and_parity(t5):
    _, result = t5
    assert result.task == "text2text-generation"
    assert set(FILES) <= set(result.files) and "tokenizer.json" in result.files
    for name in FILES:
        graph = result.graphs[name]
        assert graph["max_rel_diff"] < 1e-4, name  # each file against transformers
        onnx.checker.check_model(str(result.output_dir / name))
    assert result.graphs["encoder_model.onnx"]["inputs"] == ("input_ids", "attention_mask")
    assert result.graphs["decoder_model.onnx"]["inputs"] == ("input_ids", "encoder_hidden_states",
                                                           "encoder_attention_mask")
    past = result.graphs["decoder_with_past_model.onnx"]
    assert past["inputs"][:4] == ("input_ids", "encoder_attention_mask", "past_key_values.0.decoder.key",
                                  "past_key_values.0.decoder.value")
    assert "past_key_values.1.encoder.value" in past["inputs"]
    assert past["outputs"] == ("logits", "present.0.decoder.key", "present.0.decoder.value", "present.1.decoder.key",
                               "present.1.decoder.value")
    assert "present.1.encoder.key" in result.graphs["decoder_model.onnx"]["outputs"]


def test_t5_greedy_equals_generate(t5):
    src, result = t5
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(src).eval()
    generator = Seq2SeqGenerator(result.output_dir)
    enc = generator.tokenizer(TEXTS, padding="longest", return_tensors="pt")
    enc.pop("token_type_ids", None)
    expected = _hf_tokens(model, enc, 12, generator.settings["eos"])
    got = generator.generate(TEXTS, max_new_tokens=12)
    assert got.token_ids == expected
    assert len({tuple(t) for t in expected}) > 1  # the tokens depend on the input: the test means something
    assert got.texts is not None and len(got.texts) == len(TEXTS)


@pytest.mark.slow
def test_bart_forced_eos_greedy_equals_generate(tmp_path):
    src, _ = build("bart", tmp_path / "src", _tokenizer(), init_std=0.2)
    result = export(src, tmp_path / "onnx")
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(src).eval()
    generator = Seq2SeqGenerator(result.output_dir)
    enc = generator.tokenizer(TEXTS[:2], padding="longest", return_tensors="pt")
    enc.pop("token_type_ids", None)
    assert generator.generate(TEXTS[:2], 6).token_ids == _hf_tokens(model, enc, 6, generator.settings["eos"])


def test_whisper_export_and_greedy(whisper):
    src, result = whisper
    assert result.task == "automatic-speech-recognition"
    assert result.graphs["encoder_model.onnx"]["inputs"] == ("input_features",)
    assert result.graphs["decoder_model.onnx"]["inputs"] == ("input_ids", "encoder_hidden_states")
    model = transformers.WhisperForConditionalGeneration.from_pretrained(src).eval()
    features = np.random.default_rng(0).standard_normal((2, 16, 48)).astype(np.float32)
    with torch.no_grad():  # transformers' plain greedy loop (Whisper's own adds language / timestamp logic)
        out = transformers.GenerationMixin.generate(model, input_features=torch.from_numpy(features),
                                                    max_new_tokens=8, do_sample=False, num_beams=1)
    expected = [row[: row.index(3) + 1] if 3 in row else row for row in out[:, 1:].tolist()]
    assert Seq2SeqGenerator(result.output_dir).generate(features, 8).token_ids == expected


def test_t5_int8_per_file_calibration_and_agreement(t5, tmp_path):
    _, result = t5
    feeds = calibration_feeds(result.output_dir, TEXTS, num_samples=4, max_new_tokens=6)
    first = feeds["decoder_model.onnx"][0]
    assert first["encoder_hidden_states"].shape[:2] == feeds["encoder_model.onnx"][0]["input_ids"].shape
    assert first["input_ids"].shape[1] > 1  # teacher-forced greedy tokens, not the start token alone
    assert feeds["decoder_with_past_model.onnx"][0]["input_ids"].shape[1] == 1

    out = quantize_seq2seq(result.output_dir, tmp_path / "int8", AutoQuantizationConfig.for_host(), TEXTS,
                           num_samples=4, max_new_tokens=6)
    for name in FILES:
        model = onnx.load(str(out / name))
        onnx.checker.check_model(model)
        assert any(n.op_type == "DequantizeLinear" for n in model.graph.node), name
        report = json.loads((out / "quantization" / name.removesuffix(".onnx") / "quantization_report.json").read_text())
        assert report
    agreement = validate_seq2seq(out, result.output_dir, TEXTS, max_new_tokens=6)
    assert agreement.num_samples == len(TEXTS)
    assert 0.0 <= agreement.token_agreement <= 1.0 and 0 <= agreement.first_divergence_min <= 6
    same = validate_seq2seq(result.output_dir, result.output_dir, TEXTS, max_new_tokens=6)
    assert same.exact_match == 1.0 and same.token_error_rate == 0.0


def test_compare_generations_known_answer():
    a = compare_generations([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6]])
    assert a.exact_match == 0.5
    assert a.token_agreement == pytest.approx(5 / 6)
    assert a.first_divergence_min == 2 and a.first_divergence_mean == 2.0
    assert a.token_error_rate == pytest.approx(1 / 6)
    b = compare_generations([[1, 2, 3]], [[1, 2]])  # a dropped token: one edit, diverges at 2
    assert b.token_error_rate == pytest.approx(1 / 3) and b.first_divergence_min == 2
    with pytest.raises(ConfigError):
        compare_generations([[1]], [])


def test_generator_refuses_a_single_file_export(tiny_bert_dir):
    with pytest.raises(ModelError, match="text2text-generation"):
        Seq2SeqGenerator(tiny_bert_dir)


def test_seq2seq_task_aliases():
    from ortq.tasks import normalize_task

    assert normalize_task("text2text-generation-with-past") == "text2text-generation"
    assert normalize_task("automatic-speech-recognition-with-past") == "automatic-speech-recognition"
