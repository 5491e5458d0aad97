"""Percentile: clip the rarest tails. ``percentile`` (0-100) is the share of values kept inside the range.

Asymmetric: the range is the ``(100 - p)`` and ``p`` percentiles of the signed values, so a long right tail
does not widen the left end. Symmetric: ``[-t, t]`` with ``t`` the ``p`` percentile of ``|x|``.
"""

from __future__ import annotations

import numpy as np

from ortq.calibrators._histogram import StreamingHistogram
from ortq.calibrators.base import Observer, register
from ortq.config import CalibrationMethod


class HistogramObserver(Observer):
    """Shared machinery of the histogram observers."""

    def __init__(self, config):
        super().__init__(config)
        self.hist = StreamingHistogram(config.num_bins + (config.num_bins % 2))

    def _update(self, values: np.ndarray) -> None:
        self.hist.update(values)

    def _merge(self, other: HistogramObserver) -> None:
        self.hist.merge(other.hist)

    def _state(self) -> dict[str, np.ndarray]:
        return self.hist.state_dict()

    def _load(self, state: dict[str, np.ndarray]) -> None:
        self.hist.load_state_dict(state)


@register
class PercentileObserver(HistogramObserver):
    method = CalibrationMethod.PERCENTILE

    def _range(self) -> tuple[float, float]:
        q = self.config.percentile / 100.0
        if self.config.symmetric:
            t = self.hist.abs_quantile(q)
            return -t, t
        return self.hist.quantile(1.0 - q), self.hist.quantile(q)
