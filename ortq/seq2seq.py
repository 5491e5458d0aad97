"""Quantize and validate an encoder-decoder export (encoder, decoder, decoder with past) file by file.

    quantize_seq2seq("t5-fp32/", "t5-int8/", AutoQuantizationConfig.for_host(), data=real_text("calibration", 32))
    agreement = validate_seq2seq("t5-int8/", "t5-fp32/", real_text("heldout", 32))

Each file is calibrated on the activations it sees in generation: the encoder on the calibration inputs; the
first-step decoder on the fp32 encoder's real ``encoder_hidden_states`` with the fp32 model's greedy output fed
teacher-forced (start token + generated tokens); the decoder with past on the feeds of the fp32 greedy loop
itself (one token, the caches of the steps before). The whole generation is then judged against the fp32
export: exact match, token agreement, first divergence and token error rate (:class:`GenerationAgreement`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ortq.config import CalibrationConfig, QuantizationConfig, WeightOnlyConfig
from ortq.data import real_text
from ortq.errors import CalibrationDataError, ConfigError
from ortq.generate_seq2seq import (
    DECODER_FILE,
    DECODER_WITH_PAST_FILE,
    ENCODER_FILE,
    GenerationAgreement,
    Seq2SeqGenerator,
    compare_generations,
)
from ortq.io import atomic_output_dir, check_output_dir, copy_side_files
from ortq.quantizer import ORTQuantizer

logger = logging.getLogger(__name__)

FILES = (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)
REPORTS_DIR = "quantization"


def encoder_batches(generator: Seq2SeqGenerator, data: Any, num_samples: int, batch_size: int) -> list[dict]:
    """Encoder feeds in batches from texts, an ``input_features`` array (or ``.npz``), or None (defaults:
    real English sentences for text; seeded normal features for speech)."""
    speech = "input_features" in generator.encoder_inputs
    if isinstance(data, (str, os.PathLike)) and Path(data).suffix == ".npz":
        with np.load(data) as npz:
            data = {k: npz[k] for k in npz.files}
    if isinstance(data, dict):
        if "input_features" in data:
            data = np.asarray(data["input_features"])
        else:
            n = len(next(iter(data.values())))
            return [{k: np.asarray(v[i:i + batch_size]) for k, v in data.items()}
                    for i in range(0, min(n, num_samples), batch_size)]
    if data is None:
        if speech:
            spec = generator.encoder_inputs["input_features"]
            dims = [d if d is not None else 1 for d in spec.dims[1:]]
            data = np.random.default_rng(0).standard_normal((num_samples, *dims)).astype(np.float32)
        else:
            data = real_text("calibration", num_samples)
    if isinstance(data, np.ndarray):
        if not speech:
            raise CalibrationDataError("this encoder takes text; give sentences, not a feature array")
        data = data[:num_samples]
        return [{"input_features": data[i:i + batch_size].astype(np.float32)} for i in range(0, len(data), batch_size)]
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise CalibrationDataError(f"{path}: no such file")
        data = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    texts = [t for t in list(data)[:num_samples] if isinstance(t, str) and t.strip()]
    if not texts:
        raise CalibrationDataError("no calibration samples (give sentences, or input_features for speech)")
    return [generator.encoder_feeds(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]


def calibration_feeds(reference: str | os.PathLike, data: Any = None, *, num_samples: int = 32,
                      max_new_tokens: int = 16, batch_size: int = 8) -> dict[str, list[dict[str, np.ndarray]]]:
    """Feeds per file, from the fp32 export's own generation on ``data`` (see the module docstring)."""
    generator = Seq2SeqGenerator(reference)
    start, pad = generator.settings["start"], generator.settings["pad"]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {f: [] for f in FILES}
    for enc in encoder_batches(generator, data, num_samples, batch_size):
        feeds[ENCODER_FILE].append(enc)
        trace: list[dict[str, np.ndarray]] = []
        tokens = generator.decode(enc, max_new_tokens, trace=trace)
        width = max(len(t) for t in tokens)
        ids = np.full((len(tokens), width + 1), pad, dtype=np.int64)
        ids[:, 0] = start
        for i, t in enumerate(tokens):
            ids[i, 1:1 + len(t)] = t
        first = {"input_ids": ids, "encoder_hidden_states": generator.run_encoder(enc)}
        if "attention_mask" in enc:
            first["encoder_attention_mask"] = enc["attention_mask"].astype(np.int64)
        feeds[DECODER_FILE].append(first)
        feeds[DECODER_WITH_PAST_FILE].extend(trace[:: max(1, len(trace) // 4)])  # early, middle and late steps
    if not feeds[DECODER_WITH_PAST_FILE]:
        raise CalibrationDataError("generation ended after one token on every sample: nothing to calibrate "
                                   "the decoder with past on; raise max_new_tokens or give other samples")
    return feeds


def quantize_seq2seq(reference: str | os.PathLike, output_dir: str | os.PathLike,
                     config: QuantizationConfig | WeightOnlyConfig, data: Any = None, *,
                     calibration_config: CalibrationConfig | None = None, num_samples: int = 32,
                     max_new_tokens: int = 16, overwrite: bool = False) -> Path:
    """Quantize the three files of ``reference`` into ``output_dir``, each calibrated on its own activations.

    ``output_dir`` gets the three ``.onnx`` files, the tokenizer / config files and, under ``quantization/``,
    each file's ``quantization_report.json`` and ``ortq_config.json``. Written atomically.
    """
    if not isinstance(config, (QuantizationConfig, WeightOnlyConfig)):
        raise ConfigError(f"unsupported quantization config {type(config).__name__}")
    reference = Path(reference)
    out = check_output_dir(output_dir, inputs=(reference,), overwrite=overwrite)
    feeds = calibration_feeds(reference, data, num_samples=num_samples, max_new_tokens=max_new_tokens)
    with atomic_output_dir(out, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory(dir=tmp) as scratch:
        for file_name in FILES:
            quantizer = ORTQuantizer.from_pretrained(reference, file_name=file_name)
            quantizer.show_progress = False
            stem = file_name.removesuffix(".onnx")
            sub = Path(scratch) / stem
            quantizer.quantize(config, sub, calibration_data=feeds[file_name],
                               calibration_config=calibration_config, file_name=file_name)
            for f in sub.iterdir():
                if f.name.startswith(file_name):
                    shutil.move(str(f), tmp / f.name)
                elif f.suffix == ".json" and not (reference / f.name).is_file():
                    (tmp / REPORTS_DIR / stem).mkdir(parents=True, exist_ok=True)
                    shutil.move(str(f), tmp / REPORTS_DIR / stem / f.name)
            logger.info("%s quantized on %d calibration batches", file_name, len(feeds[file_name]))
        copy_side_files(reference, tmp)
    return out


def validate_seq2seq(candidate: str | os.PathLike, reference: str | os.PathLike, data: Any = None, *,
                     num_samples: int = 32, max_new_tokens: int = 16, batch_size: int = 8) -> GenerationAgreement:
    """Greedy generation of ``candidate`` against ``reference`` on held-out ``data`` (default: real held-out
    sentences for text; seeded features, other than calibration's, for speech)."""
    ref, cand = Seq2SeqGenerator(reference), Seq2SeqGenerator(candidate)
    if data is None and "input_features" in ref.encoder_inputs:
        spec = ref.encoder_inputs["input_features"]
        dims = [d if d is not None else 1 for d in spec.dims[1:]]
        data = np.random.default_rng(1).standard_normal((num_samples, *dims)).astype(np.float32)
    elif data is None:
        data = real_text("heldout", num_samples)
    ref_tokens: list[list[int]] = []
    cand_tokens: list[list[int]] = []
    for enc in encoder_batches(ref, data, num_samples, batch_size):
        ref_tokens += ref.decode(enc, max_new_tokens)
        cand_tokens += cand.decode(enc, max_new_tokens)
    agreement = compare_generations(ref_tokens, cand_tokens)
    logger.info("generation agreement: %s", agreement)
    return agreement
