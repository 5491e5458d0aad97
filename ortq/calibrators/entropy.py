"""Entropy: the clipping range that minimises the KL divergence between the float distribution and its
quantized version (the TensorRT calibration criterion), searched over a streaming histogram.

For a candidate range ``[lo, hi)`` (bin edges), the reference distribution ``P`` is the histogram inside the
range with the clipped tails folded into its edge bins; ``Q`` splits the range into ``G`` groups of bins
(one per quantization level) and spreads each group's mass evenly over the group's non-empty bins (without
the folded tails). Clipping more loses tail mass; clipping less coarsens the grid; the minimum of
``KL(P || Q)`` balances both.

* Symmetric ranges search ``t`` on the histogram of ``|x|`` with ``G = num_quantized_bins`` levels on
  ``[0, t]`` (128 for int8).
* Asymmetric ranges search ``lo`` and ``hi`` jointly on the signed histogram with ``G = 2 *
  num_quantized_bins`` levels over ``[lo, hi]`` (the 256 levels of uint8), so a side with a long tail is
  weighed against the step size of the whole range, as the quantizer will see it.

Every candidate's KL comes from prefix sums (of counts, of non-empty bins and of ``c log c``), so a search
over all thresholds is a handful of vectorised numpy operations on a ``[candidates, G]`` array.
"""

from __future__ import annotations

import numpy as np

from ortq.calibrators.base import register
from ortq.calibrators.percentile import HistogramObserver
from ortq.config import CalibrationMethod

# Q's normalised mass where P has mass Q lacks (a tail folded into an empty edge bin): a large, finite
# penalty instead of an infinite divergence.
_EPS = 1e-12
# Candidate pairs of the coarse joint (lo, hi) grid: at most this many per side.
_COARSE_PER_SIDE = 64
# Candidates evaluated per vectorised block (bounds the [block, G] temporaries).
_BLOCK = 4096


class _Prefix:
    """Prefix sums of one histogram: counts, non-empty bins and ``c log c``."""

    def __init__(self, counts: np.ndarray):
        c = np.asarray(counts, dtype=np.float64)
        self.counts = c
        self.total = float(c.sum())
        self.cum = np.concatenate([[0.0], np.cumsum(c)])
        self.nz = np.concatenate([[0.0], np.cumsum(c > 0)])
        clogc = np.zeros_like(c)
        np.log(c, out=clogc, where=c > 0)
        clogc *= c
        self.clogc = np.concatenate([[0.0], np.cumsum(clogc)])


def kl_divergences(counts: np.ndarray, starts: np.ndarray, ends: np.ndarray, levels: int) -> np.ndarray:
    """``KL(P || Q)`` of each candidate range ``counts[starts[k]:ends[k]]`` with ``levels`` quantized bins.

    Mass below ``starts[k]`` folds into the first bin of the range, mass from ``ends[k]`` on into the last.
    Candidates with ``ends <= starts`` get ``inf``.
    """
    pre = counts if isinstance(counts, _Prefix) else _Prefix(counts)
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    out = np.full(starts.shape, np.inf)
    for lo in range(0, starts.size, _BLOCK):
        sl = slice(lo, lo + _BLOCK)
        out[sl] = _kl_block(pre, starts[sl], ends[sl], levels)
    return out


