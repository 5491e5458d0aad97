"""MinMax: the smallest and largest value seen (or their moving average over batches)."""

from __future__ import annotations

import numpy as np

from ortq.calibrators.base import Observer, register
from ortq.config import CalibrationMethod


@register
class MinMaxObserver(Observer):
    method = CalibrationMethod.MINMAX

    def __init__(self, config):
        super().__init__(config)
        self.min = np.inf
        self.max = -np.inf
        self.num_batches = 0

    def _update(self, values: np.ndarray) -> None:
        self.update_extremes(float(values.min()), float(values.max()))

    def update_extremes(self, low: float, high: float) -> None:
        """Fold one batch's extremes in (used when the graph already reduced the tensor)."""
        if self.config.moving_average and self.num_batches:
            c = self.config.averaging_constant
            self.min += c * (low - self.min)
            self.max += c * (high - self.max)
        else:
            self.min = min(self.min, low)
            self.max = max(self.max, high)
        self.num_batches += 1

    def _merge(self, other: MinMaxObserver) -> None:
        if self.config.moving_average:
            # Shards were averaged independently: weight them by their batch counts.
            n, m = self.num_batches, other.num_batches
            self.min = (self.min * n + other.min * m) / (n + m)
            self.max = (self.max * n + other.max * m) / (n + m)
        else:
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
        self.num_batches += other.num_batches

    def _range(self) -> tuple[float, float]:
        return self.min, self.max

    def _state(self) -> dict[str, np.ndarray]:
        return {
            "min": np.array(self.min),
            "max": np.array(self.max),
            "num_batches": np.array(self.num_batches),
        }

    def _load(self, state: dict[str, np.ndarray]) -> None:
        self.min, self.max = float(state["min"]), float(state["max"])
        self.num_batches = int(state["num_batches"])
