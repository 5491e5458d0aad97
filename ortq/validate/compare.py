"""The comparison itself: one fp32 and one quantized session per provider, the outputs to compare, and the
fidelity, task and CPU-parity figures accumulated over the held-out batches.

Every session comes from :func:`ortq.runtime.create_session` and every batch goes through
:func:`ortq.runtime.run_batches`; the providers are walked CPU first on each batch, so that the GPU rows can
be compared with the CPU outputs of the same batch without keeping them all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ortq.errors import CalibrationDataError, ModelError, ValidationFailed, first_line
from ortq.runtime import (
    EXECUTION_PROVIDERS,
    ProviderFailed,
    SessionSettings,
    create_session,
    describe_session,
    float_outputs,
    run_batches,
)
from ortq.tasks import task_from_outputs
from ortq.validate.inputs import ModelFile
from ortq.validate.metrics import OutputStats, TaskStats, fitting_mask
from ortq.validate.placement import has_qdq

logger = logging.getLogger(__name__)

__all__ = ["Comparison", "SessionPair", "choose_outputs", "compare", "open_sessions", "session_settings"]


@dataclass
class SessionPair:
    """The fp32 and the quantized session of one provider (same settings)."""

    reference: Any
    quantized: Any


def provider_rows(keys: Sequence[str], availability: Mapping[str, tuple[bool, str | None]]
                  ) -> tuple[dict[str, dict[str, Any]], list[tuple[str, dict[str, Any]]]]:
    """A report row per provider (``skipped`` with the reason where it is not available), and the
    ``(key, row)`` pairs of those that can be tried."""
    rows: dict[str, dict[str, Any]] = {}
    runnable = []
    for k in keys:
        rows[k] = row = {"name": k, "execution_provider": EXECUTION_PROVIDERS[k]}
        ok, reason = availability[k]
        if ok:
            runnable.append((k, row))
        else:
            row.update(status="skipped", reason=reason)
    return rows, runnable


def open_sessions(
    keys: Sequence[str],
    availability: Mapping[str, tuple[bool, str | None]],
    required: set[str],
    reference: ModelFile,
    quantized: ModelFile,
    *,
    settings: SessionSettings,
    cache_dir: str,
) -> tuple[dict[str, dict[str, Any]], dict[str, SessionPair]]:
    """A report row per provider and the sessions of those that can run.

    A provider that is not available or whose session fails is a ``skipped`` row with the reason, unless it
    is in ``required``: then :class:`ValidationFailed` is raised. The quantized session of TensorRT gets INT8
    enabled when the model holds QDQ nodes.
    """
    rows, runnable = provider_rows(keys, availability)
    sessions: dict[str, SessionPair] = {}
    int8_qdq = has_qdq(quantized.proto)
    for k, row in runnable:
        try:
            rs = create_session(
                reference.path, provider=k, settings=settings, trt_cache_dir=cache_dir, what=str(reference.path)
            )
            qs = create_session(
                quantized.path, provider=k, settings=settings, int8_qdq=int8_qdq, trt_cache_dir=cache_dir,
                what=str(quantized.path),
            )
        except ProviderFailed as exc:
            if k in required:
                raise ValidationFailed(f"required provider {k} cannot run: {exc}") from exc
            row.update(status="skipped", reason=str(exc))
            continue
        row.update(status="ok", reason=None, session_providers=list(qs.get_providers()))
        row["session"] = describe_session(qs)
        sessions[k] = SessionPair(rs, qs)
    return rows, sessions


def session_settings(sessions: Mapping[str, SessionPair]) -> dict[str, Any]:
    """The session options the comparison really ran with, read back from the first quantized session (all
    sessions share them); empty when no provider ran."""
    for pair in sessions.values():
        described = describe_session(pair.quantized)
        described.pop("providers", None)
        return described
    return {}


@dataclass
class Outputs:
    """What is compared.

    Attributes:
        task: a name of :mod:`ortq.tasks`, or ``none``.
        task_output: the output the task is judged on (None for ``none``).
        names: the float outputs both models have, in the reference's order.
        primary: the output the headline figures describe: the task output, else the first float output.
    """

    task: str
    task_output: str | None
    names: list[str]

    @property
    def primary(self) -> str | None:
        return self.task_output or (self.names[0] if self.names else None)


def choose_outputs(sessions: Mapping[str, SessionPair], feed: Mapping[str, np.ndarray], task: str | None) -> Outputs:
    """The outputs to compare and the task, guessed from the first shared float output unless given.

    A forced task other than ``none`` that the outputs do not suggest is judged on the first float output.

    Raises:
        ModelError: the two models share no float output.
    """
    if not sessions:
        return Outputs(task or "none", None, [])
    pair = next(iter(sessions.values()))
    q_names = set(float_outputs(pair.quantized))
    names = [o for o in float_outputs(pair.reference) if o in q_names]
    if not names:
        raise ModelError(
            "the quantized and reference models share no float output name; validate models with the same outputs"
        )
    _, first = next(run_batches(pair.reference, [feed], names[:1], what="the first batch"))
    inferred, inferred_out = task_from_outputs(names[:1], [np.shape(first[names[0]])], feed.keys())
    if task is None:
        return Outputs(inferred or "none", inferred_out, names)
    if task == "none":
        return Outputs("none", None, names)
    if inferred == task:
        return Outputs(task, inferred_out, names)
    return Outputs(task, names[0], names)


@dataclass
class Comparison:
    """The figures of one provider, accumulated batch by batch."""

    outputs: Outputs
    top_k: int
    fidelity: dict[str, OutputStats] = field(init=False)
    task: TaskStats = field(init=False)
    parity: dict[str, OutputStats] = field(init=False)

    def __post_init__(self) -> None:
        self.fidelity = {o: OutputStats() for o in self.outputs.names}
        self.task = TaskStats(self.outputs.task, self.outputs.task_output, self.top_k)
        self.parity = {"reference": OutputStats(), "quantized": OutputStats()}

    def update(self, feed: Mapping[str, np.ndarray], ro: Mapping[str, np.ndarray], qo: Mapping[str, np.ndarray]) -> None:
        """Add one batch: quantized vs fp32 on every output, and the task output."""
        mask = feed.get("attention_mask")
        for o in self.outputs.names:
            self.fidelity[o].update(ro[o], qo[o], fitting_mask(ro[o], mask))
        if self.outputs.task_output is not None:
            self.task.update(ro[self.outputs.task_output], qo[self.outputs.task_output], feed)

    def update_parity(self, feed: Mapping[str, np.ndarray], cpu: tuple[Mapping, Mapping], ro, qo) -> None:
        """Add one batch of this provider's primary output against the CPU's, for each model."""
        primary = self.outputs.primary
        if primary is None:
            return
        m = fitting_mask(ro[primary], feed.get("attention_mask"))
        self.parity["reference"].update(cpu[0][primary], ro[primary], m)
        self.parity["quantized"].update(cpu[1][primary], qo[primary], m)

    def row(self) -> dict[str, Any]:
        """The ``fidelity``, ``task`` and (off the CPU) ``parity_vs_cpu`` entries of a provider row."""
        outs = {o: s.result() for o, s in self.fidelity.items()}
        primary = self.outputs.primary
        head = outs.get(primary, {}) if primary else {}
        row: dict[str, Any] = {
            "fidelity": {
                "primary_output": primary,
                "cosine": head.get("cosine_mean"),
                "cosine_min": head.get("cosine_min"),
                "max_abs_error": head.get("max_abs_error"),
                "mean_abs_error": head.get("mean_abs_error"),
                "sqnr_db": head.get("sqnr_db"),
                "outputs": outs,
            },
            "task": self.task.result(),
        }
        if self.parity["reference"].cosines:
            row["parity_vs_cpu"] = {
                "output": primary,
                "reference": self.parity["reference"].summary(),
                "quantized": self.parity["quantized"].summary(),
            }
        return row


def _pair_runs(
    key: str, pair: SessionPair, batches: Sequence[Mapping[str, np.ndarray]], fetch: list[str]
) -> Iterator[tuple[Mapping[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """``(batch, fp32 outputs, quantized outputs)`` for each batch on one provider.

    A failing run is a :class:`ModelError` on the CPU and :class:`ValidationFailed` elsewhere; a batch that
    lacks a graph input stays a :class:`CalibrationDataError`.
    """
    try:
        yield from (
            (feed, ro, qo)
            for (feed, ro), (_, qo) in zip(
                run_batches(pair.reference, batches, fetch, what=f"the fp32 model on {key}"),
                run_batches(pair.quantized, batches, fetch, what=f"the quantized model on {key}"),
                strict=True,
            )
        )
    except CalibrationDataError as exc:
        if exc.__cause__ is None:
            raise
        raise run_failure(key, exc.__cause__) from exc.__cause__


def run_failure(key: str, cause: BaseException) -> Exception:
    """What ONNX Runtime failing to run the models on provider ``key`` is: a :class:`ModelError` on the CPU,
    :class:`ValidationFailed` elsewhere."""
    if key == "cpu":
        return ModelError(f"onnxruntime failed to run the models on cpu: {cause}")
    return ValidationFailed(f"{key}: run failed: {first_line(cause)}")


def compare(
    sessions: Mapping[str, SessionPair], batches: Sequence[Mapping[str, np.ndarray]], outputs: Outputs, top_k: int
) -> dict[str, Comparison]:
    """Run every provider's pair on every batch (CPU first on each) and accumulate the figures."""
    order = sorted(sessions, key=lambda k: k != "cpu")
    results = {k: Comparison(outputs, top_k) for k in order}
    runs = [_pair_runs(k, sessions[k], batches, outputs.names) for k in order]
    for step in zip(*runs, strict=True):
        cpu_out = None
        for k, (feed, ro, qo) in zip(order, step, strict=True):
            results[k].update(feed, ro, qo)
            if k == "cpu":
                cpu_out = (ro, qo)
            elif cpu_out is not None:
                results[k].update_parity(feed, cpu_out, ro, qo)
    return results
