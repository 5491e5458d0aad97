"""Block-wise integer weight quantization in numpy: round-to-nearest with a per-block scale search, GPTQ,
and the bit packing that ONNX Runtime's ``MatMulNBits`` / ``GatherBlockQuantized`` kernels read.

Conventions (shared by both kernels):
  * a weight is handled as a matrix ``w`` of shape ``[rows, k]`` quantized along ``k`` in blocks of
    ``block_size`` (``k`` is zero-padded to a whole number of blocks);
  * codes ``q`` are unsigned, ``0 .. 2**bits - 1``; ``value = (q - zero_point) * scale``;
  * symmetric blocks store no zero point: the kernels use ``2**(bits - 1)`` (8 for 4 bits);
  * 4-bit codes are packed two per byte along ``k``, the first in the low nibble; 4-bit zero points are
    packed the same way per row (``[rows, ceil(n_blocks / 2)]``); 8-bit codes and zero points are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Shrink ratios tried by the clipping search (1.0 = plain min/max).
_SHRINK = np.linspace(1.0, 0.55, 19, dtype=np.float32)
_CHUNK_ELEMS = 1 << 21  # elements per vectorized chunk of blocks


@dataclass
class BlockQuantized:
    """A matrix quantized block-wise along its last axis.

    Attributes:
        q: uint8 codes ``[rows, n_blocks * block_size]`` (padded columns hold the zero point).
        scales: float32 ``[rows, n_blocks]``.
        zero_points: uint8 ``[rows, n_blocks]``, or None for symmetric blocks (implicit ``2**(bits-1)``).
        bits: 4 or 8.
        block_size: elements per block.
        k: the unpadded length of the quantized axis.
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        """The float32 matrix ``[rows, k]`` these codes stand for."""
        rows = self.q.shape[0]
        zp = (
            self.zero_points
            if self.zero_points is not None
            else np.full_like(self.q[:, :1], 1 << (self.bits - 1))
        )
        q = self.q.reshape(rows, self.n_blocks, self.block_size).astype(np.float32)
        zpf = np.broadcast_to(zp, (rows, self.n_blocks)).astype(np.float32)
        w = (q - zpf[..., None]) * self.scales[..., None]
        return w.reshape(rows, -1)[:, : self.k]

    def packed_codes(self) -> np.ndarray:
        """Codes packed as ``MatMulNBits`` input B: uint8 ``[rows, n_blocks, block_size * bits / 8]``."""
        rows = self.q.shape[0]
        return pack(self.q, self.bits).reshape(rows, self.n_blocks, -1)

    def packed_zero_points(self) -> np.ndarray | None:
        """Zero points as both kernels read them: ``[rows, ceil(n_blocks * bits / 8)]`` uint8."""
        if self.zero_points is None:
            return None
        return pack(self.zero_points, self.bits)

    def nbytes(self) -> int:
        """Bytes of the stored tensors (codes, fp32 scales, packed zero points)."""
        zp = self.packed_zero_points()
        return self.q.size * self.bits // 8 + self.scales.nbytes + (zp.nbytes if zp is not None else 0)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis (4 bits: two per byte, first in the low nibble; odd lengths
    are padded with 0)."""
    q = np.asarray(q, dtype=np.uint8)
    if bits == 8:
        return q.copy()
    if bits != 4:
        raise ValueError(f"unsupported bits {bits}")
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4)


def unpack(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack` for ``length`` codes along the last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :length].copy()
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :length]


def _pad_cols(w: np.ndarray, block_size: int) -> np.ndarray:
    k = w.shape[-1]
    pad = -k % block_size
    if pad:
        w = np.concatenate([w, np.zeros(w.shape[:-1] + (pad,), w.dtype)], axis=-1)
    return w


def _search_blocks(
    x: np.ndarray, h: np.ndarray | None, bits: int, symmetric: bool, search: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize blocks ``x [B, bs]``; ``h`` (broadcastable to x) weights the squared error.

    Returns codes ``[B, bs]``, scales ``[B]`` and zero points ``[B]`` (None when symmetric).
    """
    qmax = (1 << bits) - 1
    half = 1 << (bits - 1)
    ratios = _SHRINK if search else _SHRINK[:1]
    best_err = np.full(x.shape[0], np.inf, np.float32)
    best_s = np.zeros(x.shape[0], np.float32)
    best_z = np.zeros(x.shape[0], np.float32)
    if symmetric:
        # The extreme value maps to -half (the side with one more level); its sign may flip the scale.
        idx = np.abs(x).argmax(axis=1)
        ext = x[np.arange(x.shape[0]), idx]
        cands = [(r, -half) for r in ratios]
        if search:
            cands += [(1.0, half - 1), (1.0, -(half - 0.5))]
        for r, level in cands:
            s = (ext * r / level).astype(np.float32)
            s_safe = np.where(s == 0, 1.0, s)
            qs = np.clip(np.rint(x / s_safe[:, None]), -half, half - 1)
            d = x - qs * s[:, None]
            err = ((d * d) * h).sum(axis=1) if h is not None else (d * d).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
        best_z[:] = half
    else:
        lo = np.minimum(x.min(axis=1), 0.0)
        hi = np.maximum(x.max(axis=1), 0.0)
        for r in ratios:
            s = ((hi - lo) * r / qmax).astype(np.float32)
            s_safe = np.where(s == 0, 1.0, s)
            z = np.clip(np.rint(-lo * r / s_safe), 0, qmax)
            qs = np.clip(np.rint(x / s_safe[:, None]) + z[:, None], 0, qmax)
            d = x - (qs - z[:, None]) * s[:, None]
            err = ((d * d) * h).sum(axis=1) if h is not None else (d * d).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
    if search:
        # Least-squares refit of the scale for the chosen codes, kept only where it lowers the error.
        for _ in range(2):
            s_safe = np.where(best_s == 0, 1.0, best_s)
            lo_q, hi_q = (0, qmax)
            qs = np.clip(np.rint(x / s_safe[:, None]) + best_z[:, None], lo_q, hi_q) - best_z[:, None]
            hw = h if h is not None else 1.0
            num = (hw * x * qs).sum(axis=1)
            den = (hw * qs * qs).sum(axis=1)
            s_new = np.where(den > 0, num / np.where(den > 0, den, 1.0), best_s).astype(np.float32)
            s_new_safe = np.where(s_new == 0, 1.0, s_new)
            qn = np.clip(np.rint(x / s_new_safe[:, None]) + best_z[:, None], lo_q, hi_q) - best_z[:, None]
            d = x - qn * s_new[:, None]
            err = ((d * d) * h).sum(axis=1) if h is not None else (d * d).sum(axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s_new, best_s)
    s_safe = np.where(best_s == 0, 1.0, best_s)
    q = np.clip(np.rint(x / s_safe[:, None]) + best_z[:, None], 0, qmax).astype(np.uint8)
    q[best_s == 0] = best_z[best_s == 0, None].astype(np.uint8)
    return q, best_s, (None if symmetric else best_z.astype(np.uint8))