def _kl_block(pre: _Prefix, a: np.ndarray, e: np.ndarray, levels: int) -> np.ndarray:
    total = pre.total
    kl = np.full(a.shape, np.inf)
    valid = e > a
    if total <= 0 or not valid.any():
        return kl
    a, e = a[valid], e[valid]
    width = e - a
    c, cum = pre.counts, pre.cum
    left = cum[a]  # mass below the range
    right = total - cum[e]  # mass above it
    inside = cum[e] - cum[a]  # Q's total mass
    first, last = c[a], c[e - 1]
    single = width == 1

    # Groups: bounds a + ceil(g * width / levels), g = 0..levels (empty groups when width < levels).
    g = np.arange(levels + 1, dtype=np.int64)
    bounds = a[:, None] + (g[None, :] * width[:, None] + levels - 1) // levels
    sums = np.diff(cum[bounds], axis=1)
    nonempty = np.diff(pre.nz[bounds], axis=1)
    mean = np.divide(sums, nonempty, out=np.ones_like(sums), where=nonempty > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mean = np.log(mean, out=np.zeros_like(mean), where=sums > 0)
    # sum over bins of c_j log q_j (unfolded counts, q_j = the group mean), per candidate
    c_log_q = (sums * log_mean).sum(axis=1)
    # log q of the edge bins (groups 0 and last non-empty group); first/last group means:
    log_q_first = log_mean[:, 0]
    last_group = np.where(single, 0, (((width - 1) * levels) // np.maximum(width, 1)))
    log_q_last = log_mean[np.arange(a.size), last_group]

    # sum of p log p: interior bins from prefix sums, edge bins (with folded tails) directly.
    def plogp(x):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)

    interior = np.where(single, 0.0, pre.clogc[np.maximum(e - 1, a + 1)] - pre.clogc[np.minimum(a + 1, e)])
    p_first = np.where(single, first + left + right, first + left)
    p_last = last + right
    p_log_p = interior + plogp(p_first) + np.where(single, 0.0, plogp(p_last))

    # sum of p log q: the unfolded counts, plus each folded tail times its edge bin's log q (or eps).
    log_eps_q = np.log(_EPS) + np.log(np.maximum(inside, 1e-300))  # q_j = eps * Q's total
    tail_first = np.where(single, left + right, left)
    tail_last = np.where(single, 0.0, right)
    lq_first = np.where(first > 0, log_q_first, log_eps_q)
    lq_last = np.where(last > 0, log_q_last, log_eps_q)
    p_log_q = c_log_q + tail_first * lq_first + tail_last * lq_last

    with np.errstate(divide="ignore", invalid="ignore"):
        res = (p_log_p - p_log_q) / total - np.log(total) + np.log(np.maximum(inside, 1e-300))
    res = np.where(inside > 0, res, np.inf)
    kl[valid] = np.maximum(res, 0.0)
    return kl


def kl_threshold_bins(counts: np.ndarray, num_quantized_bins: int) -> int:
    """Number of bins (from 0 outward) whose edge minimises KL(P || Q) for the one-sided ``counts``."""
    counts = np.asarray(counts, dtype=np.float64)
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return 0
    last = int(nonzero[-1]) + 1  # bins beyond the last non-empty one cannot help
    if last <= num_quantized_bins:
        return last  # the whole range fits the grid: no clipping, no coarsening
    ends = np.arange(num_quantized_bins, last + 1)
    kl = kl_divergences(counts, np.zeros_like(ends), ends, num_quantized_bins)
    return int(ends[int(np.argmin(kl))])


def kl_range_bins(counts: np.ndarray, zero: int, levels: int) -> tuple[int, int]:
    """Bin edges ``(start, end)`` of the signed range minimising KL(P || Q) with ``levels`` quantized bins.

    ``zero`` is the index of the edge at 0; the range always contains it (``start <= zero <= end``).
    A coarse grid over both ends is refined by alternating exact one-sided searches.
    """
    counts = np.asarray(counts, dtype=np.float64)
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return zero, zero
    lo_min, hi_max = min(int(nonzero[0]), zero), max(int(nonzero[-1]) + 1, zero)
    if hi_max - lo_min <= levels:
        return lo_min, hi_max
    pre = _Prefix(counts)

    def grid(lo: int, hi: int) -> np.ndarray:
        n = hi - lo + 1
        return np.unique(np.linspace(lo, hi, min(n, _COARSE_PER_SIDE)).round().astype(np.int64))

    # Ranges narrower than the grid fold everything into their edges at no cost in KL: at least
    # ``levels`` bins wide, as in the one-sided search.
    starts, ends = np.meshgrid(grid(lo_min, zero), grid(zero, hi_max), indexing="ij")
    starts, ends = starts.ravel(), ends.ravel()
    ok = ends - starts >= levels
    starts, ends = starts[ok], ends[ok]
    kl = kl_divergences(pre, starts, ends, levels)
    k = int(np.argmin(kl))
    best_kl, a, e = float(kl[k]), int(starts[k]), int(ends[k])
    for _ in range(8):  # coordinate descent at full resolution
        improved = False
        cand_e = np.arange(max(zero, a + levels), hi_max + 1)
        kl_e = kl_divergences(pre, np.full_like(cand_e, a), cand_e, levels)
        j = int(np.argmin(kl_e))
        if kl_e[j] < best_kl - 1e-15:
            best_kl, e, improved = float(kl_e[j]), int(cand_e[j]), True
        cand_a = np.arange(lo_min, min(zero, e - levels) + 1)
        kl_a = kl_divergences(pre, cand_a, np.full_like(cand_a, e), levels)
        j = int(np.argmin(kl_a))
        if kl_a[j] < best_kl - 1e-15:
            best_kl, a, improved = float(kl_a[j]), int(cand_a[j]), True
        if not improved:
            break
    return a, e


@register
class EntropyObserver(HistogramObserver):
    method = CalibrationMethod.ENTROPY

    def _range(self) -> tuple[float, float]:
        hist = self.hist
        width = hist.bin_width
        nq = self.config.num_quantized_bins
        if self.config.symmetric:
            t = kl_threshold_bins(hist.abs_counts(), nq) * width
            t = min(t, max(-hist.min, hist.max))
            return -t, t
        start, end = kl_range_bins(hist.counts, hist.num_bins // 2, 2 * nq)
        low, high = -hist.radius + start * width, -hist.radius + end * width
        return max(low, hist.min), min(high, hist.max)
