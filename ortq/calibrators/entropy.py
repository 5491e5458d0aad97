"""Entropy: the clipping threshold that minimises the KL divergence between the float distribution and its
quantized version (the TensorRT calibration algorithm), searched over a streaming histogram.

For each candidate threshold (a bin edge), the reference distribution ``P`` is the histogram up to the
threshold with the clipped tail folded into its last bin; ``Q`` spreads each of ``num_quantized_bins``
groups of ``P``'s bins evenly over the non-empty bins of the group (without the folded tail). Clipping more
loses the tail mass; clipping less coarsens the grid; the minimum of ``KL(P || Q)`` balances both.
Asymmetric ranges search each side separately; symmetric ranges search the histogram of ``|x|``.
"""

from __future__ import annotations

import numpy as np

from ortq.calibrators.base import register
from ortq.calibrators.percentile import HistogramObserver
from ortq.config import CalibrationMethod

# At most this many candidate thresholds per search (evenly spaced over the bins).
MAX_CANDIDATES = 512


def kl_threshold_bins(counts: np.ndarray, num_quantized_bins: int) -> int:
    """Number of bins (from 0 outward) whose edge minimises KL(P || Q) for the one-sided ``counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    nonzero_idx = np.flatnonzero(counts)
    if nonzero_idx.size == 0:
        return 0
    last = int(nonzero_idx[-1]) + 1  # bins beyond the last non-empty one cannot help
    nq = num_quantized_bins
    if last <= nq:
        return last
    step = max(1, (last - nq) // MAX_CANDIDATES)
    candidates = list(range(nq, last + 1, step))
    if candidates[-1] != last:
        candidates.append(last)
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = counts[i:].sum()
    best_i, best_kl = last, np.inf
    for i in candidates:
        sliced = counts[:i]
        p = sliced.copy()
        p[-1] += tail[i]
        group = (np.arange(i) * nq) // i
        nonzero = sliced > 0
        sums = np.bincount(group, weights=sliced, minlength=nq)
        slots = np.bincount(group, weights=nonzero, minlength=nq)
        per_bin = np.divide(sums, slots, out=np.zeros(nq), where=slots > 0)
        q = np.where(nonzero, per_bin[group], 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        p_n = p / p_sum
        q_n = q / q_sum
        mask = p_n > 0
        # Where P has mass that Q lacks (only the folded last bin can), smooth Q instead of returning inf.
        q_m = np.maximum(q_n[mask], 1e-12)
        kl = float(np.sum(p_n[mask] * np.log(p_n[mask] / q_m)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


@register
class EntropyObserver(HistogramObserver):
    method = CalibrationMethod.ENTROPY

    def _range(self) -> tuple[float, float]:
        width = self.hist.bin_width
        nq = self.config.num_quantized_bins
        if self.config.symmetric:
            t = kl_threshold_bins(self.hist.abs_counts(), nq) * width
            t = min(t, max(-self.hist.min, self.hist.max))
            return -t, t
        high = kl_threshold_bins(self.hist.side(True), nq) * width
        low = -kl_threshold_bins(self.hist.side(False), nq) * width
        return max(low, self.hist.min), min(high, self.hist.max)
