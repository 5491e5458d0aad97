"""Tiny seeded transformers models of every supported architecture, and the export -> int8 -> int4 -> validate
run the coverage test and ``benchmarks/coverage.py`` measure them with.

Text models borrow MiniLM's tokenizer (see ``conftest._tokenizer``); vision models get a ViT image processor
saved beside them; Whisper has no tokenizer (its vocabulary is 500 ids). Weights are random (seed 0).
"""

from __future__ import annotations

import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
DECODER = {**TINY, "num_key_value_heads": 2, "max_position_embeddings": 256}
SEQ2SEQ = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
           "decoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}
VISION = {**TINY, "image_size": 32, "patch_size": 8}


def _text(tok) -> dict[str, Any]:
    return {"vocab_size": tok.vocab_size, "pad_token_id": tok.pad_token_id}


def _special(tok) -> dict[str, Any]:
    return {**_text(tok), "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id}


# name -> (config class, model class, config kwargs(tokenizer), task, needs a tokenizer)
ARCHITECTURES: dict[str, tuple[str, str, Callable[[Any], dict], str]] = {
    "bert": ("BertConfig", "BertModel", lambda t: {**TINY, **_text(t), "max_position_embeddings": 128},
             "feature-extraction"),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   lambda t: {"vocab_size": t.vocab_size, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64,
                              "max_position_embeddings": 128}, "feature-extraction"),
    "roberta": ("RobertaConfig", "RobertaModel", lambda t: {**TINY, **_text(t), "max_position_embeddings": 130},
                "feature-extraction"),
    "albert": ("AlbertConfig", "AlbertModel", lambda t: {**TINY, **_text(t), "embedding_size": 16,
                                                         "max_position_embeddings": 128}, "feature-extraction"),
    "deberta-v3": ("DebertaV2Config", "DebertaV2Model",
                   lambda t: {**TINY, **_text(t), "max_position_embeddings": 128, "relative_attention": True,
                              "position_buckets": 32, "pos_att_type": ["p2c", "c2p"], "type_vocab_size": 0,
                              "position_biased_input": False}, "feature-extraction"),
    "electra": ("ElectraConfig", "ElectraModel", lambda t: {**TINY, **_text(t), "embedding_size": 16,
                                                            "max_position_embeddings": 128}, "feature-extraction"),
    "mpnet": ("MPNetConfig", "MPNetModel", lambda t: {**TINY, **_text(t), "max_position_embeddings": 130},
              "feature-extraction"),
    "bert-classifier": ("BertConfig", "BertForSequenceClassification",
                        lambda t: {**TINY, **_text(t), "max_position_embeddings": 128, "num_labels": 3},
                        "text-classification"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             lambda t: {**_special(t), "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}, "causal-lm"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", lambda t: {**DECODER, **_special(t), "tie_word_embeddings": True},
              "causal-lm"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", lambda t: {**DECODER, **_special(t)}, "causal-lm"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", lambda t: {**DECODER, **_special(t)}, "causal-lm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", lambda t: {**DECODER, **_special(t)}, "causal-lm"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", lambda t: {**DECODER, **_special(t), "head_dim": 8}, "causal-lm"),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           lambda t: {**_text(t), "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                      "decoder_start_token_id": t.pad_token_id, "eos_token_id": t.sep_token_id}, "text2text-generation"),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             lambda t: {**SEQ2SEQ, **_special(t), "max_position_embeddings": 128,
                        "decoder_start_token_id": t.sep_token_id, "forced_eos_token_id": t.sep_token_id},
             "text2text-generation"),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration",
              lambda t: {**SEQ2SEQ, **_special(t), "max_position_embeddings": 128,
                         "decoder_start_token_id": t.sep_token_id}, "text2text-generation"),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                lambda t: {**SEQ2SEQ, "vocab_size": 500, "num_mel_bins": 16, "max_source_positions": 24,
                           "max_target_positions": 64, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3,
                           "decoder_start_token_id": 2, "suppress_tokens": [], "begin_suppress_tokens": []}, "automatic-speech-recognition"),
    "vit": ("ViTConfig", "ViTModel", lambda t: dict(VISION), "image-feature-extraction"),
    "vit-classifier": ("ViTConfig", "ViTForImageClassification", lambda t: {**VISION, "num_labels": 3},
                       "image-classification"),
    "deit": ("DeiTConfig", "DeiTModel", lambda t: dict(VISION), "image-feature-extraction"),
    "convnext": ("ConvNextConfig", "ConvNextModel",
                 lambda t: {"num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 1], "image_size": 32},
                 "image-feature-extraction"),
    "clip-vision": ("CLIPVisionConfig", "CLIPVisionModel", lambda t: dict(VISION), "image-feature-extraction"),
    "yolos": ("YolosConfig", "YolosModel",
              lambda t: {**TINY, "image_size": [32, 32], "patch_size": 8, "num_detection_tokens": 5},
              "image-feature-extraction"),
}
# Architectures with a stage that fails for a known reason: {name: reason} (xfail, not strict).
KNOWN_FAILURES: dict[str, str] = {}


