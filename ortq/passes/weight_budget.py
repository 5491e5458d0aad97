"""Mixed precision in weight-only quantization: which layers get more than the base bits, by measured error.

Every layer is first quantized in the base format (4-bit blocks, GPTQ with calibration data). Its measured
sensitivity is the relative error of its output on the calibration activations (``X^T X``-weighted; the
weight's own relative error without statistics). Within a byte budget (``sensitive_budget``: a fraction of
the bytes of the base-format layers) the layers whose upgrade removes the most squared relative error per
extra byte are upgraded, greedily (the k-quant idea of spending more bits where they matter, chosen by
measurement rather than by layer name). A layer is upgraded to the exact block grid its weight already lies on
when it does (a GGUF Q4_0 / Q4_1 / Q8_0 source: no error left, and fewer bytes than 8 bits), else to 8 bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ortq.passes._int4 import BlockQuantized, SourceGrid


@dataclass(frozen=True)
class Upgrade:
    """A possible upgrade of one layer.

    Attributes:
        key: the caller's handle of the layer.
        error: the layer's relative output error in the base format (its measured sensitivity).
        remaining: the relative error left after the upgrade (0 for a carried exact grid).
        extra_bytes: what the upgrade adds to the file.
    """

    key: Hashable
    error: float
    remaining: float
    extra_bytes: int

    @property
    def gain(self) -> float:
        return max(self.error**2 - self.remaining**2, 0.0)


def choose_upgrades(candidates: Sequence[Upgrade], budget_bytes: float) -> list[Hashable]:
    """The keys of the upgrades to make: by squared error removed per extra byte, best first, each taken
    while the bytes spent stay within ``budget_bytes`` (a later, cheaper one may still fit)."""
    chosen: list[Hashable] = []
    spent = 0.0
    ranked = sorted(candidates, key=lambda c: c.gain / max(c.extra_bytes, 1), reverse=True)
    for c in ranked:
        if c.gain > 0 and spent + c.extra_bytes <= budget_bytes:
            chosen.append(c.key)
            spent += max(c.extra_bytes, 0)
    return chosen


def stored_bytes(bq: BlockQuantized, grid: SourceGrid | None = None, *, float16: bool = False,
                 folded: bool = False) -> int:
    """Bytes of a layer in the file: codes, scales (float32, or float16), zero points, and a carried grid's
    block offsets (as the scales; with ``folded``, as codes in extra blocks: ``block_offsets.fold_offsets``)."""
    scale_bytes = 2 if float16 else 4
    size = bq.nbytes() - (bq.scales.nbytes // 2 if float16 else 0)
    if grid is not None and grid.offsets is not None:
        rows, nb = grid.offsets.shape
        if folded:
            extra = -(-nb // bq.block_size)
            size += rows * extra * (bq.block_size * bq.bits // 8 + scale_bytes) + rows * -(-extra * bq.bits // 8)
        else:
            size += grid.offsets.size * scale_bytes
    return size


def to_float16(bq: BlockQuantized, grid: SourceGrid | None) -> tuple[BlockQuantized, SourceGrid | None] | None:
    """The blocks with their scales (and a grid's offsets) rounded to float16, or None where that is not safe:
    a non-finite or vanished value, a scale more than 0.1 % off, or a carried grid's scale that is not exactly
    float16 already (a GGUF scale is). The codes stay; a requantized layer's error is measured afterwards."""
    s16 = bq.scales.astype(np.float16).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rel = np.abs(s16 - bq.scales) / np.where(bq.scales != 0, np.abs(bq.scales), 1.0)
    if not np.isfinite(s16).all() or ((s16 == 0) != (bq.scales == 0)).any() or rel.max(initial=0.0) > 1e-3:
        return None
    if grid is not None and not np.array_equal(s16, bq.scales):
        return None
    new = dataclasses.replace(bq, scales=s16)
    if grid is None:
        return new, None
    offsets = grid.offsets
    if offsets is not None:
        offsets = offsets.astype(np.float16).astype(np.float32)
        if not np.isfinite(offsets).all():
            return None
    return new, SourceGrid(new, offsets)


def int8_bytes(rows: int, k: int, block_size: int, *, scale_bytes: int = 4) -> int:
    """Bytes of ``[rows, k]`` in symmetric 8-bit blocks (codes and scales of ``scale_bytes``)."""
    nb = -(-k // block_size)
    return rows * nb * block_size + rows * nb * scale_bytes


def row_errors(w_t: np.ndarray, bq: BlockQuantized, chunk_values: int = 1 << 22) -> Iterator[tuple[slice, np.ndarray]]:
    """``(rows, W[rows] - dequantized[rows])`` (float64) over row chunks of about ``chunk_values`` values of
    ``w_t [N, K]``: never a float64 copy of a whole embedding table or lm_head."""
    zp = bq.zero_points
    step = max(1, chunk_values // max(w_t.shape[1], 1))
    for r in range(0, w_t.shape[0], step):
        rows = slice(r, r + step)
        part = dataclasses.replace(bq, q=bq.q[rows], scales=bq.scales[rows],
                                   zero_points=None if zp is None else zp[rows])
        yield rows, (w_t[rows] - part.dequantize()).astype(np.float64)


def relative_errors(w_t: np.ndarray, bq: BlockQuantized, xtx: np.ndarray | None,
                    chunk_values: int = 1 << 22, *, signal_xtx: np.ndarray | None = None) -> dict[str, float]:
    """Relative RMS error of the dequantized weight, and of the layer's output on the activations whose
    ``X^T X`` is ``xtx`` (when given; relative to the output on ``signal_xtx`` when that is given: the error
    of centred activations against the whole signal). Computed by row chunks of about ``chunk_values``
    values: float64 copies of a whole embedding table or lm_head would cost several times its float32 size."""
    signal = xtx if signal_xtx is None else signal_xtx
    num_w = den_w = num_x = den_x = 0.0
    for rows, d in row_errors(w_t, bq, chunk_values):
        wd = w_t[rows].astype(np.float64)
        num_w += float((d * d).sum())
        den_w += float((wd * wd).sum())
        if isinstance(xtx, np.ndarray):
            num_x += float(np.einsum("nk,kj,nj->", d, xtx, d, optimize=True))
            den_x += float(np.einsum("nk,kj,nj->", wd, signal, wd, optimize=True))
    out = {"weight_rel_rmse": float(np.sqrt(num_w / max(den_w, 1e-30)))}
    if isinstance(xtx, np.ndarray):
        out["output_rel_rmse"] = float(np.sqrt(max(num_x, 0.0) / max(den_x, 1e-30)))
    return out
