"""Validation of generative (decoder-only) models: what a user of a quantized language model sees.

:func:`evaluate_generative` runs a quantized decoder and its fp32 reference over the same held-out passages
(one passage per run, no padding, an empty KV cache) and reports, per text domain,

* perplexity of each model and the quantized model's change in percent;
* next-token agreement with fp32: top-1 (same argmax) and top-5 (fp32's argmax within the quantized top 5);

and, over a few prompts, greedy continuations with :class:`ortq.generate.Generator` (the position of the first
token where the quantized model leaves the fp32 continuation), prefill and decode tokens per second of both
models (warm, alternated A B A B, the threads fixed) and the peak RSS of the process. Graphs with
``past_key_values.*`` inputs get an empty cache; graphs without a cache work for the perplexity part.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ortq.data import graph_inputs, load_tokenizer
from ortq.errors import ConfigError, ModelError
from ortq.generate import Generator
from ortq.io import resolve_model_path
from ortq.runtime import SessionSettings, create_session
from ortq.tasks import is_past_input

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "The history of the city begins",
    "def read_config(path):",
    "Scientists announced on Tuesday that",
    "Once upon a time, in a small village,",
)


@dataclass
class _Agreement:
    nll: dict[str, float] = field(default_factory=lambda: {"reference": 0.0, "quantized": 0.0})
    tokens: int = 0
    top1: int = 0
    top5: int = 0

    def result(self, passages: int) -> dict[str, Any]:
        n = max(self.tokens, 1)
        ppl = {k: float(np.exp(v / n)) for k, v in self.nll.items()}
        return {
            "passages": passages,
            "tokens": self.tokens,
            "perplexity_reference": ppl["reference"],
            "perplexity_quantized": ppl["quantized"],
            "perplexity_delta_pct": 100.0 * (ppl["quantized"] / ppl["reference"] - 1.0),
            "top1_agreement": self.top1 / n,
            "top5_agreement": self.top5 / n,
        }


class _Decoder:
    """One session over a decoder folder, fed whole passages with an empty cache."""

    def __init__(self, folder: str | os.PathLike, threads: int):
        self.path = resolve_model_path(folder)
        self.inputs = graph_inputs(self.path)
        if "input_ids" not in self.inputs:
            raise ModelError(f"{self.path}: no input_ids input; not a decoder language model")
        self.session = create_session(self.path, settings=SessionSettings(threads=threads), what=str(self.path))
        self.logits = self.session.get_outputs()[0].name

    def logits_of(self, ids: np.ndarray) -> np.ndarray:
        feeds: dict[str, np.ndarray] = {"input_ids": ids[None].astype(self.inputs["input_ids"].dtype)}
        for name, spec in self.inputs.items():
            if name == "attention_mask":
                feeds[name] = np.ones((1, len(ids)), spec.dtype)
            elif name == "position_ids":
                feeds[name] = np.arange(len(ids))[None].astype(spec.dtype)
            elif is_past_input(name):
                feeds[name] = spec.empty_past(1)
        return self.session.run([self.logits], feeds)[0][0]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity_agreement(reference, quantized, token_rows: Sequence[np.ndarray]) -> dict[str, Any]:
    """Perplexity of both decoders and top-1 / top-5 next-token agreement over ``token_rows``."""
    acc = _Agreement()
    for ids in token_rows:
        if len(ids) < 2:
            continue
        targets = ids[1:]
        logits = {"reference": reference.logits_of(ids)[:-1], "quantized": quantized.logits_of(ids)[:-1]}
        for which, lg in logits.items():
            lp = _log_softmax(lg)
            acc.nll[which] -= float(lp[np.arange(len(targets)), targets].sum())
        ref_top = logits["reference"].argmax(-1)
        q_top5 = np.argpartition(-logits["quantized"], 5, axis=-1)[:, :5]
        acc.top1 += int((logits["quantized"].argmax(-1) == ref_top).sum())
        acc.top5 += int((q_top5 == ref_top[:, None]).any(-1).sum())
        acc.tokens += len(targets)
    return acc.result(len(token_rows))


def greedy_and_speed(reference: str | os.PathLike, quantized: str | os.PathLike, prompts: Sequence[str], *,
                     new_tokens: int, threads: int, rounds: int = 2) -> dict[str, Any]:
    """Greedy continuations of both models (first divergence per prompt) and their prefill / decode tokens
    per second, best of ``rounds`` alternated passes after one warm-up."""
    gens = {"reference": Generator(reference, threads=threads), "quantized": Generator(quantized, threads=threads)}
    for g in gens.values():
        g.generate(prompts[0], max_new_tokens=2)  # warm-up
    best: dict[str, dict[str, float]] = {k: {"prefill": 0.0, "decode": 0.0} for k in gens}
    outputs: dict[str, list[list[int]]] = {k: [] for k in gens}
    for r in range(rounds):
        for which, g in gens.items():
            pre_tok = pre_s = dec_tok = dec_s = 0.0
            for prompt in prompts:
                res = g.generate(prompt, max_new_tokens=new_tokens)
                pre_tok += len(res.prompt_ids)
                pre_s += res.prefill_seconds
                dec_tok += max(len(res.token_ids) - 1, 0)
                dec_s += res.decode_seconds
                if r == 0:
                    outputs[which].append(list(res.token_ids))
            best[which]["prefill"] = max(best[which]["prefill"], pre_tok / max(pre_s, 1e-9))
            best[which]["decode"] = max(best[which]["decode"], dec_tok / max(dec_s, 1e-9))
    divergence = []
    for ref, q in zip(outputs["reference"], outputs["quantized"], strict=True):
        n = min(len(ref), len(q))
        first = next((i for i in range(n) if ref[i] != q[i]), None)
        divergence.append(first if first is not None else (n if len(ref) != len(q) else None))
    matched = [d if d is not None else new_tokens for d in divergence]
    return {
        "prompts": list(prompts),
        "new_tokens": new_tokens,
        "first_divergence": divergence,
        "mean_matched_tokens": float(np.mean(matched)),
        "identical_continuations": sum(d is None for d in divergence),
        "tokens_per_s": {k: {"prefill": round(v["prefill"], 1), "decode": round(v["decode"], 1)}
                         for k, v in best.items()},
        "decode_speedup": best["quantized"]["decode"] / max(best["reference"]["decode"], 1e-9),
        "threads": threads,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def evaluate_generative(
    quantized: str | os.PathLike,
    reference: str | os.PathLike,
    texts: Mapping[str, Sequence[str]],
    *,
    max_length: int = 256,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    new_tokens: int = 32,
    threads: int = 2,
) -> dict[str, Any]:
    """Compare a quantized decoder with its fp32 reference (see the module docstring).

    Args:
        quantized, reference: folders (or ``.onnx`` files) of decoders with the same tokenizer.
        texts: held-out passages by domain name (e.g. ``{"in_domain": [...], "out_of_domain": [...]}``).
        max_length: passages are cut to this many tokens.
        prompts: prompts of the greedy continuations; empty for none (and no speed figures).
        new_tokens: tokens generated per prompt.
        threads: intra-op threads of every session.

    Returns:
        A JSON-able dict: ``domains`` (per domain :func:`perplexity_agreement`), ``generation``
        (:func:`greedy_and_speed`, when the models have a KV cache and prompts are given), ``peak_rss_mb``.
    """
    if max_length < 2 or new_tokens < 1 or threads < 1:
        raise ConfigError("max_length must be >= 2, new_tokens and threads >= 1")
    ref, q = _Decoder(reference, threads), _Decoder(quantized, threads)
    tokenizer = load_tokenizer(ref.path.parent)
    if tokenizer is None:
        raise ModelError(f"{ref.path.parent}: no tokenizer files beside the reference model")
    out: dict[str, Any] = {"max_length": max_length, "threads": threads, "domains": {}}
    for domain, passages in texts.items():
        rows = [np.asarray(tokenizer(t, truncation=True, max_length=max_length)["input_ids"], np.int64)
                for t in passages]
        if not rows:
            raise ConfigError(f"no text for domain {domain!r}")
        out["domains"][domain] = perplexity_agreement(ref, q, rows)
        logger.info("%s: %s", domain, out["domains"][domain])
    if prompts and any(is_past_input(n) for n in ref.inputs):
        del ref, q
        out["generation"] = greedy_and_speed(reference, quantized, prompts, new_tokens=new_tokens, threads=threads)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out
