"""Activation statistics the rewrite passes need, gathered over the calibration batches.

* :func:`channel_absmax`: per-channel (last axis) ``max |x|``, reduced inside the graph, and optionally a
  sample of non-padded rows: what SmoothQuant scales and its alpha search read.
* :func:`second_moments`: per-channel sum of squares and row count (RTN's channel weighting) and, on request,
  ``X^T X`` (GPTQ's Hessian), over non-padded positions, accumulated in float64.
* :class:`GroupedHessians`: those ``X^T X`` group by group, within a byte budget: one calibration pass per
  group, computed when a pass first reads one of its activations, the previous group freed first.

Both run the model through :mod:`ortq.runtime` (one session, one loop); the passes receive the results.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ortq.calibrators.engine import LocalEngine, ShardJob
from ortq.calibrators.graph import observed_session, pruned_to
from ortq.runtime import (
    SessionSettings,
    attention_mask_of,
    batch_samples,
    batch_size_of,
    release_freed_memory,
    run_batches,
)

logger = logging.getLogger(__name__)


@dataclass
class ActivationStatistics:
    """Statistics of activations, by tensor name; each field is filled only when asked for.

    Attributes:
        absmax: per-channel ``max |x|`` (non-finite values count as 0).
        rows: up to ``sample_rows`` finite, non-padded rows ``[n, C]``; an activation with none is absent.
        count: non-padded rows seen.
        sum_squares: per-channel ``sum x^2`` (float64).
        sums: per-channel ``sum x`` (float64), beside ``sum_squares``.
        hessians: ``X^T X`` (float64, ``[C, C]``).
    """

    absmax: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    sum_squares: dict[str, np.ndarray] = field(default_factory=dict)
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    hessians: dict[str, np.ndarray] = field(default_factory=dict)

    def mean_square(self, name: str) -> np.ndarray | None:
        """Per-channel mean of ``x^2`` of ``name``, if gathered."""
        if name not in self.sum_squares:
            return None
        return self.sum_squares[name] / max(self.count.get(name, 0), 1)

    def mean(self, name: str) -> np.ndarray | None:
        """Per-channel mean of ``name``, if gathered."""
        if name not in self.sums:
            return None
        return self.sums[name] / max(self.count.get(name, 0), 1)

    @property
    def tokens(self) -> int:
        """Non-padded rows seen (of the first activation)."""
        return int(next(iter(self.count.values()), 0))


def _absmax_additions(model: ir.Model, activations: Sequence[str], sample_rows: int) -> tuple[onnx.ModelProto, list[str]]:
    aug = onnx.ModelProto()
    g = aug.graph
    opset = model.opset_imports.get("", 0)
    outputs = []
    existing = {o.name for o in model.graph.outputs}
    for i, name in enumerate(activations):
        abs_out, flat, red_out = f"__ortq_abs_{i}", f"__ortq_flat_{i}", f"__ortq_chmax_{i}"
        g.node.append(onnx.helper.make_node("Abs", [name], [abs_out]))
        # Flatten all leading axes, then max over them: a [C] vector whatever the rank.
        g.node.append(onnx.helper.make_node("Flatten", [abs_out], [flat], axis=-1))
        if opset >= 18:
            axes = f"__ortq_axes_{i}"
            g.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), axes))
            g.node.append(onnx.helper.make_node("ReduceMax", [flat, axes], [red_out], keepdims=0))
        else:
            g.node.append(onnx.helper.make_node("ReduceMax", [flat], [red_out], axes=[0], keepdims=0))
        outputs.append(red_out)
        g.output.append(onnx.helper.make_empty_tensor_value_info(red_out))
        if sample_rows and name not in existing:
            g.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return aug, outputs


# Bytes of whole activations fetched in one run for SmoothQuant's row sample (estimated from the batch's tokens
# and the activations' widths); more are fetched over further runs of the same batch.
ROW_FETCH_BYTES = 128 << 20
# Bytes of float64 rows (and of one column block of X^T X) folded into the weight statistics at a time.
FOLD_CHUNK_BYTES = 32 << 20


def _last_dims(model: ir.Model, names: Sequence[str]) -> dict[str, int]:
    """The last axis of each activation in ``names`` whose shape the graph knows, or that multiplies a constant
    weight (``MatMul(x, W)``: the rows of ``W``)."""
    wanted, dims = set(names), {}
    for node in model.graph:
        for v in node.outputs:
            if v.name in wanted and v.shape is not None and len(v.shape) and isinstance(v.shape[-1], int):
                dims[v.name] = int(v.shape[-1])
        x, w = (node.inputs + (None, None))[:2]
        if node.op_type == "MatMul" and x is not None and x.name in wanted and x.name not in dims \
                and w is not None and w.const_value is not None and len(w.const_value.shape) == 2:
            dims[x.name] = int(w.const_value.shape[0])
    return dims


def _tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Rows an activation of ``batch`` has: the largest ``batch x sequence`` input (1 for none)."""
    return max((int(np.size(v)) for v in batch.values() if np.ndim(v) >= 2), default=1)