def quantize_rtn(
    w: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = False,
    *,
    search: bool = True,
    importance: np.ndarray | None = None,
) -> BlockQuantized:
    """Round-to-nearest block quantization of ``w [rows, k]`` along ``k``.

    Args:
        w: float matrix.
        bits: 4 or 8.
        block_size: elements per block.
        symmetric: no zero points (the kernels' default zero point ``2**(bits-1)`` applies).
        search: try shrunken ranges per block and refit the scale by least squares, keeping whichever gives
            the lowest (weighted) squared error; False is plain min/max.
        importance: optional non-negative weights ``[k]`` of each input channel in the error (e.g. the mean
            square of the activations feeding it).
    """
    w = np.asarray(w, dtype=np.float32)
    rows, k = w.shape
    wp = _pad_cols(w, block_size)
    nb = wp.shape[1] // block_size
    blocks = wp.reshape(rows * nb, block_size)
    hb = None
    if importance is not None:
        imp = _pad_cols(np.asarray(importance, np.float32)[None, :], block_size).reshape(nb, block_size)
        imp = imp / max(float(imp.mean()), 1e-30)
        hb = np.tile(imp, (rows, 1))
    q = np.empty_like(blocks, dtype=np.uint8)
    scales = np.empty(rows * nb, np.float32)
    zps = None if symmetric else np.empty(rows * nb, np.uint8)
    step = max(1, _CHUNK_ELEMS // block_size)
    for i in range(0, blocks.shape[0], step):
        sl = slice(i, i + step)
        qi, si, zi = _search_blocks(blocks[sl], None if hb is None else hb[sl], bits, symmetric, search)
        q[sl], scales[sl] = qi, si
        if zps is not None:
            zps[sl] = zi
    return BlockQuantized(
        q=q.reshape(rows, nb * block_size),
        scales=scales.reshape(rows, nb),
        zero_points=None if zps is None else zps.reshape(rows, nb),
        bits=bits,
        block_size=block_size,
        k=k,
    )


def quantize_gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = False,
    *,
    damp: float = 0.01,
    search: bool = True,
    lazy_batch: int = 128,
    act_order: bool = True,
) -> BlockQuantized:
    """GPTQ (Frantar et al., 2022): quantize ``w [rows, k]`` column by column along ``k``, spreading each
    column's rounding error over the columns not yet quantized through the inverse Hessian ``X^T X``.

    With ``act_order`` (default) the block scales and zero points are fixed up front (the same search as
    :func:`quantize_rtn`, weighted by the Hessian diagonal) and the columns are processed in decreasing
    order of their Hessian diagonal; otherwise block parameters are chosen on the error-updated weights when
    the first column of each block is reached, in natural order.

    Args:
        w: float matrix ``[rows, k]`` (rows = output channels).
        hessian: ``[k, k]`` sum of ``x x^T`` over calibration activations ``x`` (any positive multiple).
        damp: diagonal dampening as a fraction of the mean diagonal.
    """
    w = np.asarray(w, dtype=np.float64)
    rows, k = w.shape
    wp = _pad_cols(w, block_size).copy()
    kp = wp.shape[1]
    nb = kp // block_size
    H = np.zeros((kp, kp), np.float64)
    H[:k, :k] = hessian
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    wp[:, dead] = 0.0
    H[np.diag_indices(kp)] += damp * float(np.mean(np.diag(H)))
    Hinv = None if act_order else _upper_inv_chol(H)

    q = np.empty((rows, kp), np.uint8)
    scales = np.empty((rows, nb), np.float32)
    zps = None if symmetric else np.empty((rows, nb), np.uint8)
    half = 1 << (bits - 1)
    qmax = (1 << bits) - 1
    lazy = max(lazy_batch // block_size, 1) * block_size
    diag_h = np.diag(H).copy()
    if act_order:
        static = quantize_rtn(
            wp.astype(np.float32), bits, block_size, symmetric, search=search, importance=diag_h
        )
        scales[:] = static.scales
        if zps is not None:
            zps[:] = static.zero_points
        perm = np.argsort(-diag_h, kind="stable")
        return _gptq_static(wp, H, perm, static, Hinv_of=_upper_inv_chol, lazy=lazy, k=k)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1 = wp[:, i1:i2].copy()
        Err = np.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        s_cur = z_cur = None
        for j in range(i2 - i1):
            col = i1 + j
            if col % block_size == 0:
                g = col // block_size
                blk = W1[:, j : j + block_size].astype(np.float32)
                imp = diag_h[col : col + block_size].astype(np.float32)
                imp = imp / max(float(imp.mean()), 1e-30)
                _, s_g, z_g = _search_blocks(blk, imp[None, :], bits, symmetric, search)
                scales[:, g] = s_g
                z_f = np.full(rows, half, np.float64) if z_g is None else z_g.astype(np.float64)
                if zps is not None:
                    zps[:, g] = z_g
                s_cur = np.where(s_g == 0, 1.0, s_g).astype(np.float64)
                z_cur = z_f
                s_raw = s_g.astype(np.float64)
            wc = W1[:, j]
            qc = np.clip(np.rint(wc / s_cur) + z_cur, 0, qmax)
            qc = np.where(s_raw == 0, z_cur, qc)
            q[:, col] = qc.astype(np.uint8)
            dq = (qc - z_cur) * s_raw
            err = (wc - dq) / Hb[j, j]
            W1[:, j:] -= np.outer(err, Hb[j, j:])
            Err[:, j] = err
        wp[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return BlockQuantized(q=q, scales=scales, zero_points=zps, bits=bits, block_size=block_size, k=k)


def _upper_inv_chol(H: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``H^-1``."""
    return np.linalg.cholesky(np.linalg.inv(H)).T


def _gptq_static(wp, H, perm, static: BlockQuantized, *, Hinv_of, lazy: int, k: int) -> BlockQuantized:
    """GPTQ over the columns in order ``perm`` with fixed per-block scales / zero points from ``static``."""
    rows, kp = wp.shape
    bits, bs = static.bits, static.block_size
    qmax = (1 << bits) - 1
    zp_all = (
        np.full(static.scales.shape, 1 << (bits - 1), np.float64)
        if static.zero_points is None
        else static.zero_points.astype(np.float64)
    )
    s_all = static.scales.astype(np.float64)
    W = wp[:, perm].copy()
    Hinv = Hinv_of(H[np.ix_(perm, perm)])
    blk = perm // bs
    q = np.empty((rows, kp), np.uint8)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1 = W[:, i1:i2].copy()
        Err = np.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            b = blk[col]
            s_raw, z = s_all[:, b], zp_all[:, b]
            s_safe = np.where(s_raw == 0, 1.0, s_raw)
            wc = W1[:, j]
            qc = np.where(s_raw == 0, z, np.clip(np.rint(wc / s_safe) + z, 0, qmax))
            q[:, perm[col]] = qc.astype(np.uint8)
            err = (wc - (qc - z) * s_raw) / Hb[j, j]
            W1[:, j:] -= np.outer(err, Hb[j, j:])
            Err[:, j] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return BlockQuantized(
        q=q, scales=static.scales.copy(), zero_points=static.zero_points, bits=bits, block_size=bs, k=k
    )


def on_grid(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool, rng: np.random.Generator
) -> np.ndarray:
    """A random matrix whose values lie exactly on a block-wise ``bits`` grid (for round-trip tests):
    every block uses its lowest and highest code, so a min/max quantizer recovers it exactly."""
    rows, k = w.shape
    nb = -(-k // block_size)
    qmax = (1 << bits) - 1
    q = rng.integers(0, qmax + 1, (rows, nb, block_size))
    if symmetric:
        q[:, :, 0] = 0
        z = np.full((rows, nb, 1), 1 << (bits - 1))
    else:
        q[:, :, 0], q[:, :, 1] = 0, qmax
        z = rng.integers(1, qmax, (rows, nb, 1))
    s = (2.0 ** rng.integers(-8, -3, (rows, nb, 1))).astype(np.float32)
    return ((q - z) * s).reshape(rows, -1)[:, :k].astype(np.float32)


@dataclass
class SourceGrid:
    """A weight found to lie exactly on a block grid already (a GGUF Q4_0 / Q4_1 / Q8_0 source, or a model
    quantized and dequantized before): ``w = (q - zero_point) * scale + offset`` per block.

    Attributes:
        blocks: codes, scales and integer zero points (``offset`` aside, a :class:`BlockQuantized`).
        offsets: float32 ``[rows, n_blocks]`` added to every weight of a block (a Q4_1 minimum that is not a
            whole number of steps), or None when every offset is 0.
    """

    blocks: BlockQuantized
    offsets: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        w = self.blocks.dequantize()
        if self.offsets is not None:
            off = np.repeat(self.offsets, self.blocks.block_size, axis=1)[:, : self.blocks.k]
            w = w + off
        return w


def _grid_steps(x: np.ndarray, lo: np.ndarray, span: np.ndarray, qmax: int) -> np.ndarray:
    """Per block of ``x [B, bs]`` a step putting every value exactly on ``lo + q * step`` (``q <= qmax``),
    or NaN where there is none."""
    step = np.full(lo.shape, np.nan, np.float32)
    step[span == 0] = 0.0
    todo = np.flatnonzero(span != 0)
    for j in [qmax, *range(1, qmax)]:
        if not len(todo):
            break
        xb, lb, sb = x[todo], lo[todo, None], span[todo] / np.float32(j)
        ok = np.zeros(len(todo), bool)
        for s in (sb.astype(np.float16).astype(np.float32), sb):
            s = s[:, None]
            q = np.rint((xb - lb) / np.where(s > 0, s, 1))
            ok_s = ~ok & (s[:, 0] > 0) & (q <= qmax).all(-1) & ((q * s + lb) == xb).all(-1)
            step[todo[ok_s]] = s[ok_s, 0]
            ok |= ok_s
        todo = todo[~ok]
    return step


def _symmetric_steps(x: np.ndarray, bits: int) -> np.ndarray:
    """Per block a step ``s`` with every value exactly ``q * s``, ``|q| <= 2**(bits-1)`` (GGUF Q4_0 / Q8_0), or
    NaN."""
    half = 1 << (bits - 1)
    absmax = np.abs(x).max(-1)
    step = np.full(absmax.shape, np.nan, np.float32)
    step[absmax == 0] = 0.0
    for level in (half - 1, half):
        for s in ((absmax / level).astype(np.float16).astype(np.float32), (absmax / level).astype(np.float32)):
            free = np.isnan(step) & (s > 0)
            sc = np.where(s > 0, s, 1)[:, None]
            q = np.rint(x / sc)
            ok = free & (np.abs(q) <= half).all(-1) & ((q * sc) == x).all(-1)
            step[ok] = s[ok]
    return step


def find_source_grid(w: np.ndarray, bits: int = 4, block_size: int = 32) -> SourceGrid | None:
    """The block grid ``w [rows, k]`` already lies on, if it does exactly (every value reproduced bit for
    bit), else None.

    Two shapes of grid are recognised per block: symmetric ``q * step`` (GGUF Q4_0 / Q8_0: the codes get the
    kernels' zero point ``2**(bits-1)``) and ``min + q * step`` (GGUF Q4_1). The step is taken from the
    block's range, and also tried rounded to float16 (GGUF stores scales and minima in float16). For a
    ``min + q * step`` block the integer zero point is the one bringing the minimum closest to 0; what remains
    (``min + zero_point * step``) is the block's offset. A first slice of rows is checked before the rest,
    so a float weight is rejected quickly.
    """
    w = np.asarray(w, dtype=np.float32)
    rows, k = w.shape
    if k % block_size or not np.isfinite(w).all():
        return None
    qmax, half = (1 << bits) - 1, 1 << (bits - 1)
    nb = k // block_size
    x = w.reshape(rows * nb, block_size)
    probe = slice(0, min(len(x), 256))
    sym_probe = _symmetric_steps(x[probe], bits)
    if not np.isnan(sym_probe).any():
        step = _symmetric_steps(x, bits)
        if not np.isnan(step).any():
            q = np.rint(x / np.where(step > 0, step, 1)[:, None]) + half
            blocks = BlockQuantized(q=np.clip(q, 0, qmax).astype(np.uint8).reshape(rows, k),
                                    scales=step.reshape(rows, nb), zero_points=None, bits=bits,
                                    block_size=block_size, k=k)
            return _checked(SourceGrid(blocks, None), w)
    lo = x.min(axis=-1)
    span = x.max(axis=-1) - lo
    if np.isnan(_grid_steps(x[probe], lo[probe], span[probe], qmax)).any():
        return None
    step = _grid_steps(x, lo, span, qmax)
    if np.isnan(step).any():
        return None
    s_safe = np.where(step > 0, step, 1.0)
    q = np.rint((x - lo[:, None]) / s_safe[:, None])
    # value = q*step + lo = ((q + z) - z)*step + lo: codes q + z, zero point z, offset lo + z*step.
    z = np.where(step > 0, np.clip(np.rint(-lo / s_safe), 0, qmax - q.max(-1)), 0)
    offsets = (lo + z * step).astype(np.float32)
    blocks = BlockQuantized(q=(q + z[:, None]).astype(np.uint8).reshape(rows, k), scales=step.reshape(rows, nb),
                            zero_points=z.astype(np.uint8).reshape(rows, nb), bits=bits, block_size=block_size, k=k)
    return _checked(SourceGrid(blocks, offsets.reshape(rows, nb) if np.any(offsets != 0) else None), w)


def exact_source_grid(w_t: np.ndarray, bits: int, block_size: int) -> SourceGrid | None:
    """The exact grid ``w_t`` lies on: 4 bits first (also for an 8-bit layer), then ``bits``."""
    for b in dict.fromkeys((4, bits)):
        grid = find_source_grid(w_t, b, block_size)
        if grid is not None:
            return grid
    return None


def _checked(grid: SourceGrid, w: np.ndarray) -> SourceGrid | None:
    """``grid`` if it gives back exactly ``w`` (kernels compute ``(q - z) * s``, then the offset), else None."""
    return grid if np.array_equal(grid.dequantize(), w) else None
