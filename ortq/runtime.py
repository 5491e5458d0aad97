"""ONNX Runtime in one place: providers by one vocabulary, session creation, and the batch loop.

Every part of ortq that runs a model goes through here:

    session = create_session(model, provider="cpu", settings=SessionSettings(threads=2))
    for feed, outputs in run_batches(session, batches, fetch=["logits"]):
        ...

* Providers are named ``cpu`` / ``cuda`` / ``tensorrt`` (aliases ``trt``, ``gpu`` and the full
  ``...ExecutionProvider`` names are accepted); GPU providers keep the CPU as fallback, and a session that did
  not get the provider asked for is an error, not a silent fallback.
* Idle thread pools never spin, so that two sessions alternating on the same cores do not slow each other.
* A model too large for one protobuf message (see :data:`ortq.io.EXTERNAL_DATA_THRESHOLD`) is handed to ONNX
  Runtime through a temporary file with external data that lives as long as the session.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ortq.errors import CalibrationDataError, ConfigError, ModelError, OrtqError, first_line
from ortq.io import has_external_tensors, needs_external_data, unmap_all
from ortq.progress import progress

logger = logging.getLogger(__name__)

EXECUTION_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_ALIASES = {"trt": "tensorrt", "gpu": "cuda"}

_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class ProviderFailed(OrtqError):
    """A provider is listed by ONNX Runtime but could not be used for this model."""


# ------------------------------------------------------------------------------------------- providers


def normalize_provider(name: str) -> str:
    """``cpu`` / ``cuda`` / ``tensorrt`` (``trt``, ``gpu``) or a full ``...ExecutionProvider`` name -> the short key."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in EXECUTION_PROVIDERS:
        return key
    for short, full in EXECUTION_PROVIDERS.items():
        if key == full.lower():
            return short
    raise ConfigError(f"unknown provider {name!r}; choose from: {', '.join(EXECUTION_PROVIDERS)}")


def provider_availability(name: str) -> tuple[bool, str | None]:
    """Whether this onnxruntime build offers the provider, and why not."""
    import onnxruntime as ort

    key = normalize_provider(name)
    ep = EXECUTION_PROVIDERS[key]
    available = ort.get_available_providers()
    if ep in available:
        return True, None
    if key == "cpu":  # pragma: no cover - every build has it
        return False, "CPUExecutionProvider missing from this onnxruntime build"
    hint = "pip install 'ortq[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU and CUDA/cuDNN"
    if key == "tensorrt":
        hint += " and TensorRT libraries on LD_LIBRARY_PATH"
    return False, f"{ep} is not in this onnxruntime build ({ort.__version__}: {', '.join(available)}); {hint}"


def provider_chain(key: str, *, int8_qdq: bool = False, cache_dir: str | None = None) -> tuple[list, list]:
    """Providers and their options for a session on ``key``; GPU providers keep the CPU as the fallback.

    ``int8_qdq``: the model carries QDQ int8 nodes, which TensorRT honours only with INT8 enabled.
    """
    key = normalize_provider(key)
    cuda_opts = {"device_id": 0, "cudnn_conv_algo_search": "DEFAULT"}
    if key == "cpu":
        return ["CPUExecutionProvider"], [{}]
    if key == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], [cuda_opts, {}]
    trt_opts: dict[str, Any] = {"device_id": 0, "trt_fp16_enable": False}
    if int8_qdq:
        trt_opts["trt_int8_enable"] = True
    if cache_dir:
        trt_opts.update(
            {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir, "trt_timing_cache_enable": True}
        )
    return (
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        [trt_opts, cuda_opts, {}],
    )