def build(name: str, folder: Path, tokenizer, **overrides: Any) -> tuple[Path, str]:
    """Save the tiny ``name`` model (and its tokenizer / image processor) to ``folder``; return it and its task.

    ``overrides`` replace config arguments (e.g. a larger initialisation, so greedy tokens depend on the input).
    """
    import torch
    import transformers

    config_cls, model_cls, kwargs, task = ARCHITECTURES[name]
    config = getattr(transformers, config_cls)(**{**kwargs(tokenizer), **overrides})
    config.architectures = [model_cls]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if task.startswith("image"):
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    elif name != "whisper":
        tokenizer.save_pretrained(folder)
    return folder, task


def _stage(results: dict[str, Any], name: str, fn: Callable[[], Any], after: tuple[str, ...] = ()) -> Any:
    """Run one stage unless a stage it needs (``build``, ``export`` and ``after``) did not end ``ok``; record
    ``ok`` / ``error: <OrtqError>`` / ``internal error: <exception>`` / ``skipped ...``."""
    from ortq.errors import OrtqError

    needs = [s for s in ("build", "export", *after) if s in results and s != name]
    if any(results[s] != "ok" for s in needs):
        results[name] = "skipped (an earlier stage failed)"
        return None
    try:
        out = fn()
    except OrtqError as exc:
        results[name] = f"error: {str(exc).splitlines()[0][:200]}"
        return None
    except Exception as exc:  # a bug: the coverage run says so instead of stopping
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        results[name] = f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''} " \
                        f"({Path(frame.filename).name}:{frame.lineno})"
        return None
    results[name] = "ok"
    return out


def run_pipeline(name: str, work: Path, tokenizer, images: Path | None) -> dict[str, Any]:
    """export -> int8 -> int4 -> validate (both) for the tiny ``name``; every stage's outcome and figures."""
    from ortq import AutoQuantizationConfig, WeightOnlyConfig
    from ortq.export import export
    from ortq.quantizer import ORTQuantizer
    from ortq.seq2seq import quantize_seq2seq, validate_seq2seq
    from ortq.validate import validate

    shutil.rmtree(work, ignore_errors=True)
    task = ARCHITECTURES[name][3]
    results: dict[str, Any] = {"architecture": name, "task": task}
    built = _stage(results, "build", lambda: build(name, work / "src", tokenizer))
    if built is None:
        return results
    src = built[0]
    seq2seq = task in ("text2text-generation", "automatic-speech-recognition")
    data = str(images) if task.startswith("image") else None
    fp32, int8, int4 = work / "fp32", work / "int8", work / "int4"
    exported = _stage(results, "export", lambda: export(src, fp32))
    if exported is not None:
        results["parity_max_abs_diff"] = exported.max_abs_diff
    int8_config = AutoQuantizationConfig.for_host()
    int4_config = WeightOnlyConfig(bits=4, block_size=16)
    if seq2seq:
        _stage(results, "int8", lambda: quantize_seq2seq(fp32, int8, int8_config, num_samples=8, max_new_tokens=8))
        _stage(results, "int4", lambda: quantize_seq2seq(fp32, int4, int4_config, num_samples=8, max_new_tokens=8))
        for bits, folder in (("int8", int8), ("int4", int4)):
            agreement = _stage(results, f"validate_{bits}",
                               lambda folder=folder: validate_seq2seq(folder, fp32, num_samples=8, max_new_tokens=8),
                               after=(bits,))
            if agreement is not None:
                results[f"{bits}_token_agreement"] = agreement.token_agreement
                results[f"{bits}_token_error_rate"] = agreement.token_error_rate
        return results

    def quantize(config, out):
        quantizer = ORTQuantizer.from_pretrained(fp32)
        quantizer.show_progress = False
        calibration = data if data is not None else None
        if calibration is None and config is int8_config:
            from ortq.data import real_text

            calibration = real_text("calibration", 16)
        return quantizer.quantize(config, out, calibration_data=calibration)

    _stage(results, "int8", lambda: quantize(int8_config, int8))
    _stage(results, "int4", lambda: quantize(int4_config, int4))
    for bits, folder in (("int8", int8), ("int4", int4)):
        report = _stage(results, f"validate_{bits}", lambda folder=folder: validate(
            folder, fp32, data, num_samples=16, latency_runs=1, warmup_runs=1, placement=False), after=(bits,))
        if report is not None:
            row = report.to_dict()["providers"]
            cpu = row[0] if isinstance(row, list) else row.get("cpu", {})
            results[f"{bits}_cosine"] = (cpu.get("fidelity") or {}).get("cosine")
    return results
