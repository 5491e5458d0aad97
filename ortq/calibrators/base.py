"""Observers: streaming statistics of one tensor, turned into a quantization range.

Every observer is mergeable (``merge``), serializable (``state_dict`` / ``from_state_dict``) and never
returns an infinite or NaN range: non-finite values and attention-mask sentinels (|x| >= 1e30, e.g. the
float-min constants of an additive mask) are excluded and counted.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ortq.config import CalibrationConfig, CalibrationMethod
from ortq.errors import CalibrationDataError

# Values this large are mask constants (float-min, -1e38, ...), not activations.
SENTINEL_ABS = 1e30


@dataclass(frozen=True)
class TensorRange:
    """A calibrated range. ``num_excluded`` counts non-finite / mask-sentinel values left out."""

    low: float
    high: float
    num_values: int = 0
    num_excluded: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            object.__setattr__(self, "low", 0.0)
            object.__setattr__(self, "high", 0.0)
        if self.low > self.high:
            raise ValueError(f"TensorRange low {self.low} > high {self.high}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_finite(x: np.ndarray) -> tuple[np.ndarray, int]:
    """The usable values of ``x`` as a 1-D float32 array, and how many were excluded."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    x = x.ravel()
    if x.size == 0:
        return x, 0
    # Fast path: two reductions prove every value usable (NaN propagates and fails the test).
    lo, hi = float(x.min()), float(x.max())
    if abs(lo) < SENTINEL_ABS and abs(hi) < SENTINEL_ABS:
        return x, 0
    ok = np.abs(x) < SENTINEL_ABS  # False for NaN and inf too
    kept = x[ok]
    return kept, int(x.size - kept.size)


class Observer(abc.ABC):
    """Streaming statistics of one tensor."""

    method: ClassVar[CalibrationMethod]

    def __init__(self, config: CalibrationConfig):
        self.config = config
        self.num_values = 0
        self.num_excluded = 0

    def update(self, x: np.ndarray) -> None:
        """Add the values of ``x`` (any shape; padding already removed)."""
        values, excluded = split_finite(x)
        self.num_excluded += excluded
        if values.size:
            self.num_values += int(values.size)
            self._update(values)

    @abc.abstractmethod
    def _update(self, values: np.ndarray) -> None:
        """Add finite, non-sentinel float32 values (1-D, non-empty)."""

    @abc.abstractmethod
    def _merge(self, other: Observer) -> None: ...

    @abc.abstractmethod
    def _range(self) -> tuple[float, float]: ...

    @abc.abstractmethod
    def _state(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _load(self, state: dict[str, np.ndarray]) -> None: ...

    def merge(self, other: Observer) -> None:
        """Fold ``other`` (same method, same config) into this observer."""
        if type(other) is not type(self):
            raise CalibrationDataError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self.num_excluded += other.num_excluded
        if other.num_values:
            if self.num_values:
                self._merge(other)
            else:
                self._load(other._state())
            self.num_values += other.num_values

    def compute_range(self) -> TensorRange:
        if not self.num_values:
            return TensorRange(0.0, 0.0, 0, self.num_excluded)
        low, high = self._range()
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            low, high = 0.0, 0.0
        return TensorRange(low, high, self.num_values, self.num_excluded)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"num_values": np.array(self.num_values), "num_excluded": np.array(self.num_excluded)}
        if self.num_values:
            state.update(self._state())
        return state

    @classmethod
    def from_state_dict(cls, config: CalibrationConfig, state: dict[str, np.ndarray]) -> Observer:
        obs = cls(config)
        obs.num_values = int(state["num_values"])
        obs.num_excluded = int(state["num_excluded"])
        if obs.num_values:
            obs._load({k: v for k, v in state.items() if k not in ("num_values", "num_excluded")})
        return obs


_REGISTRY: dict[CalibrationMethod, type[Observer]] = {}


def register(cls: type[Observer]) -> type[Observer]:
    _REGISTRY[cls.method] = cls
    return cls


def observer_class(config: CalibrationConfig) -> type[Observer]:
    """The observer class registered for ``config.method`` (importing any module of this package runs
    ``ortq/calibrators/__init__.py``, which registers every observer)."""
    try:
        return _REGISTRY[config.method]
    except KeyError:
        raise CalibrationDataError(f"no observer for calibration method {config.method.value!r}") from None


def make_observer(config: CalibrationConfig) -> Observer:
    """A fresh observer for ``config.method``."""
    return observer_class(config)(config)
