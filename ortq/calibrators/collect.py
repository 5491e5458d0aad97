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
from tqdm.auto import tqdm

from ortq.calibrators.base import SENTINEL_ABS, Observer, TensorRange, make_observer, observer_class
from ortq.config import CalibrationConfig, CalibrationMethod
from ortq.errors import CalibrationDataError, ModelError, first_line

logger = logging.getLogger(__name__)

_MAX_PROTO_BYTES = 1_800_000_000
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


def _load_proto(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model))
    except Exception as exc:
        raise ModelError(f"{model}: cannot load ({exc})") from exc


def _approx_bytes(proto: onnx.ModelProto) -> int:
    """Size of the model's initializers (a cheap lower bound of ``ByteSize``)."""
    total = 0
    for t in proto.graph.initializer:
        total += (
            len(t.raw_data)
            + 4 * (len(t.float_data) + len(t.int32_data))
            + 8 * (len(t.int64_data) + len(t.double_data))
        )
    return total


def _light_copy(proto: onnx.ModelProto, max_init_bytes: int = 4096) -> onnx.ModelProto:
    """The model without its large initializers (declared as graph inputs instead): enough for shape
    inference, without copying the weights. Small initializers (shape constants) keep their values."""
    light = onnx.ModelProto()
    light.ir_version = proto.ir_version
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    g, lg = proto.graph, light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    for t in g.initializer:
        if len(t.raw_data) <= max_init_bytes and t.data_location != onnx.TensorProto.EXTERNAL:
            lg.initializer.append(t)
        elif t.name not in declared:
            lg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _value_info(proto: onnx.ModelProto) -> tuple[dict[str, int], dict[str, tuple[bool, ...]]]:
    """Element type of every value the graph knows, and which of its axes have a static size (after shape
    inference where it succeeds). A static axis is never the sequence axis."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_light_copy(proto))
    except Exception:
        inferred = proto
    g = inferred.graph
    types: dict[str, int] = {}
    static: dict[str, tuple[bool, ...]] = {}
    for v in (*g.input, *g.value_info, *g.output):
        tt = v.type.tensor_type
        types[v.name] = tt.elem_type
        if tt.HasField("shape"):
            static[v.name] = tuple(d.HasField("dim_value") for d in tt.shape.dim)
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    return types, static


class RangeCollector:
    """Streams tensor statistics of ``model`` over calibration batches into a :class:`CalibrationState`.

    Args:
        model: the float model (path or proto).
        tensor_names: the activations to observe.
        config: the calibration method and its settings.
        providers: ONNX Runtime providers (default CPU).
        intra_op_num_threads: threads of the calibration session (None: ONNX Runtime's default).
    """

    def __init__(
        self,
        model: str | os.PathLike | onnx.ModelProto,
        tensor_names: Sequence[str],
        config: CalibrationConfig,
        *,
        providers: Sequence[str] | None = None,
        intra_op_num_threads: int | None = None,
    ):
        self.config = config
        self.state = CalibrationState(config)
        proto = _load_proto(model)
        types, static = _value_info(proto)
        produced = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
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
        self._providers = list(providers) if providers else ["CPUExecutionProvider"]
        self._threads = intra_op_num_threads
        self._base: onnx.ModelProto | None = proto
        self._extra = self._augment(proto)
        self._session = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    # --------------------------------------------------------------------------------------- the graph

    def _augment(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """The additions to the graph, as a model holding only them: serialized after the original model,
        protobuf merges the two (repeated fields append), so the weights are never copied."""
        aug = onnx.ModelProto()
        graph = aug.graph
        existing = {o.name for o in proto.graph.output}
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
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
            import onnxruntime as ort

            so = ort.SessionOptions()
            if self._threads:
                so.intra_op_num_threads = self._threads
            # Plain execution: fusions could remove the very tensors we observe.
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            # Batches padded to their longest sentence come in many shapes; a memory pattern cached per shape
            # makes the RSS grow with the number of distinct lengths seen.
            so.enable_mem_pattern = False
            base = self._base
            self._tmp = tempfile.TemporaryDirectory(prefix="ortq-calib-", ignore_cleanup_errors=True)
            path = Path(self._tmp.name) / "augmented.onnx"
            external = _approx_bytes(base) > _MAX_PROTO_BYTES
            try:
                if external:
                    # Too big for one protobuf message: write the augmented model with external data.
                    aug = onnx.ModelProto()
                    aug.CopyFrom(base)
                    aug.MergeFrom(self._extra)
                    onnx.save_model(
                        aug, str(path), save_as_external_data=True, location="augmented.onnx.data"
                    )
                    del aug
                else:
                    # From a file, ONNX Runtime keeps one copy of the weights (from bytes: two).
                    with open(path, "wb") as f:
                        f.write(base.SerializeToString())
                        f.write(self._extra.SerializeToString())
                self._session = ort.InferenceSession(str(path), so, providers=self._providers)
            except Exception as exc:
                raise ModelError(
                    f"onnxruntime could not load the model for calibration: {first_line(exc)}"
                ) from exc
            finally:
                if not external or self._session is None:
                    self._tmp.cleanup()  # the session has read the file (external data may be mapped: kept)
                    self._tmp = None
            self._base = None  # the session holds the weights now
        return self._session

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
        input_names = {i.name for i in session.get_inputs()}
        if total is None and hasattr(batches, "__len__"):
            try:
                total = len(batches)  # type: ignore[arg-type]
            except TypeError:
                total = None
        bar = tqdm(
            total=total,
            desc=f"calibrating ({self.config.method.value})",
            unit="batch",
            disable=not show_progress,
        )
        try:
            for batch in batches:
                # The mask is read from the batch even when the graph does not take it as an input.
                mask = batch.get("attention_mask") if self.config.exclude_padding else None
                mask = np.asarray(mask) if mask is not None else None
                feeds = {k: v for k, v in batch.items() if k in input_names}
                try:
                    outs = session.run(fetch, feeds)
                except Exception as exc:
                    raise CalibrationDataError(
                        f"onnxruntime failed on a calibration batch: {first_line(exc)}"
                    ) from exc
                self._fold(dict(zip(fetch, outs)), mask)
                n = len(next(iter(feeds.values()))) if feeds else 0
                self.state.num_samples += n
                self.state.num_batches += 1
                bar.update(1)
        finally:
            bar.close()
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