def _fetch_groups(names: Sequence[str], widths: Mapping[str, int],
                  batch: Mapping[str, np.ndarray]) -> list[list[str]]:
    """``names`` in order, cut into groups whose activations take about :data:`ROW_FETCH_BYTES` at most on
    ``batch`` (``tokens x width`` float32 values each; an activation of unknown width is a group alone)."""
    tokens = _tokens(batch)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        need = tokens * widths[name] * 4 if name in widths else ROW_FETCH_BYTES + 1
        if groups[-1] and size + need > ROW_FETCH_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return groups


def _parts(batch: Mapping[str, np.ndarray], names: Sequence[str],
           widths: Mapping[str, int]) -> list[Mapping[str, np.ndarray]]:
    """``batch`` cut along its samples so that one run's ``names`` (graph outputs: ONNX Runtime holds all of
    them until the run ends, fetched or not) take about :data:`ROW_FETCH_BYTES` at most; in order."""
    n = batch_size_of(batch)
    tokens = _tokens(batch)
    total = tokens * 4 * sum(widths.get(name, 0) for name in names)
    pieces = min(n, -(-total // ROW_FETCH_BYTES))
    if pieces <= 1:
        return [batch]
    bounds = np.linspace(0, n, pieces + 1).astype(int)
    return [batch_samples(batch, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def channel_absmax(
    model: ir.Model,
    activations: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    sample_rows: int = 0,
) -> ActivationStatistics:
    """Per-channel ``max |x|`` of ``activations`` (and up to ``sample_rows`` rows of each, from the first
    batches, for the alpha search). ``model`` is not changed."""
    activations = list(activations)
    additions, outputs = _absmax_additions(model, activations, sample_rows)
    widths = _last_dims(model, activations) if sample_rows else {}
    # No memory pattern nor arena: batches padded to their longest sentence come in many shapes, and what is
    # kept for them grows the RSS (by GBs on a large model) while the session holds its weights.
    session = observed_session(model, additions, settings=SessionSettings(memory_pattern=False, arena=False),
                               what="the model for SmoothQuant")
    stats = ActivationStatistics()
    samples: dict[str, list[np.ndarray]] = {name: [] for name in activations}
    taken = 0
    for batch in (part for whole in batches for part in _parts(whole, activations, widths)):
        want_rows = bool(sample_rows) and taken < sample_rows
        # Whole activations are fetched for the row sample: in groups of at most ROW_FETCH_BYTES per run (the
        # first with the reductions), so that a large model's outputs do not all sit in memory at once.
        groups = _fetch_groups(activations, widths, batch) if want_rows else [[]]
        n_rows = 0
        for i, group in enumerate(groups):
            fetch = (outputs if i == 0 else []) + group
            ((_, values),) = run_batches(session, [batch], fetch, what="a calibration batch")
            if i == 0:
                for name, out in zip(activations, outputs, strict=True):
                    value = np.nan_to_num(values[out].astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
                    stats.absmax[name] = value if name not in stats.absmax else np.maximum(stats.absmax[name], value)
            mask = attention_mask_of(batch) if group else None
            for name in group:
                x = values[name]
                if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                    rows = x[mask.astype(bool)]
                else:
                    rows = x.reshape(-1, x.shape[-1])
                rows = rows[np.isfinite(rows).all(axis=1)][: sample_rows - taken]
                samples[name].append(rows.astype(np.float32))
                n_rows = len(rows)
            del values
            release_freed_memory()
        taken += n_rows
    del session  # its copy of the weights goes before the samples are joined
    release_freed_memory()
    # An activation with no finite row (NaN upstream) gets no samples: its alpha search is skipped. Each one's
    # pieces are let go as it is joined, so the sample is never held twice.
    for name in list(samples):
        pieces = samples.pop(name)
        if sum(len(a) for a in pieces):
            stats.rows[name] = np.concatenate(pieces)
        del pieces
    return stats


def add_gram(gram: np.ndarray, x: np.ndarray) -> None:
    """``gram += x.T @ x`` in place, one block of columns at a time (temporaries of about
    :data:`FOLD_CHUNK_BYTES`, not a second ``K x K`` array)."""
    width = x.shape[1]
    step = max(1, FOLD_CHUNK_BYTES // (8 * max(width, 1)))
    for j in range(0, width, step):
        gram[:, j:j + step] += x.T @ x[:, j:j + step]


class MomentsJob(ShardJob):
    """Row counts, per-channel sums of squares and (with ``hessians``) ``X^T X`` of ``activations``, as a
    :class:`~ortq.calibrators.engine.ShardJob`: all are sums, merged by adding the shards' partials in shard
    order (so any engine gives the same float64 bits)."""

    foldable = True

    def __init__(self, activations: Sequence[str], *, hessians: bool = False):
        self.activations = list(dict.fromkeys(activations))
        self.hessians = hessians

    def open(self, model: ir.Model):
        # Only what computes the activations: on a decoder, not the logits, nor for Hessians gathered group
        # by group (GroupedHessians) the layers after a group.
        model = pruned_to(model, self.activations)
        additions = onnx.ModelProto()
        existing = {o.name for o in model.graph.outputs}
        additions.graph.output.extend(
            onnx.helper.make_empty_tensor_value_info(n) for n in self.activations if n not in existing
        )
        settings = SessionSettings(optimization="disable", memory_pattern=False, arena=False)
        widths = _last_dims(model, self.activations)
        return observed_session(model, additions, settings=settings, what="the model for weight statistics"), widths

    def run(self, opened, batches: Sequence[Mapping[str, np.ndarray]]) -> ActivationStatistics:
        session, widths = opened
        stats = ActivationStatistics()
        # Whole activations are fetched, and ONNX Runtime holds every output of a run until it ends: each batch
        # is cut along its samples so that one run's take about ROW_FETCH_BYTES at most, not GBs beside a large
        # model's weights.
        parts = (part for whole in batches for part in _parts(whole, self.activations, widths))
        for batch, outs in run_batches(session, parts, self.activations, what="a calibration batch"):
            self._fold(stats, batch, outs)
            del outs
            release_freed_memory()
        return stats

    def _fold(self, stats: ActivationStatistics, batch: Mapping[str, np.ndarray],
              outs: Mapping[str, np.ndarray]) -> None:
        mask = attention_mask_of(batch)
        for name in self.activations:
            x = np.asarray(outs[name], np.float32)
            rows = None
            if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
                rows = np.flatnonzero(mask.reshape(-1).astype(bool))
            x = x.reshape(-1, x.shape[-1])
            width = x.shape[1]
            total = x.shape[0] if rows is None else rows.size
            stats.count[name] = stats.count.get(name, 0) + total
            squares = stats.sum_squares.setdefault(name, np.zeros(width, np.float64))
            sums = stats.sums.setdefault(name, np.zeros(width, np.float64))
            gram = stats.hessians.setdefault(name, np.zeros((width, width))) if self.hessians else None
            # float64 copies of FOLD_CHUNK_BYTES of rows at a time, and X^T X added in place by column blocks:
            # a whole activation in float64 and a second K x K product would cost GBs beside a large model.
            step = max(1, FOLD_CHUNK_BYTES // (8 * max(width, 1)))
            for r in range(0, total, step):
                chunk = (x[r:r + step] if rows is None else x[rows[r:r + step]]).astype(np.float64)
                squares += np.einsum("ij,ij->j", chunk, chunk)
                sums += chunk.sum(axis=0)
                if gram is not None:
                    add_gram(gram, chunk)

    def merge(self, partials: Sequence[ActivationStatistics]) -> ActivationStatistics:
        total = ActivationStatistics()
        for part in partials:
            for name, n in part.count.items():
                total.count[name] = total.count.get(name, 0) + n
            for field_name in ("sum_squares", "sums", "hessians"):
                into, add = getattr(total, field_name), getattr(part, field_name)
                for name, value in add.items():
                    into[name] = into[name] + value if name in into else value.copy()
        return total


def second_moments(
    model: ir.Model,
    activations: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    hessians: bool = False,
    engine: Any = None,
) -> ActivationStatistics:
    """Row count and per-channel sum of squares of ``activations`` over non-padded positions, and their
    ``X^T X`` with ``hessians`` (float64). ``model`` is not changed. ``engine`` runs the shards
    (:class:`~ortq.calibrators.engine.LocalEngine` by default, or a
    :class:`~ortq.calibrators.engine.RayEngine`): the result is the same bits either way."""
    engine = engine if engine is not None else LocalEngine()
    stats = engine.run(MomentsJob(activations, hessians=hessians), model, batches)
    release_freed_memory()  # the session's weights: GPTQ's next steps (or the next group's pass) need the room
    return stats


def hessian_groups(widths: Mapping[str, int], budget_bytes: int) -> list[list[str]]:
    """``widths`` (activation -> channels, in the order the model reads them) cut into consecutive groups
    whose float64 ``X^T X`` take at most ``budget_bytes`` together (an activation over the budget alone is a
    group of its own)."""
    groups: list[list[str]] = []
    size = 0
    for name, c in widths.items():
        need = int(c) * int(c) * 8
        if not groups or size + need > budget_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return groups


class GroupedHessians(Mapping[str, np.ndarray]):
    """``X^T X`` of activations as a read-only mapping that holds one group at a time.

    The first read of an activation of another group frees the current one and runs
    :func:`second_moments` over ``batches`` for the activations of that group only. Each activation's sum is
    the same float64 sum, in the same batch and shard order, as one pass over all of them would give: the
    values are bit-identical, memory holds one group's Hessians, and the calibration data is run once per
    group. Readers should go through the groups in order (a group read again is computed again).

    Args:
        model, batches, engine: as for :func:`second_moments`.
        groups: the activations, cut by :func:`hessian_groups`.
    """

    gathered_by_group = True  # a read of another group costs a calibration pass

    def __init__(self, model: ir.Model, groups: Sequence[Sequence[str]], batches: Sequence[Mapping[str, np.ndarray]],
                 *, engine: Any = None):
        self.model = model
        self.groups = [list(g) for g in groups]
        self.batches = batches
        self.engine = engine
        self._group_of = {n: i for i, g in enumerate(self.groups) for n in g}
        self._loaded: int | None = None
        self._current: dict[str, np.ndarray] = {}
        self.passes = 0

    def __getitem__(self, name: str) -> np.ndarray:
        i = self._group_of[name]
        if i != self._loaded:
            self._current, self._loaded = {}, None  # freed before the next group is gathered
            self._current = second_moments(self.model, self.groups[i], self.batches, hessians=True,
                                           engine=self.engine).hessians
            self._loaded = i
            self.passes += 1
            logger.info("Hessians of group %d/%d (%d activation(s))", i + 1, len(self.groups), len(self.groups[i]))
        return self._current[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._group_of)

    def __len__(self) -> int:
        return len(self._group_of)
