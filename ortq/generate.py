"""Text generation with a decoder exported with its KV cache: greedy or sampled, on ONNX Runtime or through
onnxruntime-genai, with prefill and decode speed measured apart.

    generator = Generator("int4/")                      # a folder written by `ortq export` / `ortq quantize`
    result = generator.generate("The capital of France is", max_new_tokens=32)
    print(result.text, result.decode_tokens_per_s)

The ONNX Runtime loop feeds the prompt once (past length 0), then one token per step with the cache the previous
step returned; the attention mask covers past and new tokens and ``position_ids`` continue from the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ortq.data import graph_inputs, load_tokenizer
from ortq.errors import ConfigError, ModelError, require
from ortq.io import resolve_model_path
from ortq.runtime import SessionSettings, create_session
from ortq.tasks import is_past_input

logger = logging.getLogger(__name__)

ENGINES = ("ort", "genai")


def context_length(folder: str | os.PathLike) -> int | None:
    """The context a decoder folder's ``config.json`` gives (positions it was trained for), or None."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    return None


@dataclasses.dataclass
class GenerationResult:
    """What one call of :meth:`Generator.generate` produced, and how fast.

    Attributes:
        prompt_ids: the prompt's token ids.
        token_ids: the generated token ids (the prompt excluded; an end-of-sequence token included).
        text: the generated text (special tokens skipped), or None without a tokenizer.
        prefill_seconds: time of the prompt's pass (to the first token's logits).
        decode_seconds: time of the remaining steps.
        engine: ``ort`` or ``genai``.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    prefill_seconds: float
    decode_seconds: float
    engine: str

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        steps = len(self.token_ids) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Greedy when ``do_sample`` is False; else temperature, top-k (0: off) and top-p (1: off) sampling."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")


def _choose(logits: np.ndarray, sampling: SamplingConfig, rng: np.random.Generator) -> int:
    if not sampling.do_sample:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.partition(z, -sampling.top_k)[-sampling.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < sampling.top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


class Generator:
    """Generates text with the decoder in ``folder`` (``model.onnx`` with ``past_key_values.*`` inputs).

    Args:
        folder: an exported or quantized folder, or its ``.onnx`` file.
        provider: ``cpu`` / ``cuda`` / ``tensorrt`` (ONNX Runtime engine).
        threads: intra-op threads (None: ONNX Runtime's default).
        engine: ``ort`` (ortq's loop on ONNX Runtime) or ``genai`` (onnxruntime-genai; needs
            ``genai_config.json``, which ``ortq export`` writes).
    """

    def __init__(self, folder: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None,
                 engine: str = "ort"):
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self.path = resolve_model_path(folder)
        self.folder = self.path.parent
        self.engine = engine
        specs = graph_inputs(self.path)
        self.past = [s for name, s in specs.items() if is_past_input(name)]
        if not self.past or "input_ids" not in specs:
            raise ModelError(
                f"{self.path}: no KV-cache inputs (past_key_values.*): this graph recomputes the whole prefix "
                "for every token; export the model with `ortq export MODEL --task causal-lm`"
            )
        self.inputs = specs
        self.context_length = context_length(self.folder)
        self.tokenizer = load_tokenizer(self.folder)
        self.eos = self._eos_ids()
        if engine == "genai":
            og = require("onnxruntime_genai", "llm")
            if not (self.folder / "genai_config.json").is_file():
                raise ModelError(f"{self.folder}: no genai_config.json; export the model again with `ortq export`")
            self._genai = og.Model(str(self.folder))
            self.session = None
        else:
            self.session = create_session(
                self.path, provider=provider, settings=SessionSettings(threads=threads), what=str(self.path)
            )

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            path = self.folder / name
            if path.is_file():
                value = json.loads(path.read_text()).get("eos_token_id")
                ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return {int(i) for i in ids}

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.folder}: no tokenizer files; pass the prompt as token ids")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ConfigError("the prompt is empty")
        return ids

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.context_length is None:
            return
        if prompt_len >= self.context_length:
            raise ConfigError(
                f"the prompt has {prompt_len} tokens; the model's context is {self.context_length} tokens"
            )
        if prompt_len + max_new_tokens > self.context_length:
            raise ConfigError(
                f"{prompt_len} prompt tokens + {max_new_tokens} new tokens exceed the model's context of "
                f"{self.context_length} tokens (the KV cache would grow past what the model was trained for)"
            )

    def generate(self, prompt: str | list[int], max_new_tokens: int = 32,
                 sampling: SamplingConfig | None = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt``; stops early at an end-of-sequence token."""
        sampling = sampling or SamplingConfig()
        ids = self.encode(prompt)
        self._check_length(len(ids), max_new_tokens)
        if self.engine == "genai":
            tokens, prefill, decode = self._generate_genai(ids, max_new_tokens, sampling)
        else:
            tokens, prefill, decode = self._generate_ort(ids, max_new_tokens, sampling)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationResult(ids, tokens, text, prefill, decode, self.engine)

    def step(self, input_ids: np.ndarray, past: list[np.ndarray], past_length: int) -> tuple[np.ndarray, list]:
        """One run of the decoder: logits of the last position and the new cache."""
        batch, n = input_ids.shape
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids.astype(self.inputs["input_ids"].dtype)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((batch, past_length + n), self.inputs["attention_mask"].dtype)
        if "position_ids" in self.inputs:
            pos = np.arange(past_length, past_length + n)[None].repeat(batch, 0)
            feeds["position_ids"] = pos.astype(self.inputs["position_ids"].dtype)
        feeds.update({spec.name: value for spec, value in zip(self.past, past, strict=True)})
        outs = self.session.run(None, feeds)
        return outs[0][:, -1], list(outs[1:])

    def _generate_ort(self, ids: list[int], max_new: int, sampling: SamplingConfig):
        rng = np.random.default_rng(sampling.seed)
        past = [spec.empty_past(1) for spec in self.past]
        t0 = time.perf_counter()
        logits, past = self.step(np.asarray([ids]), past, 0)
        tokens = [_choose(logits[0], sampling, rng)]
        t1 = time.perf_counter()
        while len(tokens) < max_new and tokens[-1] not in self.eos:
            logits, past = self.step(np.asarray([[tokens[-1]]]), past, len(ids) + len(tokens) - 1)
            tokens.append(_choose(logits[0], sampling, rng))
        return tokens, t1 - t0, time.perf_counter() - t1

    def _generate_genai(self, ids: list[int], max_new: int, sampling: SamplingConfig):
        import onnxruntime_genai as og

        params = og.GeneratorParams(self._genai)
        options: dict[str, Any] = {"max_length": len(ids) + max_new, "do_sample": sampling.do_sample}
        if sampling.do_sample:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p)
            if sampling.seed is not None:
                options["random_seed"] = int(sampling.seed)
        params.set_search_options(**options)
        generator = og.Generator(self._genai, params)
        t0 = time.perf_counter()
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while not generator.is_done() and len(tokens) < max_new and tokens[-1] not in self.eos:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, t1 - t0, time.perf_counter() - t1


def generate(folder: str | os.PathLike, prompt: str | list[int], max_new_tokens: int = 32, *,
             sampling: SamplingConfig | None = None, **kwargs: Any) -> GenerationResult:
    """One-shot :class:`Generator` ``(folder, **kwargs).generate(prompt, max_new_tokens, sampling)``."""
    return Generator(folder, **kwargs).generate(prompt, max_new_tokens, sampling)

