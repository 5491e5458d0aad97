"""Run ONNX Runtime over calibration batches and stream the statistics of chosen tensors into observers.

Nothing is kept between batches but the observers' state, so memory is flat in the number of samples.

* MinMax reduces inside the graph: for each observed tensor the augmented model also outputs its per-row
  minimum and maximum (``ReduceMin``/``ReduceMax`` over the trailing axes), so only ``[batch, seq]``-sized
  arrays cross into Python. Rows that are padding (``attention_mask == 0``) or that hold non-finite /
  mask-sentinel values are dropped there.
* Histogram methods fetch the tensor, drop padded positions, and bin the rest (see ``_histogram``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ortq.calibrators.base import SENTINEL_ABS, Observer, TensorRange, make_observer, observer_class
from ortq.calibrators.engine import ShardJob
from ortq.calibrators.graph import as_ir_model, light_proto, observed_session
from ortq.config import CalibrationConfig, CalibrationMethod
from ortq.errors import CalibrationDataError, ModelError
from ortq.runtime import SessionSettings, batch_size_of, feed_for, release_freed_memory, run_batches

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


class CalibrationState:
    """The observers of every calibrated tensor: mergeable, saveable, resumable."""

    def __init__(self, config: CalibrationConfig, observers: dict[str, Observer] | None = None):
        self.config = config
        self.observers: dict[str, Observer] = observers if observers is not None else {}
        self.num_samples = 0
        self.num_batches = 0

    def observer(self, name: str) -> Observer:
        if name not in self.observers:
            self.observers[name] = make_observer(self.config)
        return self.observers[name]

    def merge(self, other: CalibrationState) -> None:
        """Fold ``other`` (same method) into this state: partial fits on shards add up to one fit."""
        if other.config.method != self.config.method:
            raise CalibrationDataError(
                f"cannot merge {other.config.method.value} statistics into {self.config.method.value} statistics"
            )
        for name, obs in other.observers.items():
            self.observer(name).merge(obs)
        self.num_samples += other.num_samples
        self.num_batches += other.num_batches

    def compute_ranges(self) -> dict[str, TensorRange]:
        return {name: obs.compute_range() for name, obs in self.observers.items()}

    def summary(self) -> dict[str, Any]:
        """What went into the ranges, for reports: samples, method, excluded (non-finite / mask) counts."""
        excluded = {n: o.num_excluded for n, o in self.observers.items() if o.num_excluded}
        return {
            "method": self.config.method.value,
            "config": self.config.to_dict(),
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
            "num_tensors": len(self.observers),
            "tensors_with_excluded_values": excluded,
            "num_excluded_values": int(sum(excluded.values())),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to an ``.npz`` file (atomically)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        names = list(self.observers)
        for i, name in enumerate(names):
            for key, value in self.observers[name].state_dict().items():
                arrays[f"{i}/{key}"] = np.asarray(value)
        meta = {
            "format": "ortq-calibration-state-1",
            "config": self.config.to_dict(),
            "names": names,
            "num_samples": self.num_samples,
            "num_batches": self.num_batches,
        }
        arrays["__meta__"] = np.array(json.dumps(meta))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationState:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["__meta__"]))
                data = {k: npz[k] for k in npz.files if k != "__meta__"}
        except FileNotFoundError:
            raise CalibrationDataError(f"{path}: no such calibration state file") from None
        except Exception as exc:
            raise CalibrationDataError(
                f"{path}: not an ortq calibration state ({type(exc).__name__})"
            ) from exc
        if meta.get("format") != "ortq-calibration-state-1":
            raise CalibrationDataError(f"{path}: unknown calibration state format {meta.get('format')!r}")
        config = CalibrationConfig.from_dict(meta["config"])
        obs_cls = observer_class(config)
        state = cls(config)
        for i, name in enumerate(meta["names"]):
            prefix = f"{i}/"
            fields = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
            state.observers[name] = obs_cls.from_state_dict(config, fields)
        state.num_samples = int(meta["num_samples"])
        state.num_batches = int(meta["num_batches"])
        return state


def _value_info(model: ir.Model) -> tuple[dict[str, int], dict[str, tuple[bool, ...]]]:
    """Element type of every value the graph knows, and which of its axes have a static size (after shape
    inference where it succeeds). A static axis is never the sequence axis."""
    light = light_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:
        inferred = light
    g = inferred.graph
    types: dict[str, int] = {}
    static: dict[str, tuple[bool, ...]] = {}
    for v in (*g.input, *g.value_info, *g.output):
        tt = v.type.tensor_type
        types[v.name] = tt.elem_type
        if tt.HasField("shape"):
            static[v.name] = tuple(d.HasField("dim_value") for d in tt.shape.dim)
    types.update({name: v.dtype.value for name, v in model.graph.initializers.items() if v.dtype is not None})
    return types, static


class RangeCollector:
    """Streams tensor statistics of ``model`` over calibration batches into a :class:`CalibrationState`.

    Args:
        model: the float model (``onnx_ir`` model, proto or path); it is serialized for the session, again
            only when :meth:`close` let the session go and more data comes.
        tensor_names: the activations to observe.
        config: the calibration method and its settings.
        providers: ONNX Runtime providers (default CPU).
        intra_op_num_threads: threads of the calibration session (None: ONNX Runtime's default).
    """

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto | str | os.PathLike,
        tensor_names: Sequence[str],
        config: CalibrationConfig,
        *,
        providers: Sequence[str] | None = None,
        intra_op_num_threads: int | None = None,
    ):
        self.config = config
        self.state = CalibrationState(config)
        model = as_ir_model(model)
        types, static = _value_info(model)
        produced = {v.name for n in model.graph for v in n.outputs} | {v.name for v in model.graph.inputs}
        names = []
        for name in dict.fromkeys(tensor_names):
            if name not in produced:
                raise ModelError(f"tensor {name!r} is not produced by the graph")
            if types.get(name, onnx.TensorProto.FLOAT) not in _FLOAT_TYPES:
                logger.debug("skipping non-float tensor %s", name)
                continue
            names.append(name)
        self.tensor_names = names
        self._static = {name: static.get(name, ()) for name in names}
        for name in names:
            self.state.observer(name)
        self._in_graph = config.method is CalibrationMethod.MINMAX
        self._providers = list(providers) if providers else None
        self._threads = intra_op_num_threads
        self._model: ir.Model | None = model
        self._extra = self._augment(model)
        self._session = None

    # --------------------------------------------------------------------------------------- the graph

    def _augment(self, model: ir.Model) -> onnx.ModelProto:
        """The additions to the graph, as a model holding only them: serialized after the original model,
        protobuf merges the two (repeated fields append), so the weights are never copied."""
        aug = onnx.ModelProto()
        graph = aug.graph
        existing = {o.name for o in model.graph.outputs}
        opset = model.opset_imports.get("", 13)
        self._outputs: dict[str, tuple[str, ...]] = {}
        for i, name in enumerate(self.tensor_names):
            if not self._in_graph:
                if name not in existing:
                    graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                self._outputs[name] = (name,)
                continue
            # Extremes of each row of the last axis: x -> [1, *x.shape] -> reduce axis -1 -> [1, *x.shape[:-1]].
            # The leading 1 makes scalars work too; the tensor's shape comes back to count values.
            x, shape, target, rows = (f"__ortq_{k}_{i}" for k in ("f32", "shape", "target", "rows"))
            graph.node.append(onnx.helper.make_node("Cast", [name], [x], to=onnx.TensorProto.FLOAT))
            graph.node.append(onnx.helper.make_node("Shape", [x], [shape]))
            graph.node.append(onnx.helper.make_node("Concat", ["__ortq_one", shape], [target], axis=0))
            graph.node.append(onnx.helper.make_node("Reshape", [x, target], [rows]))
            lo, hi = f"__ortq_min_{i}", f"__ortq_max_{i}"
            if opset >= 18:
                graph.node.append(onnx.helper.make_node("ReduceMin", [rows, "__ortq_last"], [lo], keepdims=0))
                graph.node.append(onnx.helper.make_node("ReduceMax", [rows, "__ortq_last"], [hi], keepdims=0))
            else:
                graph.node.append(onnx.helper.make_node("ReduceMin", [rows], [lo], axes=[-1], keepdims=0))
                graph.node.append(onnx.helper.make_node("ReduceMax", [rows], [hi], axes=[-1], keepdims=0))
            graph.output.extend(onnx.helper.make_empty_tensor_value_info(v) for v in (lo, hi, shape))
            self._outputs[name] = (lo, hi, shape)
        if self._in_graph and self.tensor_names:
            consts = {"__ortq_one": np.array([1], np.int64)}
            if opset >= 18:
                consts["__ortq_last"] = np.array([-1], np.int64)
            graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in consts.items())
        return aug

    def _session_for_run(self):
        if self._session is None:
            # Plain execution (fusions could remove the very tensors observed); no memory pattern: batches
            # padded to their longest sentence come in many shapes, and a pattern cached per shape grows the RSS.
            settings = SessionSettings(threads=self._threads, optimization="basic", memory_pattern=False, arena=False)
            self._session = observed_session(
                self._model, self._extra, settings=settings, providers=self._providers,
                what="the model for calibration",
            )
        return self._session

    def close(self) -> None:
        """Let the session (and its copy of the weights) go; a later :meth:`collect` opens a new one."""
        self._session = None
        release_freed_memory()

    # ---------------------------------------------------------------------------------------- the loop

    def collect(
        self,
        batches: Iterable[Mapping[str, np.ndarray]],
        total: int | None = None,
        *,
        show_progress: bool = True,
    ) -> CalibrationState:
        """Run every batch and fold its statistics in; may be called again with more data."""
        session = self._session_for_run()
        fetch = [o for name in self.tensor_names for o in self._outputs[name]]
        desc = f"calibrating ({self.config.method.value})" if show_progress else None
        logger.info("calibrating (%s) %d tensors%s", self.config.method.value, len(self.tensor_names),
                    f" on {total} batches" if total is not None else "")
        for batch, outs in run_batches(session, batches, fetch, desc=desc, total=total, what="a calibration batch"):
            # The mask is read from the batch even when the graph does not take it as an input.
            mask = batch.get("attention_mask") if self.config.exclude_padding else None
            self._fold(outs, np.asarray(mask) if mask is not None else None)
            self.state.num_samples += batch_size_of(feed_for(session, batch)) if batch else 0
            self.state.num_batches += 1
        if self.state.num_batches == 0:
            raise CalibrationDataError("calibration data produced no batches")
        return self.state

    def _fold(self, outs: dict[str, np.ndarray], mask: np.ndarray | None) -> None:
        for name in self.tensor_names:
            obs = self.state.observers[name]
            static = self._static[name]
            if not self._in_graph:
                x = outs[name]
                keep = _row_mask(x.shape, mask, static)
                obs.update(x[keep] if keep is not None else x)
                continue
            lo_name, hi_name, shape_name = self._outputs[name]
            shape = tuple(int(d) for d in outs[shape_name])
            row_len = shape[-1] if shape else 1
            if row_len == 0:
                continue
            lo, hi = outs[lo_name], outs[hi_name]
            if shape:  # drop the leading 1 of [1, *shape[:-1]]
                lo, hi = lo[0], hi[0]
            keep = _row_mask(shape, mask, static)
            if keep is not None and keep.ndim >= len(shape):
                keep = None  # the padding runs along the reduced axis: rows are taken whole
            lo, hi = (lo[keep], hi[keep]) if keep is not None else (lo.ravel(), hi.ravel())
            # A row holding a non-finite or mask-sentinel value is dropped whole: its values are excluded.
            bad = ~((np.abs(lo) < SENTINEL_ABS) & (np.abs(hi) < SENTINEL_ABS))
            if bad.any():
                obs.num_excluded += int(bad.sum()) * row_len
                lo, hi = lo[~bad], hi[~bad]
            if lo.size:
                obs.num_values += int(lo.size) * row_len
                obs.update_extremes(float(lo.min()), float(hi.max()))


def _row_mask(
    shape: tuple[int, ...], mask: np.ndarray | None, static: tuple[bool, ...] = ()
) -> np.ndarray | None:
    """A boolean index selecting the non-padded positions of a tensor (over its leading axes), else None.

    Layouts: ``[batch, seq, ...]``, ``[batch, X, seq, ...]`` (heads) and ``[batch * seq, ...]`` (flattened
    before a MatMul). ``static`` flags the axes whose size the graph fixes (heads, hidden): those are never
    taken for the sequence axis, so 12 heads are not mistaken for 12 tokens.
    """
    if mask is None or mask.ndim != 2 or not shape:
        return None
    b, s = mask.shape

    def dynamic(axis: int) -> bool:
        return axis >= len(static) or not static[axis]

    m = mask.astype(bool)
    if len(shape) >= 2 and shape[0] == b and shape[1] == s and dynamic(1):
        return m  # [batch, seq, ...]
    if len(shape) >= 3 and shape[0] == b and shape[2] == s and dynamic(2):
        return np.broadcast_to(m[:, None, :], shape[:3])  # [batch, heads, seq, ...]
    if shape[0] == b * s and dynamic(0):
        return m.reshape(-1)  # [batch * seq, ...]
    return None




class RangesJob(ShardJob):
    """Range statistics of ``tensor_names`` as a :class:`~ortq.calibrators.engine.ShardJob`: each worker keeps
    one :class:`RangeCollector` session; a shard gives a fresh :class:`CalibrationState`."""

    def __init__(self, tensor_names: Sequence[str], config: CalibrationConfig, *,
                 providers: Sequence[str] | None = None, intra_op_num_threads: int | None = None):
        self.tensor_names = list(tensor_names)
        self.config = config
        self.providers = list(providers) if providers else None
        self.threads = intra_op_num_threads

    def open(self, model: ir.Model) -> RangeCollector:
        return RangeCollector(model, self.tensor_names, self.config, providers=self.providers,
                              intra_op_num_threads=self.threads)

    def run(self, opened: RangeCollector, batches: Sequence[Mapping[str, np.ndarray]]) -> CalibrationState:
        opened.state = CalibrationState(self.config)
        for name in opened.tensor_names:
            opened.state.observer(name)
        return opened.collect(batches, total=len(batches), show_progress=False)

    def merge(self, partials: Sequence[CalibrationState]) -> CalibrationState:
        state = CalibrationState(self.config)
        for partial in partials:
            state.merge(partial)
        return state
