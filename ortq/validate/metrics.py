"""Error metrics between a reference (fp32) and a test (quantized) tensor, shared by validation, the per-layer
report and the benchmarks.

Plain functions give one figure for two arrays; the streaming accumulators (:class:`ErrorStats`,
:class:`OutputStats`, :class:`TaskStats`) sum over batches in float64 so that memory stays flat and the result
does not depend on how the samples were batched.

Conventions every metric keeps:

* two all-zero tensors have cosine 1.0; one all-zero tensor against a non-zero one has cosine 0.0;
* SQNR is ``10 log10(signal / noise)`` in dB: ``inf`` when the two are identical, ``-inf`` when the reference
  is all zeros but the test is not;
* a padding mask is used only when it lines up with a tensor's ``[batch, seq]`` axes (:func:`fitting_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ortq.errors import ModelError, ValidationFailed

__all__ = [
    "ErrorStats",
    "OutputStats",
    "TaskStats",
    "argmax_agreement",
    "cosine_similarity",
    "fitting_mask",
    "masked",
    "max_abs_error",
    "mean_pool",
    "next_token_nll",
    "sample_cosines",
    "sqnr_db",
    "sqnr_from_sums",
    "topk_neighbour_agreement",
]


# ------------------------------------------------------------------------------------------ one figure


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two tensors, flattened, in float64. Two zero tensors give 1.0.

    Raises:
        ValueError: the shapes differ.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"cosine_similarity: shapes differ {np.shape(a)} vs {np.shape(b)}")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(np.clip(np.dot(x, y) / (nx * ny), -1.0, 1.0))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB.

    ``inf`` when the two are identical; ``-inf`` when the reference is all zeros but the test is not.
    """
    r = np.asarray(reference, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    return sqnr_from_sums(float(np.sum(r * r)), float(np.sum((r - t) ** 2)))


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from the summed signal power and noise power (see :func:`sqnr_db` for the edge cases)."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute element-wise difference (0.0 for empty tensors)."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return float(d.max()) if d.size else 0.0


def argmax_agreement(reference_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """Share of rows whose argmax over the last axis is the same (1.0 when there are no rows)."""
    r = np.asarray(reference_logits).argmax(axis=-1)
    t = np.asarray(test_logits).argmax(axis=-1)
    return float(np.mean(r == t)) if r.size else 1.0


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0.0, 1.0, n)


def topk_neighbour_agreement(reference: np.ndarray, test: np.ndarray, k: int = 5) -> float:
    """Mean overlap of the k nearest neighbours (cosine, self excluded) of each row, reference vs test.

    1.0 means every sample keeps exactly the same k neighbours within the set; this is what a retrieval
    index built on the quantized embeddings would return differently. Ties are broken by row index, so
    identical inputs always give 1.0.

    Args:
        reference: ``[n, d]`` embeddings from the fp32 model.
        test: ``[n, d]`` embeddings from the quantized model, same rows.
        k: neighbours per row; capped at ``n - 1`` (a single row gives 1.0).
    """
    ref = _normalize_rows(reference)
    tst = _normalize_rows(test)
    n = ref.shape[0]
    if ref.shape != tst.shape:
        raise ValueError(f"topk_neighbour_agreement: shapes differ {ref.shape} vs {tst.shape}")
    k = min(int(k), n - 1)
    if k < 1:
        return 1.0

    def neighbours(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    nr, nt = neighbours(ref), neighbours(tst)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(nr, nt, strict=True)]
    return float(np.mean(overlap))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def next_token_nll(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods and the number of predicted tokens.

    Position ``t`` predicts ``input_ids[t + 1]``; pairs where either token is padding are skipped. Computed
    one sample at a time to keep memory flat for large vocabularies.
    """
    total, count = 0.0, 0
    b, s = input_ids.shape[:2]
    mask = np.ones((b, s), dtype=bool) if attention_mask is None else attention_mask.astype(bool)
    for i in range(b):
        valid = mask[i, :-1] & mask[i, 1:]
        if not valid.any():
            continue
        lp = _log_softmax(logits[i, :-1][valid])
        targets = input_ids[i, 1:][valid]
        total -= float(lp[np.arange(len(targets)), targets].sum())
        count += int(valid.sum())
    return total, count


# --------------------------------------------------------------------------------------------- masking


def fitting_mask(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """``mask`` as booleans when it lines up with the ``[batch, seq]`` axes of ``array``, else None."""
    if mask is None or np.ndim(array) < 2 or tuple(np.shape(array)[:2]) != tuple(np.shape(mask)):
        return None
    return np.asarray(mask).astype(bool)


def masked(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The unpadded positions of ``array`` (all of it when the mask does not line up)."""
    m = fitting_mask(array, mask)
    return np.asarray(array) if m is None else np.asarray(array)[m]


def mean_pool(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Sentence embeddings ``[batch, dim]`` (float64): ``[batch, seq, dim]`` averaged over the unpadded
    positions (all positions when ``mask`` does not fit); 2-D input is returned as is."""
    h = np.asarray(hidden, dtype=np.float64)
    if h.ndim == 2:
        return h
    if mask is None or mask.shape != h.shape[:2]:
        return h.reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1)
    m = mask.astype(np.float64)[..., None]
    return (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def sample_cosines(reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None) -> list[float]:
    """Cosine of each sample (first axis), over its unpadded positions when ``mask`` fits ``[batch, seq]``.

    Products in float32, sums in float64; samples with no unpadded position are left out.
    """
    ref, tst = np.asarray(reference), np.asarray(test)
    if ref.ndim == 0:
        ref, tst = ref.reshape(1), tst.reshape(1)
    mask = fitting_mask(ref, mask)
    out = []
    for i in range(ref.shape[0]):
        r = np.asarray(ref[i] if mask is None else ref[i][mask[i]], dtype=np.float32).ravel()
        t = np.asarray(tst[i] if mask is None else tst[i][mask[i]], dtype=np.float32).ravel()
        if r.size == 0:
            continue
        rr = float(np.sum(r * r, dtype=np.float64))
        tt = float(np.sum(t * t, dtype=np.float64))
        rt = float(np.sum(r * t, dtype=np.float64))
        if rr == 0.0 and tt == 0.0:
            out.append(1.0)
        elif rr == 0.0 or tt == 0.0:
            out.append(0.0)
        else:
            out.append(float(np.clip(rt / math.sqrt(rr * tt), -1.0, 1.0)))
    return out


# ---------------------------------------------------------------------------------------- accumulators


@dataclass
class ErrorStats:
    """Streaming SQNR and cosine between a reference and a test tensor, over all elements (sums in float64)."""

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    test_energy: float = 0.0
    count: int = 0

    def update(self, reference: np.ndarray, test: np.ndarray) -> None:
        """Add a pair of tensors of the same shape (a :class:`ModelError` otherwise)."""
        r = np.asarray(reference, dtype=np.float64).ravel()
        t = np.asarray(test, dtype=np.float64).ravel()
        if r.shape != t.shape:
            raise ModelError(f"reference and test shapes differ: {np.shape(reference)} vs {np.shape(test)}")
        d = r - t
        self.signal += float(r @ r)
        self.noise += float(d @ d)
        self.dot += float(r @ t)
        self.test_energy += float(t @ t)
        self.count += int(r.size)

    @property
    def sqnr_db(self) -> float:
        return sqnr_from_sums(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        if self.signal == 0.0 and self.test_energy == 0.0:
            return 1.0
        if self.signal == 0.0 or self.test_energy == 0.0:
            return 0.0
        return float(np.clip(self.dot / math.sqrt(self.signal * self.test_energy), -1.0, 1.0))


class OutputStats:
    """Streaming fidelity of one model output: per-sample cosine, global and worst-sample SQNR, abs errors.

    An output with one value per sample (a score, a probability) has no per-sample cosine worth the name (the
    cosine of two numbers is their signs' agreement): its cosine is taken over the samples instead, the
    vector of all its values."""

    def __init__(self) -> None:
        self.cosines: list[float] = []
        self.pooled = ErrorStats()
        self.largest_sample = 0
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.sample_sqnr: list[float] = []

    def update(self, ref: np.ndarray, test: np.ndarray, mask: np.ndarray | None) -> None:
        """Add one batch; ``mask`` (booleans ``[batch, seq]`` or None) selects the positions compared.

        Raises:
            ValidationFailed: the two outputs differ in shape.
        """
        ref = np.asarray(ref)
        test = np.asarray(test)
        if ref.shape != test.shape:
            raise ValidationFailed(f"output shapes differ: reference {ref.shape} vs quantized {test.shape}")
        # One sample at a time in float64: memory stays flat for [batch, seq, vocab] logits.
        for i in range(ref.shape[0] if ref.ndim else 1):
            r = ref[i] if ref.ndim else ref
            t = test[i] if test.ndim else test
            if mask is not None:
                r, t = r[mask[i]], t[mask[i]]
            r = np.asarray(r, dtype=np.float64)
            t = np.asarray(t, dtype=np.float64)
            if r.size == 0:
                continue
            self.cosines.append(cosine_similarity(r, t))
            self.largest_sample = max(self.largest_sample, int(r.size))
            if r.size == 1:  # pooled only where it is the figure reported (not over [seq, vocab] logits)
                self.pooled.update(r, t)
            d = r - t
            s, n = float(np.sum(r * r)), float(np.sum(d * d))
            self.sample_sqnr.append(sqnr_from_sums(s, n))
            self.signal += s
            self.noise += n
            ad = np.abs(d)
            self.max_abs = max(self.max_abs, float(ad.max()))
            self.sum_abs += float(ad.sum())
            self.count += int(ad.size)

    def result(self) -> dict[str, Any]:
        """The figures of the ``fidelity.outputs`` entry of a validation report (NaN cosines when empty)."""
        c = np.asarray(self.cosines) if self.cosines else np.asarray([np.nan])
        scalar = self.largest_sample == 1
        if scalar:  # one value per sample: the cosine of the vector over samples
            c = np.asarray([self.pooled.cosine])
        return {
            **({"cosine_over": "samples (one value each)"} if scalar else {}),
            "cosine_mean": float(np.mean(c)),
            "cosine_min": float(np.min(c)),
            "cosine_p01": float(np.percentile(c, 1)),
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.sum_abs / self.count if self.count else None,
            "sqnr_db": sqnr_from_sums(self.signal, self.noise),
            "sqnr_db_min": float(np.min(self.sample_sqnr)) if self.sample_sqnr else None,
            "samples": len(self.cosines),
        }

    def summary(self) -> dict[str, Any]:
        """The short form (cosine mean / min, max abs error, SQNR) used for parity with the CPU."""
        r = self.result()
        return {k: r[k] for k in ("cosine_mean", "cosine_min", "max_abs_error", "sqnr_db")}


class TaskStats:
    """Streaming task-level agreement of a task output (see :mod:`ortq.tasks` for the vocabulary).

    * ``feature-extraction``: mean-pooled embeddings are kept, then top-k neighbour agreement and embedding
      cosine over the whole set;
    * ``text-classification``: argmax agreement;
    * ``causal-lm``: next-token perplexity of both models and top-1 agreement, padding excluded;
    * ``none``: nothing (:meth:`result` is None).
    """

    def __init__(self, task: str, output: str | None, k: int) -> None:
        self.task = task
        self.output = output
        self.k = k
        self.ref_emb: list[np.ndarray] = []
        self.q_emb: list[np.ndarray] = []
        self.agree = 0
        self.total = 0
        self.nll_ref = 0.0
        self.nll_q = 0.0
        self.tokens = 0

    def update(self, ref: np.ndarray, q: np.ndarray, feed: Mapping[str, np.ndarray]) -> None:
        """Add one batch of the task output of both models; ``feed`` gives the mask and the token ids."""
        mask = feed.get("attention_mask")
        if self.task == "feature-extraction":
            self.ref_emb.append(mean_pool(ref, mask))
            self.q_emb.append(mean_pool(q, mask))
        elif self.task == "text-classification":
            r, t = ref.argmax(-1), q.argmax(-1)
            self.agree += int(np.sum(r == t))
            self.total += int(r.size)
        elif self.task == "causal-lm":
            ids = feed.get("input_ids")
            if ids is None:
                return
            nr, cnt = next_token_nll(ref, ids, mask)
            nq, _ = next_token_nll(q, ids, mask)
            self.nll_ref += nr
            self.nll_q += nq
            self.tokens += cnt
            m = np.ones(ids.shape, dtype=bool) if mask is None else mask.astype(bool)
            for i in range(ids.shape[0]):
                valid = m[i, :-1] & m[i, 1:]
                self.agree += int(np.sum(ref[i, :-1][valid].argmax(-1) == q[i, :-1][valid].argmax(-1)))
                self.total += int(valid.sum())

    def result(self) -> dict[str, Any] | None:
        """The ``task`` entry of a provider row, or None when nothing was measured."""
        if self.task == "feature-extraction" and self.ref_emb:
            r, q = np.concatenate(self.ref_emb), np.concatenate(self.q_emb)
            k = min(self.k, r.shape[0] - 1)
            cos = [cosine_similarity(a, b) for a, b in zip(r, q, strict=True)]
            return {
                "task": self.task,
                "output": self.output,
                "metric": f"top{k}_neighbour_agreement",
                "agreement": topk_neighbour_agreement(r, q, k) if k >= 1 else None,
                "k": k,
                "embedding_cosine_mean": float(np.mean(cos)),
                "embedding_cosine_min": float(np.min(cos)),
                "samples": int(r.shape[0]),
            }
        if self.task == "text-classification" and self.total:
            return {
                "task": self.task,
                "output": self.output,
                "metric": "argmax_agreement",
                "agreement": self.agree / self.total,
                "samples": self.total,
            }
        if self.task == "causal-lm" and self.tokens:
            ppl_r = math.exp(self.nll_ref / self.tokens)
            ppl_q = math.exp(self.nll_q / self.tokens)
            return {
                "task": self.task,
                "output": self.output,
                "metric": "next_token_top1_agreement",
                "agreement": self.agree / self.total if self.total else None,
                "perplexity_reference": ppl_r,
                "perplexity_quantized": ppl_q,
                "perplexity_delta_pct": 100.0 * (ppl_q - ppl_r) / ppl_r,
                "tokens": self.tokens,
            }
        return None