# -------------------------------------------------------------------------------------------- sessions


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """How a session runs.

    Attributes:
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        optimization: graph optimization level, ``disable`` / ``basic`` / ``extended`` / ``all``. Observing
            intermediate tensors wants ``basic`` or less: fusions would remove the very tensors observed.
        memory_pattern: cache an allocation plan per input shape. Off for calibration, where batches padded to
            their longest sample come in many shapes and the cache grows with them.
        arena: ONNX Runtime's CPU memory arena, which keeps what a run allocated for the next one. Off for the
            sessions that fetch intermediate tensors of a large model: fetched in many shapes, they grow it by
            GBs beside the weights.
        node_order: run nodes in node-list order where the graph allows (ONNX Runtime's priority-based order)
            instead of its default order, which can run nodes appended to observe activations only after the
            whole model and so keeps every observed activation alive until then.
    """

    threads: int | None = None
    optimization: str = "all"
    memory_pattern: bool = True
    arena: bool = True
    node_order: bool = False

    def __post_init__(self) -> None:
        if self.optimization not in _OPTIMIZATION_LEVELS:
            raise ConfigError(f"optimization must be one of {', '.join(_OPTIMIZATION_LEVELS)}")
        if self.threads is not None and int(self.threads) < 1:
            raise ConfigError("threads must be >= 1")

    def session_options(self, *, profile_prefix: str | None = None, optimized_model_path: str | None = None):
        import onnxruntime as ort

        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so = ort.SessionOptions()
        if self.threads is not None:
            so.intra_op_num_threads = int(self.threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = levels[self.optimization]
        so.enable_mem_pattern = self.memory_pattern
        so.enable_cpu_mem_arena = self.arena
        if self.node_order:
            so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.log_severity_level = 3
        # Idle worker threads must not spin: two sessions alternate on the same cores, and a spinning pool of
        # one would be timed as the other's latency (and would slow torch or numpy work in between).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if optimized_model_path:
            so.optimized_model_filepath = optimized_model_path
            # Weights beside the optimized graph, not inside it: the graph is read back without them, and a
            # model over 2 GB cannot be one protobuf message.
            name = os.path.basename(optimized_model_path) + ".data"
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", name)
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        return so


def describe_session(session) -> dict[str, Any]:
    """The settings a session really runs with, read back from its options (for reports)."""
    so = session.get_session_options()
    level = str(so.graph_optimization_level).rsplit(".", 1)[-1]
    try:
        spinning = so.get_session_config_entry("session.intra_op.allow_spinning")
    except Exception:  # noqa: BLE001 - absent entry: ONNX Runtime's default (spinning on)
        spinning = "1"
    return {
        "intra_op_num_threads": int(so.intra_op_num_threads),
        "inter_op_num_threads": int(so.inter_op_num_threads),
        "execution_mode": str(so.execution_mode).rsplit(".", 1)[-1],
        "graph_optimization_level": level,
        "enable_mem_pattern": bool(so.enable_mem_pattern),
        "allow_spinning": spinning != "0",
        "providers": list(session.get_providers()),
    }


ModelSource = str | os.PathLike | bytes | onnx.ModelProto


def create_session(
    model: ModelSource | Any,
    *,
    provider: str = "cpu",
    settings: SessionSettings | None = None,
    int8_qdq: bool = False,
    trt_cache_dir: str | None = None,
    profile_prefix: str | None = None,
    optimized_model_path: str | None = None,
    what: str = "the model",
):
    """An ``onnxruntime.InferenceSession`` on ``provider`` for a path, serialized bytes, a ``ModelProto`` or an
    ``onnx_ir.Model``.

    In-memory models over the protobuf limit go through a temporary file with external data, which the
    session keeps alive. A CPU session that cannot load is a :class:`ModelError` (``what`` names the model in
    the message); a GPU provider that fails or is silently replaced is :class:`ProviderFailed`.
    """
    import onnxruntime as ort

    key = normalize_provider(provider)
    settings = settings or SessionSettings()
    so = settings.session_options(profile_prefix=profile_prefix, optimized_model_path=optimized_model_path)
    providers, options = provider_chain(key, int8_qdq=int8_qdq, cache_dir=trt_cache_dir)
    source, tmp = _session_source(model)
    try:
        session = ort.InferenceSession(source, so, providers=providers, provider_options=options)
    except Exception as exc:
        if tmp is not None:
            tmp.cleanup()
        if key == "cpu":
            raise ModelError(f"onnxruntime cannot load {what} ({first_line(exc)})") from exc
        raise ProviderFailed(f"{EXECUTION_PROVIDERS[key]} could not create a session: {first_line(exc)}") from exc
    if tmp is not None:
        session._ortq_tmp = tmp  # external data may be memory-mapped: the folder lives as long as the session
    if EXECUTION_PROVIDERS[key] not in session.get_providers():
        raise ProviderFailed(
            f"{EXECUTION_PROVIDERS[key]} could not be initialised (missing CUDA/cuDNN/TensorRT libraries?); "
            f"onnxruntime fell back to {', '.join(session.get_providers())}"
        )
    return session


def _session_source(model: Any) -> tuple[str | bytes, tempfile.TemporaryDirectory | None]:
    if isinstance(model, (str, os.PathLike)):
        return str(model), None
    if isinstance(model, bytes):
        return model, None
    if not isinstance(model, onnx.ModelProto):
        import onnx_ir as ir

        if not isinstance(model, ir.Model):
            raise TypeError(f"cannot make a session from {type(model).__name__}")
        if not needs_external_data(model) and not has_external_tensors(model):
            return ir.to_proto(model).SerializeToString(), None
        tmp = tempfile.TemporaryDirectory(prefix="ortq-session-", ignore_cleanup_errors=True)
        path = Path(tmp.name) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        unmap_all(model)  # the session reads the weights from the copy: this process lets go of its pages
        return str(path), tmp
    if not needs_external_data(model):
        return model.SerializeToString(), None
    tmp = tempfile.TemporaryDirectory(prefix="ortq-session-", ignore_cleanup_errors=True)
    path = Path(tmp.name) / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # save_model(save_as_external_data=True) rewrites the tensors it is given
    onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
    return str(path), tmp


# ---------------------------------------------------------------------------------------- the batch loop


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). Runs that
    fetch many intermediate tensors of a large model free them in sizes the allocator keeps for reuse, and the
    process's RSS grows by GBs beside the session's weights."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# glibc's mallopt parameters, and the size from which an allocation gets its own mapping in a large model's run.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
