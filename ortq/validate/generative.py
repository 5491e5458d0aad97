"""Validation of generative (decoder-only) models: what a user of a quantized language model sees.

:func:`evaluate_generative` runs a quantized decoder and its fp32 reference over the same held-out passages
(one passage per run, no padding, an empty KV cache) and reports, per text domain,

* perplexity of each model and the quantized model's change in percent;
* next-token agreement with fp32: top-1 (same argmax) and top-5 (fp32's argmax within the quantized top 5);

and, over a few prompts, greedy continuations with :class:`ortq.generate.Generator` (the position of the first
token where the quantized model leaves the fp32 continuation), prefill and decode tokens per second of both
models (warm, alternated A B A B, the threads fixed) and the peak RSS of the process. Graphs with
``past_key_values.*`` inputs get an empty cache; graphs without a cache work for the perplexity part.

:func:`generative_section` is what :func:`ortq.validate.validate` adds to its report as ``generative``: the
evaluation above on the held-out passages of :mod:`ortq.corpus` (``python-docs`` and, when installed,
``news``) or on a user's text file, or the reason it did not run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ortq.corpus import news_path, passages
from ortq.data import graph_inputs, load_tokenizer
from ortq.errors import CalibrationDataError, ConfigError, ModelError
from ortq.generate import Generator, context_length
from ortq.io import resolve_model_path
from ortq.runtime import SessionSettings, create_session
from ortq.tasks import is_past_input

logger = logging.getLogger(__name__)

ModelFileLike = tuple[Any, onnx.ModelProto]  # (path of the .onnx file, its graph without external data)

DEFAULT_PROMPTS = (
    "The history of the city begins",
    "def read_config(path):",
    "Scientists announced on Tuesday that",
    "Once upon a time, in a small village,",
)


@dataclass(frozen=True)
class RowScores:
    """What one decoder predicts on one token row: the summed negative log-likelihood of its next tokens,
    and per position the argmax and the 5 most likely tokens (unordered)."""

    nll: float
    top1: np.ndarray
    top5: np.ndarray


class DecoderSession:
    """One session over a decoder folder, fed whole passages with an empty cache (any graph that takes
    ``input_ids`` and optionally ``attention_mask``, ``position_ids`` and ``past_key_values.*``)."""

    def __init__(self, folder: str | os.PathLike, threads: int):
        self.path = resolve_model_path(folder)
        self.inputs = graph_inputs(self.path)
        if "input_ids" not in self.inputs:
            raise ModelError(f"{self.path}: no input_ids input; not a decoder language model")
        head_size = _genai_head_size(self.path.parent)
        for name, spec in self.inputs.items():  # the builder's cache is [batch, heads, past, "kv_cache_dim"]
            if is_past_input(name) and head_size and len(spec.dims) == 4 and spec.dims[3] is None:
                self.inputs[name] = dataclasses.replace(spec, dims=(*spec.dims[:3], head_size))
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


def _genai_head_size(folder: Path) -> int | None:
    """``model.decoder.head_size`` of an onnxruntime-genai ``genai_config.json`` beside the model, if any."""
    path = folder / "genai_config.json"
    try:
        size = json.loads(path.read_text())["model"]["decoder"]["head_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(size) if isinstance(size, int) and size > 0 else None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score_rows(decoder: DecoderSession, token_rows: Sequence[np.ndarray]) -> list[RowScores]:
    """:class:`RowScores` of ``decoder`` on every row of at least 2 tokens."""
    out = []
    for ids in token_rows:
        if len(ids) < 2:
            continue
        targets, logits = ids[1:], decoder.logits_of(ids)[:-1]
        lp = _log_softmax(logits)
        out.append(RowScores(nll=-float(lp[np.arange(len(targets)), targets].sum()), top1=logits.argmax(-1),
                             top5=np.argpartition(-logits, 5, axis=-1)[:, :5]))
    return out


def compare_scores(reference: Sequence[RowScores], quantized: Sequence[RowScores]) -> dict[str, Any]:
    """Perplexity of both and the quantized model's top-1 / top-5 agreement with the reference's argmax, from
    the :func:`score_rows` of the same rows (so a benchmark scores its reference once for many models)."""
    if len(reference) != len(quantized):
        raise ConfigError("compare_scores: the two models were scored on different rows")
    tokens = top1 = top5 = 0
    nll = {"reference": 0.0, "quantized": 0.0}
    for r, q in zip(reference, quantized, strict=True):
        if r.top1.shape != q.top1.shape:
            raise ConfigError("compare_scores: the two models were scored on different rows")
        nll["reference"] += r.nll
        nll["quantized"] += q.nll
        top1 += int((q.top1 == r.top1).sum())
        top5 += int((q.top5 == r.top1[:, None]).any(-1).sum())
        tokens += len(r.top1)
    n = max(tokens, 1)
    ppl = {k: float(np.exp(v / n)) for k, v in nll.items()}
    return {
        "passages": len(reference),
        "tokens": tokens,
        "perplexity_reference": ppl["reference"],
        "perplexity_quantized": ppl["quantized"],
        "perplexity_delta_pct": 100.0 * (ppl["quantized"] / ppl["reference"] - 1.0),
        "top1_agreement": top1 / n,
        "top5_agreement": top5 / n,
    }


def perplexity_agreement(reference: DecoderSession, quantized: DecoderSession,
                         token_rows: Sequence[np.ndarray]) -> dict[str, Any]:
    """Perplexity of both decoders and top-1 / top-5 next-token agreement over ``token_rows``."""
    return compare_scores(score_rows(reference, token_rows), score_rows(quantized, token_rows))


def greedy_and_speed(reference: str | os.PathLike, quantized: str | os.PathLike, prompts: Sequence[str], *,
                     new_tokens: int, threads: int, rounds: int = 2, one_at_a_time: bool = False) -> dict[str, Any]:
    """Greedy continuations of both models (first divergence per prompt) and their prefill / decode tokens
    per second, best of ``rounds`` alternated passes after one warm-up (``one_at_a_time``: all rounds of the
    reference, then of the quantized model, with one session alive)."""
    paths = {"reference": reference, "quantized": quantized}
    best: dict[str, dict[str, float]] = {k: {"prefill": 0.0, "decode": 0.0} for k in paths}
    outputs: dict[str, list[list[int]]] = {k: [] for k in paths}
    for group in ([[k] for k in paths] if one_at_a_time else [list(paths)]):
        gens = {k: Generator(paths[k], threads=threads) for k in group}
        _rounds(gens, prompts, new_tokens, rounds, best, outputs)
        del gens  # closed before the next group's session opens
    return _generation_result(prompts, new_tokens, threads, best, outputs)


def _rounds(gens, prompts, new_tokens: int, rounds: int, best, outputs) -> None:
    for g in gens.values():
        g.generate(prompts[0], max_new_tokens=2)  # warm-up
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


def _generation_result(prompts, new_tokens: int, threads: int, best, outputs) -> dict[str, Any]:
    divergence = []
    for ref, q in zip(outputs["reference"], outputs["quantized"], strict=True):
        n = min(len(ref), len(q))
        first = next((i for i in range(n) if ref[i] != q[i]), None)
        divergence.append(first if first is not None else (n if len(ref) != len(q) else None))
    # An identical continuation matched all of its tokens (fewer than new_tokens when it ended at EOS).
    matched = [d if d is not None else len(ref) for d, ref in zip(divergence, outputs["reference"], strict=True)]
    speed = {k: {"prefill": round(v["prefill"], 1), "decode": round(v["decode"], 1) if v["decode"] else None}
             for k, v in best.items()}
    dec = speed["reference"]["decode"], speed["quantized"]["decode"]
    return {
        "prompts": list(prompts),
        "new_tokens": new_tokens,
        "continuation_lengths": {k: [len(t) for t in v] for k, v in outputs.items()},
        "first_divergence": divergence,
        "mean_matched_tokens": float(np.mean(matched)),
        "identical_continuations": sum(d is None for d in divergence),
        "tokens_per_s": speed,
        "decode_speedup": dec[1] / dec[0] if dec[0] and dec[1] else None,
        "threads": threads,
    }


def token_rows(tokenizer, texts: Sequence[str], max_length: int) -> list[np.ndarray]:
    """The token ids of each text, cut to ``max_length`` (int64 rows; texts of fewer than 2 tokens dropped)."""
    rows = [np.asarray(tokenizer(t, truncation=True, max_length=max_length)["input_ids"], np.int64) for t in texts]
    return [r for r in rows if len(r) >= 2]


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
    one_at_a_time: bool = False,
) -> dict[str, Any]:
    """Compare a quantized decoder with its fp32 reference (see the module docstring).

    Args:
        quantized, reference: folders (or ``.onnx`` files) of decoders with the same tokenizer.
        texts: held-out passages by domain name (e.g. ``{"in_domain": [...], "out_of_domain": [...]}``).
        max_length: passages are cut to this many tokens.
        prompts: prompts of the greedy continuations; empty for none (and no speed figures).
        new_tokens: tokens generated per prompt.
        threads: intra-op threads of every session.
        one_at_a_time: one session alive at a time (models too large to hold twice); speeds are then measured
            one model after the other rather than alternated.

    Returns:
        A JSON-able dict: ``domains`` (per domain :func:`perplexity_agreement`), ``generation``
        (:func:`greedy_and_speed`, when the models have a KV cache and prompts are given), ``peak_rss_mb``.
    """
    if max_length < 2 or new_tokens < 1 or threads < 1:
        raise ConfigError("max_length must be >= 2, new_tokens and threads >= 1")
    ref = DecoderSession(reference, threads)
    tokenizer = load_tokenizer(ref.path.parent)
    if tokenizer is None:
        raise ModelError(f"{ref.path.parent}: no tokenizer files beside the reference model")
    context = context_length(ref.path.parent)
    if context is not None and context < max_length:
        logger.info("passages cut to the model's context of %d tokens", context)
        max_length = context
    with_past = any(is_past_input(n) for n in ref.inputs)
    out: dict[str, Any] = {"max_length": max_length, "threads": threads, "domains": {}}
    rows = {}
    for domain, domain_texts in texts.items():
        rows[domain] = token_rows(tokenizer, domain_texts, max_length)
        if not rows[domain]:
            raise ConfigError(f"no text for domain {domain!r}")
    q = None if one_at_a_time else DecoderSession(quantized, threads)
    ref_scores = {domain: score_rows(ref, r) for domain, r in rows.items()}
    if q is None:
        del ref
        q = DecoderSession(quantized, threads)
    for domain, r in rows.items():
        out["domains"][domain] = compare_scores(ref_scores[domain], score_rows(q, r))
        logger.info("%s: %s", domain, out["domains"][domain])
    if prompts and with_past:
        del q
        if not one_at_a_time:
            del ref
        out["generation"] = greedy_and_speed(reference, quantized, prompts, new_tokens=new_tokens, threads=threads,
                                             one_at_a_time=one_at_a_time)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


# ------------------------------------------------------------------------------------- in the validate report

HELDOUT_DOMAINS = ("python-docs", "news")


@dataclass(frozen=True)
class GenerativeOptions:
    """How :func:`generative_section` evaluates a decoder pair.

    Attributes:
        eval_text: a UTF-8 text file to evaluate on instead of the held-out corpus (passages are separated by
            blank lines; one domain named after the file).
        num_passages: passages per domain (the first ones of the held-out split, or of the file).
        max_length: tokens per passage at most.
        new_tokens: tokens of each greedy continuation (0: no continuations and no speed figures).
        prompts: prompts of the greedy continuations.
    """

    eval_text: str | os.PathLike | None = None
    num_passages: int = 8
    max_length: int = 256
    new_tokens: int = 32
    prompts: tuple[str, ...] = DEFAULT_PROMPTS

    def __post_init__(self) -> None:
        if self.num_passages < 1 or self.max_length < 2 or self.new_tokens < 0:
            raise ConfigError("generative evaluation: passages >= 1, max_length >= 2 and new_tokens >= 0")


def decoder_kind(model: onnx.ModelProto) -> str | None:
    """``"with-past"`` for a decoder with ``input_ids`` and a KV cache, ``"no-past"`` for one without a cache
    (``input_ids`` in, ``logits`` out), else None."""
    inputs = {i.name for i in model.graph.input}
    if "input_ids" not in inputs:
        return None
    if any(is_past_input(n) for n in inputs):
        return "with-past"
    return "no-past" if any(o.name == "logits" for o in model.graph.output) else None


def text_file_passages(path: str | os.PathLike, num_passages: int) -> list[str]:
    """The first ``num_passages`` blank-line-separated passages of a UTF-8 text file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--eval-text {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--eval-text {p}: cannot read it as UTF-8 text ({exc})") from None
    chunks = [" ".join(c.split()) for c in text.replace("\r\n", "\n").split("\n\n")]
    chunks = [c for c in chunks if c]
    if not chunks:
        raise ConfigError(f"--eval-text {p}: the file holds no text")
    return chunks[:num_passages]


def evaluation_texts(options: GenerativeOptions) -> tuple[dict[str, list[str]], dict[str, str], str]:
    """``(texts by domain, skipped domains with the reason, a description of the source)``."""
    if options.eval_text is not None:
        name = Path(options.eval_text).name
        return {name: text_file_passages(options.eval_text, options.num_passages)}, {}, f"text file {options.eval_text}"
    texts, skipped = {}, {}
    for domain in HELDOUT_DOMAINS:
        if domain == "news" and news_path() is None:
            skipped[domain] = "the news corpus is not installed (pip install 'ortq[datasets]')"
            continue
        try:
            texts[domain] = passages(domain, "heldout", options.num_passages)
        except CalibrationDataError as exc:
            skipped[domain] = str(exc)
    return texts, skipped, "held-out passages of ortq.corpus (" + ", ".join(HELDOUT_DOMAINS) + ")"


def generative_precheck(quantized: ModelFileLike, reference: ModelFileLike, options: GenerativeOptions | None, *,
                        required: bool) -> dict[str, Any] | None:
    """Whether :func:`generative_section` will evaluate (``{"status": "pending"}``), skip (``{"status":
    "skipped", "reason": ...}``) or leave the section out (None: the reference is no decoder and nothing was
    asked). Cheap: run it before anything slow, so that a bad request fails first.

    Raises:
        ConfigError: ``required`` and the evaluation cannot run (not decoders, no tokenizer, no such text file).
    """
    (_, q_proto), (r_path, r_proto) = quantized, reference
    kinds = {"reference": decoder_kind(r_proto), "quantized": decoder_kind(q_proto)}
    if not required and kinds["reference"] is None:
        return None
    if options is None:
        return {"status": "skipped", "reason": "turned off (--no-generative)"}
    reason = None
    if None in kinds.values():
        which = "reference" if kinds["reference"] is None else "quantized"
        reason = f"the {which} model is not a decoder language model (input_ids -> logits, with a KV cache)"
    elif not required and "no-past" in kinds.values():
        return {"status": "skipped", "reason": "a decoder exported without its KV cache (ask with --eval-text or "
                "--eval-passages to evaluate its perplexity anyway)"}
    elif load_tokenizer(Path(r_path).parent) is None:
        reason = f"no tokenizer files beside the reference {r_path}"
    if reason is not None:
        if required:
            raise ConfigError(f"generative evaluation: {reason}")
        return {"status": "skipped", "reason": reason}
    if options.eval_text is not None:
        text_file_passages(options.eval_text, 1)
    return {"status": "pending", "kinds": kinds}


def generative_section(quantized: ModelFileLike, reference: ModelFileLike, options: GenerativeOptions | None, *,
                       required: bool, threads: int = 2, one_at_a_time: bool = False) -> dict[str, Any] | None:
    """The ``generative`` block of a validation report.

    Args:
        quantized, reference: ``(path, graph)`` of both models (the graph without external data).
        options: None when the user turned the evaluation off.
        required: the user asked for it (a generative-only option): see :func:`generative_precheck`.
        threads: intra-op threads of every session.
        one_at_a_time: one session alive at a time (see :func:`evaluate_generative`).

    Returns:
        ``{"status": "ok", "domains": ..., "generation": ..., ...}``, ``{"status": "skipped", "reason": ...}``
        for a decoder that was not evaluated, or None when the reference is no decoder and nothing was asked.
    """
    pre = generative_precheck(quantized, reference, options, required=required)
    if pre is None or pre["status"] == "skipped":
        return pre
    assert options is not None
    no_past = "no-past" in pre["kinds"].values()
    texts, skipped, source = evaluation_texts(options)
    if not texts:
        return {"status": "skipped", "reason": "no evaluation text: " + "; ".join(skipped.values())}
    prompts = options.prompts if options.new_tokens > 0 and not no_past else ()
    result = evaluate_generative(quantized[0], reference[0], texts, max_length=options.max_length, prompts=prompts,
                                 new_tokens=max(options.new_tokens, 1), threads=threads,
                                 one_at_a_time=one_at_a_time)
    if "generation" not in result:
        result["generation_skipped"] = "no KV cache" if no_past else "--new-tokens 0"
    return {"status": "ok", "source": source, "skipped_domains": skipped, **result}


def generative_markdown(gen: dict[str, Any] | None) -> list[str]:
    """The report's Markdown lines for a ``generative`` entry that ran (none otherwise)."""
    if not gen or gen.get("status") != "ok":
        return []
    lines = [
        "## Generative (decoder)",
        "",
        f"Text: {gen['source']}; passages cut to {gen['max_length']} tokens, one per run, empty KV cache. "
        f"Peak RSS of the process: {gen['peak_rss_mb']:.0f} MB.",
        "",
        "| domain | passages | tokens | fp32 ppl | quant ppl | ppl change | top-1 agree | top-5 agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for domain, d in gen["domains"].items():
        lines.append(
            f"| {domain} | {d['passages']} | {d['tokens']} | {d['perplexity_reference']:.3f} "
            f"| {d['perplexity_quantized']:.3f} | {d['perplexity_delta_pct']:+.2f}% "
            f"| {100 * d['top1_agreement']:.1f}% | {100 * d['top5_agreement']:.1f}% |"
        )
    lines.append("")
    g = gen.get("generation")
    if g:
        r, q = g["tokens_per_s"]["reference"], g["tokens_per_s"]["quantized"]
        div = ", ".join("none" if d is None else str(d) for d in g["first_divergence"])
        lines.append(
            f"Greedy continuations ({len(g['prompts'])} prompts, {g['new_tokens']} new tokens): "
            f"{g['identical_continuations']} identical to fp32; first differing token per prompt: {div}; "
            f"{g['mean_matched_tokens']:.1f} tokens matched on average."
        )
        decode = (f"decode fp32 {r['decode']:.1f}, quantized {q['decode']:.1f} ({g['decode_speedup']:.2f}x fp32)"
                  if g.get("decode_speedup") else "decode not measured (every continuation ended at its first token)")
        lines.append(
            f"Tokens/s ({g['threads']} threads, best of alternated rounds): prefill fp32 {r['prefill']:.1f}, "
            f"quantized {q['prefill']:.1f}; {decode}."
        )
    else:
        lines.append(f"Greedy continuations and speed not measured: {gen.get('generation_skipped')}.")
    return lines + [""]
