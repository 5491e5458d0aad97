"""Greedy generation with an encoder-decoder exported as three files (:mod:`ortq.export.seq2seq`).

    generator = Seq2SeqGenerator("t5-int8/")
    result = generator.generate(["translate English to German: Hello"], max_new_tokens=20)
    print(result.token_ids, result.texts)

The encoder runs once; the first-step decoder takes the decoder start token and the encoder's states and returns
the logits plus both caches; every later step feeds one token to the decoder with past, with the cross-attention
cache of the first step and the self-attention cache of the previous one. The logits processors that
transformers' greedy ``generate`` applies by default are reproduced (forced BOS / EOS, suppressed tokens,
suppressed tokens at the first step), so on an fp32 export the tokens equal ``model.generate``'s.

:func:`compare_generations` puts two token lists side by side: token agreement, first divergence and a
token error rate (edit distance / reference length, the WER of tokens).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ortq.data import graph_inputs, load_tokenizer
from ortq.errors import ConfigError, ModelError
from ortq.runtime import SessionSettings, create_session

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
DECODER_WITH_PAST_FILE = "decoder_with_past_model.onnx"
_UNSUPPORTED = {"num_beams": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0, "min_length": 0,
                "min_new_tokens": None}


@dataclasses.dataclass
class Seq2SeqResult:
    """What :meth:`Seq2SeqGenerator.generate` produced for a batch.

    Attributes:
        token_ids: per sample, the generated ids (the decoder start token excluded; the end-of-sequence token
            included when it came; nothing after it).
        texts: the decoded texts (special tokens skipped), or None without a tokenizer.
    """

    token_ids: list[list[int]]
    texts: list[str] | None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


class Seq2SeqGenerator:
    """Greedy decoding over ``encoder_model.onnx``, ``decoder_model.onnx`` and ``decoder_with_past_model.onnx``.

    Args:
        folder: a folder written by ``export`` (task text2text-generation / automatic-speech-recognition) or by
            :func:`ortq.seq2seq.quantize_seq2seq`.
        provider: ``cpu`` / ``cuda`` / ``tensorrt``.
        threads: intra-op threads per session (None: ONNX Runtime's default).
    """

    def __init__(self, folder: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None):
        self.folder = Path(folder)
        missing = [f for f in (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE) if not (self.folder / f).is_file()]
        if missing:
            raise ModelError(
                f"{self.folder}: no {', '.join(missing)}; export an encoder-decoder with "
                "`ortq export MODEL --task text2text-generation` (or automatic-speech-recognition)"
            )
        settings = SessionSettings(threads=threads)
        self.sessions = {
            f: create_session(self.folder / f, provider=provider, settings=settings, what=str(self.folder / f))
            for f in (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)
        }
        self.encoder_inputs = graph_inputs(self.folder / ENCODER_FILE)
        self.past_inputs = [n for n in graph_inputs(self.folder / DECODER_WITH_PAST_FILE) if n.startswith("past_")]
        self.first_outputs = [o.name for o in self.sessions[DECODER_FILE].get_outputs()]
        self.tokenizer = load_tokenizer(self.folder) if "input_ids" in self.encoder_inputs else None
        self.settings = self._generation_settings()

    def _generation_settings(self) -> dict[str, Any]:
        config: dict[str, Any] = {}
        for name in ("config.json", "generation_config.json"):  # the generation config wins
            path = self.folder / name
            if path.is_file():
                config.update({k: v for k, v in json.loads(path.read_text()).items() if v is not None})
        if "decoder_start_token_id" not in config:
            raise ModelError(f"{self.folder}: config.json has no decoder_start_token_id")
        for key, default in _UNSUPPORTED.items():
            if config.get(key, default) not in (default, None):
                logger.warning("%s=%r is ignored: this loop is greedy without it", key, config[key])
        start = config["decoder_start_token_id"]
        return {
            "start": int(start[0] if isinstance(start, list) else start),
            "eos": set(_ids(config.get("eos_token_id"))),
            "pad": int(config.get("pad_token_id") or 0),
            "forced_bos": config.get("forced_bos_token_id"),
            "forced_eos": _ids(config.get("forced_eos_token_id")),
            "suppress": _ids(config.get("suppress_tokens")),
            "begin_suppress": _ids(config.get("begin_suppress_tokens")),
        }

    # ------------------------------------------------------------------------------------------------ inputs

    def encoder_feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """Encoder feeds from texts (tokenized with the folder's tokenizer), a feature array or a feed dict."""
        if isinstance(inputs, dict):
            return {k: np.asarray(v) for k, v in inputs.items() if k in self.encoder_inputs}
        if isinstance(inputs, np.ndarray):
            if "input_features" not in self.encoder_inputs:
                raise ConfigError("this encoder takes text (input_ids); pass strings or a feed dict")
            return {"input_features": inputs.astype(np.float32)}
        if isinstance(inputs, str):
            inputs = [inputs]
        if self.tokenizer is None:
            raise ConfigError(f"{self.folder}: no tokenizer; pass encoder feeds (a dict of arrays)")
        enc = self.tokenizer(list(inputs), padding="longest", return_tensors="np")
        return {n: np.asarray(enc[n]).astype(self.encoder_inputs[n].dtype) for n in self.encoder_inputs}

    # ------------------------------------------------------------------------------------------- generation

    def _process(self, logits: np.ndarray, length: int, max_length: int) -> np.ndarray:
        """transformers' default greedy logits processors; ``length`` counts the decoder start token."""
        s = self.settings
        logits = logits.astype(np.float32, copy=True)
        if s["suppress"]:
            logits[:, s["suppress"]] = -np.inf
        if length == 1 and s["begin_suppress"]:
            logits[:, s["begin_suppress"]] = -np.inf
        if length == 1 and s["forced_bos"] is not None:
            logits[:] = -np.inf
            logits[:, int(s["forced_bos"])] = 0
        if length == max_length - 1 and s["forced_eos"]:
            logits[:] = -np.inf
            logits[:, s["forced_eos"]] = 0
        return logits

    def run_encoder(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.sessions[ENCODER_FILE].run(["last_hidden_state"], feeds)[0]

    def generate(self, inputs: Any, max_new_tokens: int = 20) -> Seq2SeqResult:
        """Greedy decoding of up to ``max_new_tokens`` per sample; a finished sample is padded with pad ids."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        feeds = self.encoder_feeds(inputs)
        tokens = self.decode(feeds, max_new_tokens)
        texts = ([self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
                 if self.tokenizer is not None else None)
        return Seq2SeqResult(tokens, texts)

    def decode(self, encoder_feeds: dict[str, np.ndarray], max_new_tokens: int,
               trace: list[dict[str, np.ndarray]] | None = None) -> list[list[int]]:
        """The greedy loop; with ``trace``, every decoder-with-past feed is appended to it (calibration)."""
        s = self.settings
        hidden = self.run_encoder(encoder_feeds)
        batch = hidden.shape[0]
        mask = encoder_feeds.get("attention_mask")
        max_length = max_new_tokens + 1
        ids = np.full((batch, 1), s["start"], dtype=np.int64)
        first = {"input_ids": ids, "encoder_hidden_states": hidden}
        if mask is not None:
            first["encoder_attention_mask"] = mask.astype(np.int64)
        outs = dict(zip(self.first_outputs, self.sessions[DECODER_FILE].run(None, first), strict=True))
        past = {n: outs[n.replace("past_key_values", "present")] for n in self.past_inputs}
        done = np.zeros(batch, dtype=bool)
        generated: list[np.ndarray] = []
        logits = outs["logits"][:, -1]
        while True:
            nxt = np.argmax(self._process(logits, len(generated) + 1, max_length), axis=-1)
            nxt = np.where(done, s["pad"], nxt)
            generated.append(nxt)
            done |= np.isin(nxt, list(s["eos"]))
            if done.all() or len(generated) >= max_new_tokens:
                break
            step = {"input_ids": nxt[:, None].astype(np.int64), **past}
            if mask is not None:
                step["encoder_attention_mask"] = mask.astype(np.int64)
            if trace is not None:
                trace.append(step)
            names = [o.name for o in self.sessions[DECODER_WITH_PAST_FILE].get_outputs()]
            outs = dict(zip(names, self.sessions[DECODER_WITH_PAST_FILE].run(None, step), strict=True))
            logits = outs["logits"][:, -1]
            past = {n: outs[n.replace("past_key_values", "present")] if ".decoder." in n else past[n]
                    for n in self.past_inputs}
        rows = np.stack(generated, axis=1)
        out = []
        for row in rows:
            seq = []
            for t in row.tolist():
                seq.append(int(t))
                if t in s["eos"]:
                    break
            out.append(seq)
        return out


# --------------------------------------------------------------------------------------------- agreement


def _edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@dataclasses.dataclass(frozen=True)
class GenerationAgreement:
    """How a candidate's greedy tokens follow the reference's, over samples.

    Attributes:
        num_samples: samples compared.
        exact_match: share of samples whose token sequences are equal.
        token_agreement: share of reference positions where the candidate has the same token (positions after
            the first divergence count too: a later re-synchronisation is agreement).
        first_divergence_mean: mean index of the first differing token (a sequence's length when none differs).
        first_divergence_min: the earliest first divergence over samples.
        token_error_rate: summed edit distance / summed reference length (the WER of tokens).
    """

    num_samples: int
    exact_match: float
    token_agreement: float
    first_divergence_mean: float
    first_divergence_min: int
    token_error_rate: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare_generations(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> GenerationAgreement:
    """Agreement of ``candidate`` token lists with ``reference`` ones, sample by sample."""
    if len(reference) != len(candidate) or not reference:
        raise ConfigError(f"compare_generations needs equally many samples, got {len(reference)} and {len(candidate)}")
    same = agree = total = errors = 0
    firsts = []
    for ref, cand in zip(reference, candidate, strict=True):
        same += list(ref) == list(cand)
        agree += sum(a == b for a, b in zip(ref, cand, strict=False))
        total += len(ref)
        errors += _edit_distance(ref, cand)
        first = next((i for i, (a, b) in enumerate(zip(ref, cand, strict=False)) if a != b), None)
        if first is None:
            first = min(len(ref), len(cand)) if len(ref) != len(cand) else len(ref)
        firsts.append(first)
    n = len(reference)
    return GenerationAgreement(
        num_samples=n,
        exact_match=same / n,
        token_agreement=agree / max(total, 1),
        first_divergence_mean=float(np.mean(firsts)),
        first_divergence_min=int(min(firsts)),
        token_error_rate=errors / max(total, 1),
    )