OWN_MAPPING_BYTES = 1 << 20
LARGE_MODEL_BYTES = 1 << 30


@functools.cache
def bound_heap_growth() -> bool:
    """For the rest of the process, allocations of :data:`OWN_MAPPING_BYTES` or more get their own mapping,
    handed back to the system when freed (glibc's ``mallopt``; nothing elsewhere). By default glibc raises
    that threshold up to 32 MiB as large blocks are freed, after which a large model's weights, activations
    and float64 statistics come from the heap and, once freed, stay resident: 1.1 GiB beside a 4 GiB
    model's session in GPTQ's calibration passes. Used for models over :data:`LARGE_MODEL_BYTES`, where a
    page fault per large allocation costs less than the memory. Returns whether it applied."""
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, OWN_MAPPING_BYTES) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 32 << 20) == 1 and ok
    if ok:
        logger.info("large model: allocations of %d MiB or more are mapped on their own and released when freed",
                    OWN_MAPPING_BYTES >> 20)
    return ok


@functools.cache
def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def float_outputs(session) -> list[str]:
    """Names of the session's float (or double) outputs."""
    return [o.name for o in session.get_outputs() if "float" in (o.type or "") or "double" in (o.type or "")]


def attention_mask_of(batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The 2-D padding mask of a batch (``attention_mask``, else an input named like a mask), if any."""
    if "attention_mask" in batch and np.ndim(batch["attention_mask"]) == 2:
        return np.asarray(batch["attention_mask"])
    for name, value in batch.items():
        if "mask" in name.lower() and np.ndim(value) == 2:
            return np.asarray(value)
    return None


def feed_for(session, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph inputs of ``session`` taken from ``batch`` (extra keys, e.g. a mask the graph does not take,
    are dropped); a missing input is a :class:`CalibrationDataError`."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in batch]
    if missing:
        raise CalibrationDataError(f"the batches lack graph input(s): {', '.join(missing)}")
    return {n: batch[n] for n in names}


def batch_size_of(batch: Mapping[str, np.ndarray]) -> int:
    """The number of samples in a batch (the leading axis of its first input)."""
    for value in batch.values():
        if np.ndim(value) >= 1:
            return int(np.shape(value)[0])
    return 1


def batch_samples(batch: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Samples ``start:stop`` of ``batch``: every input whose leading axis is the batch is sliced, the others
    (shared inputs) are kept whole."""
    n = batch_size_of(batch)
    return {k: (v[start:stop] if np.ndim(v) >= 1 and np.shape(v)[0] == n else v) for k, v in batch.items()}


def run_batches(
    session,
    batches: Iterable[Mapping[str, np.ndarray]],
    fetch: Sequence[str] | None = None,
    *,
    desc: str | None = None,
    total: int | None = None,
    what: str = "a batch",
) -> Iterator[tuple[Mapping[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run ``session`` on each batch; yield ``(batch, {output name: array})``.

    ``fetch`` defaults to every output. The batch is yielded whole, so callers read its padding mask with
    :func:`attention_mask_of` even when the graph does not take the mask. A failing run is a
    :class:`CalibrationDataError` naming ``what``. ``desc`` shows a progress bar (see :mod:`ortq.progress`).
    """
    names = list(fetch) if fetch is not None else [o.name for o in session.get_outputs()]
    if total is None and hasattr(batches, "__len__"):
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    items = progress(batches, desc=desc, total=total, unit="batch") if desc else batches
    for batch in items:
        feed = feed_for(session, batch)
        try:
            values = session.run(names, feed)
        except Exception as exc:
            raise CalibrationDataError(f"onnxruntime failed on {what}: {first_line(exc)}") from exc
        yield batch, dict(zip(names, values, strict=True))


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A shallow augmentation of ``model`` whose graph also outputs the tensors ``names``.

    Returns a model holding only the added outputs: serialized after the original (or merged with
    ``MergeFrom``), protobuf appends them, so the weights are never copied.
    """
    existing = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    aug = onnx.ModelProto()
    for name in dict.fromkeys(names):
        if name not in existing:
            aug.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return aug
