"""Validate a quantized model against its fp32 reference on ONNX Runtime execution providers.

For every requested provider (``cpu``, ``cuda``, ``tensorrt``) that can run here, both models see the same
held-out batches and the report records

* fidelity (:mod:`ortq.validate.metrics`): per-sample cosine (mean and worst), max / mean abs error and SQNR
  of every float output, and a task-level figure (top-k neighbour agreement for ``feature-extraction``,
  argmax agreement for ``text-classification``, perplexity delta for ``causal-lm``); off the CPU, the parity
  of each model with its own CPU outputs;
* latency (:mod:`ortq.validate.latency`): warm-up, then fp32 and quantized alternated (A B A B) on one batch;
* placement (:mod:`ortq.validate.placement`): which provider ran each node of the optimized graph, which QDQ
  groups became integer kernels, and the share of MatMul/Gemm/Conv FLOPs that ran in int8;
* the session settings, read back from the sessions themselves;
* for decoders exported with their KV cache (``input_ids`` and ``past_key_values.*`` inputs), what a user of a
  language model sees (:mod:`ortq.validate.generative`): perplexity and next-token agreement on held-out
  passages of two text domains, greedy continuations, prefill / decode tokens per second and peak memory.

Providers that cannot run are recorded as skipped with the reason; ``require`` turns that into
:class:`ortq.errors.ValidationFailed`. The per-layer error report of a static int8 model is
:func:`ortq.validate.layers.layer_report`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ortq.errors import ConfigError, ValidationFailed
from ortq.hostinfo import host_info
from ortq.runtime import (
    ProviderFailed,
    SessionSettings,
    batch_samples,
    batch_size_of,
    bound_heap_growth,
    normalize_provider,
    provider_availability,
)
from ortq.tasks import normalize_task
from ortq.validate.compare import choose_outputs, compare, open_sessions, session_settings
from ortq.validate.generative import GenerativeOptions, generative_precheck, generative_section
from ortq.validate.inputs import ModelFile, load_model_file, model_summary, pick_batches, synthetic_batches
from ortq.validate.latency import measure_latency
from ortq.validate.layers import LayerReport, LayerStats, layer_report
from ortq.validate.metrics import (
    ErrorStats,
    argmax_agreement,
    cosine_similarity,
    max_abs_error,
    next_token_nll,
    sample_cosines,
    sqnr_db,
    topk_neighbour_agreement,
)
from ortq.validate.placement import (
    INTEGER_KERNELS,
    NBITS_KERNELS,
    NodePlacement,
    Placement,
    inspect_placement,
)
from ortq.validate.report import Thresholds, ValidationReport
from ortq.validate.sequential import compare_one_at_a_time

logger = logging.getLogger(__name__)

__all__ = [
    "INTEGER_KERNELS",
    "NBITS_KERNELS",
    "ErrorStats",
    "GenerativeOptions",
    "LayerReport",
    "LayerStats",
    "NodePlacement",
    "Placement",
    "Thresholds",
    "ValidationReport",
    "argmax_agreement",
    "cosine_similarity",
    "inspect_placement",
    "layer_report",
    "max_abs_error",
    "measure_latency",
    "next_token_nll",
    "normalize_provider",
    "provider_availability",
    "sample_cosines",
    "sqnr_db",
    "synthetic_batches",
    "topk_neighbour_agreement",
    "validate",
]

NO_TASK = "none"
# Above this size (the reference on disk, external data included) the models are validated with one session
# alive at a time (see :mod:`ortq.validate.sequential`): two sessions would hold the weights twice.
ONE_SESSION_BYTES = 1 << 30


def validate(
    quantized: str | os.PathLike,
    reference: str | os.PathLike,
    data: Any = None,
    *,
    providers: Sequence[str] = ("cpu",),
    require: Sequence[str] = (),
    num_samples: int = 64,
    batch_size: int = 16,
    task: str | None = None,
    thresholds: Thresholds | None = None,
    report_dir: str | os.PathLike | None = None,
    intra_op_num_threads: int = 2,
    latency_runs: int = 20,
    warmup_runs: int = 3,
    top_k: int = 5,
    placement: bool = True,
    generative: GenerativeOptions | bool | None = None,
    one_session_at_a_time: bool | None = None,
) -> ValidationReport:
    """Compare ``quantized`` with its fp32 ``reference`` on each requested execution provider.

    Args:
        quantized: the quantized model: an ``.onnx`` file or an exported folder holding ``model.onnx``.
        reference: the fp32 model, same inputs and outputs.
        data: held-out samples: None (real held-out text when a tokenizer sits beside the reference, else
            seeded random inputs), a file (``.txt``/``.jsonl``/``.csv``/``.parquet``/``.npz``), a list of
            strings, or an iterable of feed dicts. Use data the model was not calibrated on.
        providers: ``cpu``, ``cuda``, ``tensorrt`` (or their aliases, see :func:`ortq.runtime.normalize_provider`).
        require: providers that must run; if one cannot, :class:`ValidationFailed` is raised (exit code 1).
            Required providers are added to ``providers``.
        num_samples: held-out samples to compare.
        batch_size: samples per run; latency is measured on the first batch.
        task: ``feature-extraction``, ``text-classification``, ``causal-lm`` (or an alias of
            :mod:`ortq.tasks`) or ``none`` for no task metric; None infers it from the first output.
        thresholds: limits whose violation makes ``report.ok`` False (see :class:`Thresholds`).
        report_dir: when given, report.json, report.md and report.png are written there (atomically).
        intra_op_num_threads: threads of every session (read back into the report).
        latency_runs: timed runs per model after warm-up, alternated A B A B.
        warmup_runs: untimed runs per model first (the first one is reported as ``first_run_ms``).
        top_k: neighbours for the feature-extraction agreement.
        placement: also run :func:`inspect_placement` for both models on each provider.
        generative: the evaluation of a decoder language model (report entry ``generative``): None runs it,
            with the default :class:`GenerativeOptions`, when both models are decoders with a KV cache and a
            tokenizer sits beside the reference (else the entry says why it did not run); False turns it off;
            True or a :class:`GenerativeOptions` require it (a :class:`ConfigError` when it cannot run).
        one_session_at_a_time: open one session at a time (outputs kept on disk, each model timed alone rather
            than alternated) so that memory holds one model's weights, not two; None does so when the
            reference is over :data:`ONE_SESSION_BYTES` on disk.

    Returns:
        A :class:`ValidationReport`; ``report.violations`` lists every threshold violated and ``report.ok``
        is False when there is any. The function raises only for bad input or a missing required provider.
    """
    task = _check_arguments(num_samples, batch_size, latency_runs, warmup_runs, task)
    keys, required = _provider_keys(providers, require)
    availability = _availability(keys, required)
    q_model, r_model = load_model_file(quantized), load_model_file(reference)
    gen_required = generative is True or isinstance(generative, GenerativeOptions)
    gen_args = ((q_model.path, q_model.proto), (r_model.path, r_model.proto),
                GenerativeOptions() if generative in (None, True) else generative or None)
    generative_precheck(*gen_args, required=gen_required)  # a bad request fails before anything slow
    batches, data_source = pick_batches(data, r_model, batch_size=batch_size, num_samples=num_samples)
    settings = SessionSettings(threads=intra_op_num_threads)

    if one_session_at_a_time is None:
        one_session_at_a_time = model_summary(r_model)["size_bytes"] > ONE_SESSION_BYTES
    if one_session_at_a_time:
        bound_heap_growth()
    with tempfile.TemporaryDirectory(prefix="ortq-validate-") as cache_dir:
        if one_session_at_a_time:
            rows, outputs, session_block = compare_one_at_a_time(
                keys, availability, required, r_model, q_model, batches, task, top_k, settings=settings,
                cache_dir=cache_dir, latency=(warmup_runs, latency_runs) if latency_runs > 0 else None,
            )
        else:
            rows, outputs, session_block = _compare(keys, availability, required, r_model, q_model, batches, task,
                                                    top_k, settings, cache_dir, (warmup_runs, latency_runs))
        if placement:
            # A large model's placement is read on one sample: the kernels are the same, the activations
            # (held in the session's arena beside its weights) a batch-size fraction.
            feed = batch_samples(batches[0], 0, 1) if one_session_at_a_time else batches[0]
            _add_placement(rows, r_model, q_model, feed, intra_op_num_threads)
    gen_block = generative_section(*gen_args, required=gen_required, threads=intra_op_num_threads,
                                   one_at_a_time=one_session_at_a_time)

    report = ValidationReport(
        {
            "schema": "ortq.validation-report",
            "schema_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "models": {"quantized": model_summary(q_model), "reference": model_summary(r_model)},
            "data": _data_block(batches, data_source),
            "task": outputs.task,
            "settings": {
                **session_block,
                "warmup_runs": warmup_runs,
                "latency_runs": latency_runs,
                "latency_order": "one model after the other on the first batch" if one_session_at_a_time
                else "alternating A B A B on the first batch",
                "providers_requested": keys,
                "providers_required": sorted(required),
            },
            "host": host_info(gpus=any(k != "cpu" for k in keys)),
            "providers": [rows[k] for k in keys],
            "thresholds": (thresholds or Thresholds()).to_dict(),
            **({"generative": gen_block} if gen_block is not None else {}),
        }
    )
    if report_dir is not None:
        report.save(report_dir)
    return report


def _compare(keys, availability, required, r_model, q_model, batches, task, top_k, settings, cache_dir, latency):
    """Both sessions of each provider side by side: rows, outputs compared, session settings. The sessions
    are closed on return."""
    rows, sessions = open_sessions(
        keys, availability, required, r_model, q_model, settings=settings, cache_dir=cache_dir
    )
    outputs = choose_outputs(sessions, batches[0], task)
    for k, comparison in compare(sessions, batches, outputs, top_k).items():
        rows[k].update(comparison.row())
    warmup_runs, latency_runs = latency
    if latency_runs > 0:
        for k, pair in sessions.items():
            rows[k]["latency"] = measure_latency(
                pair.reference, pair.quantized, batches[0], warmup_runs=warmup_runs, runs=latency_runs
            )
    return rows, outputs, session_settings(sessions)


def _check_arguments(num_samples: int, batch_size: int, latency_runs: int, warmup_runs: int, task: str | None):
    """The canonical task name (or None / ``none``); a :class:`ConfigError` for a bad argument."""
    if num_samples < 1 or batch_size < 1:
        raise ConfigError("num_samples and batch_size must be positive integers")
    if latency_runs < 0 or warmup_runs < 1:
        raise ConfigError("latency_runs must be >= 0 and warmup_runs >= 1")
    if task is None or str(task).strip().lower() == NO_TASK:
        return None if task is None else NO_TASK
    return normalize_task(task, where="validate")


def _provider_keys(providers: Sequence[str], require: Sequence[str]) -> tuple[list[str], set[str]]:
    """The providers to try, in the order asked and without repeats, and the required ones."""
    keys: list[str] = []
    for p in list(providers) + list(require):
        k = normalize_provider(p)
        if k not in keys:
            keys.append(k)
    return keys, {normalize_provider(p) for p in require}


def _availability(keys: list[str], required: set[str]) -> dict[str, tuple[bool, str | None]]:
    """Whether each provider is in this build; a required one that is not fails fast."""
    availability = {k: provider_availability(k) for k in keys}
    for k in keys:
        ok, reason = availability[k]
        if k in required and not ok:
            raise ValidationFailed(f"required provider {k} is not available: {reason}")
    return availability


def _add_placement(
    rows: dict[str, dict[str, Any]], r_model: ModelFile, q_model: ModelFile, feed, threads: int
) -> None:
    """The ``placement`` entry of every provider that ran (an ``error`` entry when inspection fails)."""
    for k, row in rows.items():
        if row.get("status") != "ok":
            continue
        try:
            row["placement"] = {
                which: inspect_placement(m.path, k, feed, intra_op_num_threads=threads).to_dict()
                for which, m in (("reference", r_model), ("quantized", q_model))
            }
        except (ValidationFailed, ProviderFailed) as exc:
            row["placement"] = {"error": str(exc)}


def _data_block(batches: list[dict[str, np.ndarray]], source: str) -> dict[str, Any]:
    return {
        "source": source,
        "num_samples": sum(batch_size_of(b) for b in batches),
        "batch_size": max(batch_size_of(b) for b in batches),
        "num_batches": len(batches),
        "first_batch_shapes": {k: list(np.shape(v)) for k, v in batches[0].items()},
    }
