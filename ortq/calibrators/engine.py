"""Where calibration statistics are computed: in this process, or on the workers of a Ray cluster.

Calibration is a map over *shards* (consecutive groups of ``shard_batches`` batches) and a merge:

    job = RangesJob(tensor_names, calibration_config)         # or MomentsJob(activations, hessians=True)
    state = engine.run(job, model, batches)                   # LocalEngine() or RayEngine(address="auto")

* A :class:`ShardJob` says what one worker does: :meth:`~ShardJob.open` the model once (an ONNX Runtime
  session), :meth:`~ShardJob.run` it on one shard into partial statistics, and :meth:`~ShardJob.merge` the
  partials **in shard order**.
* The partition into shards depends only on ``shard_batches``, never on the number of workers, and partials
  are merged in shard order: histogram counts and extremes merge exactly, and float64 sums (Hessians
  ``X^T X``) are added in the same order whatever ran them. So :class:`LocalEngine` and :class:`RayEngine`
  give bit-identical statistics, with 1 worker or 100.
* :class:`RayEngine` starts ``num_workers`` Ray actors; each receives the model once (serialized bytes in the
  object store, or a path to an external-data copy for models over the protobuf limit: that needs a
  filesystem the workers share), then shards go to free actors through :class:`ray.util.ActorPool`. Only
  the feeds of a shard travel per task and only the partial statistics come back. A shard whose worker
  raises or dies is retried (``max_retries``; actors are restarted by Ray), never dropped: a shard that
  still fails ends the run with a :class:`~ortq.errors.CalibrationDataError`.
"""

from __future__ import annotations

import abc
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ortq.errors import CalibrationDataError, ConfigError, first_line
from ortq.io import needs_external_data
from ortq.progress import progress

logger = logging.getLogger(__name__)

__all__ = ["SHARD_BATCHES", "LocalEngine", "RayEngine", "ShardJob", "materialize", "shards_of"]

# Batches per shard: small enough that two workers share a few dozen batches evenly, large enough that a
# shard's partial statistics (a Hessian per activation) cost little to send back next to its compute.
SHARD_BATCHES = 4

Feeds = Mapping[str, np.ndarray]


class ShardJob(abc.ABC):
    """One kind of partial statistics: opened once per worker, run per shard, merged in shard order."""

    #: ``merge(partials)`` adds the partials in order, so ``merge([merge([a, b]), c]) == merge([a, b, c])``.
    foldable: bool = False

    @abc.abstractmethod
    def open(self, model: ir.Model) -> Any:
        """What a worker keeps between shards (its session); ``model`` is not referenced afterwards."""

    @abc.abstractmethod
    def run(self, opened: Any, batches: Sequence[Feeds]) -> Any:
        """Partial statistics of one shard (picklable)."""

    @abc.abstractmethod
    def merge(self, partials: Sequence[Any]) -> Any:
        """The statistics of all shards, from their partials in shard order."""


def shards_of(batches: Iterable[Feeds], shard_batches: int = SHARD_BATCHES) -> list[list[Feeds]]:
    """``batches`` cut into consecutive shards of ``shard_batches`` (the last may be shorter)."""
    if shard_batches < 1:
        raise ConfigError(f"shard_batches must be >= 1, got {shard_batches}")
    shards: list[list[Feeds]] = []
    for batch in batches:
        if not shards or len(shards[-1]) == shard_batches:
            shards.append([])
        shards[-1].append(batch)
    if not shards:
        raise CalibrationDataError("calibration data produced no batches")
    return shards


def materialize(dataset: Any) -> Any:
    """A ``ray.data.Dataset`` as a list of its rows (records for :func:`ortq.data.load_batches`); anything
    else unchanged. Rows are read once, on the driver, where they are tokenized."""
    if type(dataset).__module__.startswith("ray.data") and hasattr(dataset, "iter_rows"):
        return [dict(row) for row in dataset.iter_rows()]
    return dataset


class LocalEngine:
    """Every shard in this process, one after the other, on one session.

    Args:
        shard_batches: batches per shard (the same partition as a :class:`RayEngine` with the same value
            gives bit-identical statistics).
    """

    def __init__(self, shard_batches: int = SHARD_BATCHES):
        self.shard_batches = shard_batches

    def run(self, job: ShardJob, model: ir.Model, batches: Iterable[Feeds], *, desc: str | None = None) -> Any:
        shards = shards_of(batches, self.shard_batches)
        opened = job.open(model)
        items = progress(shards, desc=desc, total=len(shards), unit="shard") if desc else shards
        merged = _InOrder(job, len(shards))
        for index, shard in enumerate(items):
            merged.add(index, job.run(opened, shard))
        return merged.result()


class _Worker:
    """The body of a Ray actor: opens the job's model once, then runs shards."""

    def __init__(self, job: ShardJob, model: bytes | str):
        import onnxruntime  # noqa: F401 - fail here, at start-up, when the worker's environment lacks it

        self.job = job
        self.opened = job.open(_model_from(model))

    def run(self, index: int, batches: Sequence[Feeds]) -> tuple[int, Any]:
        return index, self.job.run(self.opened, batches)


