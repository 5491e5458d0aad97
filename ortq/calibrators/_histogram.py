"""A streaming histogram on a power-of-two grid.

The histogram covers ``[-R, R)`` with ``num_bins`` bins, ``R`` a power of two. When new values fall
outside, ``R`` doubles and pairs of bins merge, exactly. Because bin edges are dyadic and the final ``R`` is
``2**ceil(log2(max |x|))`` whatever the order of the data, the final histogram is *identical* for any
batch size, batch order or sharding: streaming costs nothing in accuracy, and memory is ``num_bins`` counts
per tensor whatever the number of samples.
"""

from __future__ import annotations

import math

import numpy as np


class StreamingHistogram:
    """Counts of signed values on ``num_bins`` (even) equal bins over ``[-radius, radius)``."""

    def __init__(self, num_bins: int):
        if num_bins < 2 or num_bins % 2:
            raise ValueError(f"num_bins must be an even number >= 2, got {num_bins}")
        self.num_bins = num_bins
        self.radius = 0.0  # 0: empty
        self.counts = np.zeros(num_bins, dtype=np.int64)
        self.min = math.inf
        self.max = -math.inf

    @property
    def bin_width(self) -> float:
        return 2.0 * self.radius / self.num_bins

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, self.num_bins + 1)

    @staticmethod
    def _radius_for(absmax: float) -> float:
        if absmax <= 0.0:
            return 2.0**-20
        return 2.0 ** math.ceil(math.log2(absmax * (1 + 2**-20)))

    def _grow_to(self, radius: float) -> None:
        if radius <= self.radius:
            return
        if self.radius == 0.0:
            self.radius = radius
            return
        factor = int(round(radius / self.radius))  # a power of two
        half = self.num_bins // 2
        # Bins are symmetric around 0: merge each side outward from the centre.
        pos = self.counts[half:].reshape(-1, factor).sum(axis=1)
        neg = self.counts[:half][::-1].reshape(-1, factor).sum(axis=1)[::-1]
        new = np.zeros_like(self.counts)
        new[half : half + pos.size] = pos
        new[half - neg.size : half] = neg
        self.counts = new
        self.radius = radius

    def update(self, values: np.ndarray) -> None:
        """Add finite float values (1-D)."""
        if values.size == 0:
            return
        lo, hi = float(values.min()), float(values.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self._grow_to(self._radius_for(max(-lo, hi)))
        # radius is a power of two, so the scale is exact and floor() lands on the same bin at any radius.
        scale = np.float32(self.num_bins / (2.0 * self.radius))
        scaled = values * scale
        np.floor(scaled, out=scaled)
        idx = scaled.astype(np.intp)
        del scaled
        half = self.num_bins // 2
        idx += half
        # |x| < radius, so only rounding at the top edge can reach num_bins.
        np.minimum(idx, self.num_bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.num_bins)

    def merge(self, other: StreamingHistogram) -> None:
        if other.num_bins != self.num_bins:
            raise ValueError("cannot merge histograms with different num_bins")
        if other.radius == 0.0:
            return
        a, b = (self, other) if self.radius >= other.radius else (other, self)
        b_counts, b_radius = b.counts.copy(), b.radius
        merged = StreamingHistogram(self.num_bins)
        merged.radius, merged.counts = b_radius, b_counts
        merged._grow_to(a.radius)
        self.counts = a.counts + merged.counts
        self.radius = a.radius
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def abs_counts(self) -> np.ndarray:
        """Histogram of |x| on ``num_bins // 2`` bins over ``[0, radius)``."""
        half = self.num_bins // 2
        return self.counts[half:] + self.counts[:half][::-1]

    def side(self, positive: bool) -> np.ndarray:
        """One side's counts on ``num_bins // 2`` bins from 0 outward (|x| of that side)."""
        half = self.num_bins // 2
        return self.counts[half:].copy() if positive else self.counts[:half][::-1].copy()

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the signed values, interpolated linearly inside the bin."""
        return _quantile(self.counts, -self.radius, self.bin_width, q, self.min, self.max)

    def abs_quantile(self, q: float) -> float:
        """The ``q`` quantile of |x|."""
        absmax = max(-self.min, self.max, 0.0)
        return _quantile(self.abs_counts(), 0.0, self.bin_width, q, 0.0, absmax)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "counts": self.counts,
            "radius": np.array(self.radius),
            "min": np.array(self.min),
            "max": np.array(self.max),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()
        self.num_bins = self.counts.size
        self.radius = float(state["radius"])
        self.min, self.max = float(state["min"]), float(state["max"])


def _quantile(counts: np.ndarray, start: float, width: float, q: float, lo: float, hi: float) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    cum = np.cumsum(counts)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, counts.size - 1)
    before = cum[i - 1] if i > 0 else 0
    frac = (target - before) / counts[i] if counts[i] else 0.0
    value = start + (i + float(np.clip(frac, 0.0, 1.0))) * width
    return float(np.clip(value, lo, hi))
