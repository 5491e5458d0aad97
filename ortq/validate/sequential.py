"""Validation of models too large for two sessions at once: one session alive at a time.

The comparison of :mod:`ortq.validate.compare` runs the fp32 and the quantized session side by side, batch by
batch, and times them alternated; each session holds its own copy of the weights (ONNX Runtime's prepacked
MatMul weights, the initializers it cannot map from the file), so for a model of S bytes the process holds
about 2 S, and more when the previous provider's pair is still alive. Here each (provider, model) session is
opened, run over every batch, timed alone, described and closed before the next one opens. The outputs it is
compared on are written to ``cache_dir`` as ``.npy`` files and read back memory-mapped, one batch at a time, so
the figures are those of the side-by-side comparison and the memory that of one session plus one batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ortq.errors import CalibrationDataError, ModelError, ValidationFailed
from ortq.runtime import (
    ProviderFailed,
    SessionSettings,
    batch_size_of,
    create_session,
    describe_session,
    release_freed_memory,
    run_batches,
)
from ortq.tasks import task_from_outputs
from ortq.validate.compare import Comparison, Outputs, provider_rows, run_failure
from ortq.validate.inputs import ModelFile
from ortq.validate.latency import combine_latency, time_session
from ortq.validate.placement import has_qdq

__all__ = ["compare_one_at_a_time", "float_output_names"]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
WHICH = ("reference", "quantized")


def float_output_names(model: onnx.ModelProto) -> list[str]:
    """The graph's float outputs, in order (as :func:`ortq.runtime.float_outputs` reads them from a session)."""
    return [o.name for o in model.graph.output if o.type.tensor_type.elem_type in _FLOAT_TYPES]


def _outputs(reference: ModelFile, quantized: ModelFile, first: Mapping[str, np.ndarray], names: list[str],
             feed: Mapping[str, np.ndarray], task: str | None) -> Outputs:
    """As :func:`ortq.validate.compare.choose_outputs`, from the reference's outputs on the first batch."""
    inferred, inferred_out = task_from_outputs(names[:1], [np.shape(first[names[0]])], feed.keys())
    if task is None:
        return Outputs(inferred or "none", inferred_out, names)
    if task == "none":
        return Outputs("none", None, names)
    return Outputs(task, inferred_out if inferred == task else names[0], names)


def compare_one_at_a_time(
    keys: Sequence[str],
    availability: Mapping[str, tuple[bool, str | None]],
    required: set[str],
    reference: ModelFile,
    quantized: ModelFile,
    batches: Sequence[Mapping[str, np.ndarray]],
    task: str | None,
    top_k: int,
    *,
    settings: SessionSettings,
    cache_dir: str,
    latency: tuple[int, int] | None,
) -> tuple[dict[str, dict[str, Any]], Outputs, dict[str, Any]]:
    """Rows per provider (status, session, fidelity, task, parity, latency), the outputs compared and the
    session settings, as :func:`ortq.validate.validate` builds them, with at most one session alive.

    ``latency`` is ``(warmup_runs, runs)``, or None for no latency figures. A provider that cannot run is a
    ``skipped`` row, or :class:`ValidationFailed` when it is in ``required``.
    """
    q_names = set(float_output_names(quantized.proto))
    names = [o for o in float_output_names(reference.proto) if o in q_names]
    if not names:
        raise ModelError(
            "the quantized and reference models share no float output name; validate models with the same outputs"
        )
    folder = Path(cache_dir)
    # No arena, no per-shape allocation plan: what a run allocated is handed back when it ends, not kept at its
    # high-water mark beside a large model's weights (the sessions run one at a time; both models alike).
    settings = dataclasses.replace(settings, arena=False, memory_pattern=False)
    rows, runnable = provider_rows(keys, availability)
    outputs: Outputs | None = None
    block: dict[str, Any] = {}
    ran: list[str] = []
    int8_qdq = has_qdq(quantized.proto)
    for k, row in runnable:
        timed = {}
        try:
            for which, m in zip(WHICH, (reference, quantized), strict=True):
                sess = create_session(m.path, provider=k, settings=settings, trt_cache_dir=cache_dir,
                                      int8_qdq=int8_qdq and which == "quantized", what=str(m.path))
                try:
                    for i, (_, out) in enumerate(_runs(k, which, sess, batches, names)):
                        if outputs is None:
                            outputs = _outputs(reference, quantized, out, names, batches[0], task)
                        for name in names:
                            np.save(folder / f"{k}-{which}-{i}-{names.index(name)}.npy", out[name])
                    if latency is not None:
                        timed[which] = time_session(sess, batches[0], warmup_runs=latency[0], runs=latency[1])
                    if which == "quantized":
                        row.update(status="ok", reason=None, session_providers=list(sess.get_providers()))
                        row["session"] = describe_session(sess)
                        if not block:
                            block = {n: v for n, v in row["session"].items() if n != "providers"}
                finally:
                    del sess
                    release_freed_memory()  # the session's weights, before the next one loads
        except ProviderFailed as exc:
            if k in required:
                raise ValidationFailed(f"required provider {k} cannot run: {exc}") from exc
            row.update(status="skipped", reason=str(exc))
            continue
        if latency is not None:
            row["latency"] = {**combine_latency(batch_size_of(batches[0]), latency[0], latency[1], timed),
                              "order": "one model after the other (one session at a time)"}
        ran.append(k)
    if outputs is None:
        return rows, Outputs(task or "none", None, []), block
    _accumulate(rows, ran, outputs, batches, names, folder, top_k)
    return rows, outputs, block


def _runs(key: str, which: str, sess, batches, names):
    """:func:`ortq.runtime.run_batches` with the errors of :func:`ortq.validate.compare` (a failed run is a
    :class:`ModelError` on the CPU, :class:`ValidationFailed` elsewhere)."""
    model = "fp32" if which == "reference" else "quantized"
    try:
        yield from run_batches(sess, batches, names, what=f"the {model} model on {key}")
    except CalibrationDataError as exc:
        if exc.__cause__ is None:
            raise
        raise run_failure(key, exc.__cause__) from exc.__cause__


def _accumulate(rows, ran: list[str], outputs: Outputs, batches, names: list[str], folder: Path, top_k: int) -> None:
    """The fidelity, task and (off the CPU) parity figures from the saved outputs, one batch at a time."""
    order = sorted(ran, key=lambda k: k != "cpu")
    results = {k: Comparison(outputs, top_k) for k in order}

    def load(k: str, which: str, i: int) -> dict[str, np.ndarray]:
        return {n: np.load(folder / f"{k}-{which}-{i}-{j}.npy", mmap_mode="r") for j, n in enumerate(names)}

    for i, feed in enumerate(batches):
        cpu = (load("cpu", "reference", i), load("cpu", "quantized", i)) if "cpu" in results else None
        for k in order:
            ro, qo = (cpu if k == "cpu" and cpu is not None else (load(k, "reference", i), load(k, "quantized", i)))
            results[k].update(feed, ro, qo)
            if k != "cpu" and cpu is not None:
                results[k].update_parity(feed, cpu, ro, qo)
    for k, comparison in results.items():
        rows[k].update(comparison.row())