def _model_from(model: bytes | str) -> ir.Model:
    if isinstance(model, bytes):
        return ir.from_proto(onnx.load_model_from_string(model))
    return ir.load(model)  # external data stays memory-mapped


class RayEngine:
    """Shards on the actors of a Ray cluster (``pip install 'ortq[ray]'``).

    Args:
        address: the cluster: ``"auto"`` (the one this machine belongs to), ``"ray://host:10001"``, or None
            for a local cluster (or the one ``ray.init`` already connected to).
        num_workers: actors to start (default: the cluster's CPUs divided by ``cpus_per_worker``).
        cpus_per_worker: CPUs Ray reserves per actor; ONNX Runtime runs that many threads in it.
        max_retries: how often a shard whose worker raised or died is run again (on a restarted actor).
        shard_batches: batches per shard (see :data:`SHARD_BATCHES`).
        init_kwargs: more arguments for ``ray.init`` (e.g. ``runtime_env``) when this engine connects.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_workers: int | None = None,
        cpus_per_worker: int = 1,
        max_retries: int = 3,
        shard_batches: int = SHARD_BATCHES,
        init_kwargs: Mapping[str, Any] | None = None,
    ):
        if num_workers is not None and num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {num_workers}")
        if cpus_per_worker < 1 or max_retries < 0:
            raise ConfigError("cpus_per_worker must be >= 1 and max_retries >= 0")
        self.address = address
        self.num_workers = num_workers
        self.cpus_per_worker = cpus_per_worker
        self.max_retries = max_retries
        self.shard_batches = shard_batches
        self.init_kwargs = dict(init_kwargs or {})
        self.ray = _import_ray()

    def _connect(self) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, **self.init_kwargs}
            try:
                ray.init(address=self.address, **kwargs)
            except Exception as exc:
                raise ConfigError(f"cannot connect to the Ray cluster {self.address or '(local)'}: "
                                  f"{first_line(exc)}") from exc

    def _workers(self, num_shards: int) -> int:
        if self.num_workers is not None:
            return min(self.num_workers, num_shards)
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        return max(1, min(num_shards, cpus // self.cpus_per_worker))

    def run(self, job: ShardJob, model: ir.Model, batches: Iterable[Feeds], *, desc: str | None = None) -> Any:
        from ray.util import ActorPool

        ray = self.ray
        shards = shards_of(batches, self.shard_batches)
        self._connect()
        with _shipped(model) as source:
            model_ref = ray.put(source)  # in the object store once; each node fetches it once
            worker = ray.remote(_Worker).options(
                num_cpus=self.cpus_per_worker, max_restarts=self.max_retries, max_task_retries=self.max_retries
            )
            actors = [worker.remote(job, model_ref) for _ in range(self._workers(len(shards)))]
            logger.info("calibrating %d shards on %d Ray workers", len(shards), len(actors))
            pool = ActorPool(actors)
            retry = {"max_task_retries": self.max_retries, "retry_exceptions": True}
            merged = _InOrder(job, len(shards))
            bar = progress(desc=desc or "calibrating on Ray", total=len(shards), unit="shard")
            try:
                results = pool.map_unordered(lambda a, item: a.run.options(**retry).remote(*item),
                                             enumerate(shards))
                for index, partial in results:
                    merged.add(index, partial)
                    bar.update(1)
            except Exception as exc:
                raise CalibrationDataError(
                    f"a calibration shard failed on Ray after {self.max_retries} retries: {first_line(exc)}"
                ) from exc
            finally:
                bar.close()
                for actor in actors:
                    ray.kill(actor)
        return merged.result()


class _InOrder:
    """Partials merged in shard order as they arrive. A job whose merge is a running sum (``foldable``) is folded
    into one running total, so memory holds one partial plus those that arrived early, whatever the number of
    shards (GPTQ's Hessians of a whole decoder are hundreds of MB per partial); the order of the additions, and
    so every bit, is the one ``merge(all partials)`` would give."""

    def __init__(self, job: ShardJob, count: int):
        self.job, self.count = job, count
        self.pending: dict[int, Any] = {}
        self.done: list[Any] = []
        self.next = 0

    def add(self, index: int, partial: Any) -> None:
        self.pending[index] = partial
        while self.next in self.pending:
            part = self.pending.pop(self.next)
            if self.job.foldable and self.done:
                self.done = [self.job.merge([self.done[0], part])]
            else:
                self.done.append(part)
            self.next += 1

    def result(self) -> Any:
        if self.next != self.count:
            raise CalibrationDataError(f"{self.count - self.next} calibration shard(s) returned no statistics")
        return self.job.merge(self.done)


class _shipped:
    """The model as workers receive it: serialized bytes, or (over the protobuf limit) the path of an
    external-data copy in a temporary folder that lives until the run ends."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> bytes | str:
        if not needs_external_data(self.model):
            return ir.to_proto(self.model).SerializeToString()
        self.tmp = tempfile.TemporaryDirectory(prefix="ortq-ray-", dir=os.environ.get("ORTQ_RAY_SHARED_DIR"))
        path = Path(self.tmp.name) / "model.onnx"
        ir.save(self.model, path, external_data="model.onnx.data")
        return str(path)

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("calibration on Ray needs the ray extra: pip install 'ortq[ray]'") from None
    return ray
