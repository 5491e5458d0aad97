"""The integer grid of a quantization plan, emulated in float: what QuantizeLinear / DequantizeLinear do to a
tensor quantized with a :class:`ortq.passes.plan.QParams`.

Everything here follows the ONNX definitions (round half to even, saturate to the type's range), so a value
computed here equals what ONNX Runtime computes for the same parameters.
"""

from __future__ import annotations

import numpy as np

from ortq.passes.plan import QParams, quantize_weight

__all__ = ["dequantized_weight", "fake_quantize", "representable_range", "saturated_count"]


def _broadcast(qp: QParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point as float32, shaped to broadcast along ``qp.axis`` of an ``ndim``-D tensor."""
    scale, zp = qp.scale.astype(np.float32), qp.zero_point.astype(np.float32)
    if qp.axis is not None and scale.size > 1:
        shape = [1] * ndim
        shape[qp.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def fake_quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """QuantizeLinear followed by DequantizeLinear, as ONNX defines them (round half to even, saturate).

    Returns a float32 array of ``x``'s shape whose values lie on the grid of ``qp``.
    """
    qmin, qmax = qp.dtype.qrange
    scale, zp = _broadcast(qp, x.ndim)
    q = np.clip(np.rint(x.astype(np.float32) / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


def dequantized_weight(weight: np.ndarray, qp: QParams) -> np.ndarray:
    """The float values a DequantizeLinear of the plan's int8 weight produces (float32, ``weight``'s shape)."""
    q = quantize_weight(weight, qp).astype(np.float32)
    scale, zp = _broadcast(qp, weight.ndim)
    return ((q - zp) * scale).astype(np.float32)


def representable_range(qp: QParams) -> tuple[float, float]:
    """The smallest and largest float an activation quantized with ``qp`` (per tensor) can hold."""
    qmin, qmax = qp.dtype.qrange
    scale, zp = float(qp.scale.ravel()[0]), float(qp.zero_point.ravel()[0])
    return (qmin - zp) * scale, (qmax - zp) * scale


def saturated_count(x: np.ndarray, qp: QParams) -> int:
    """How many values of ``x`` saturate under the per-tensor ``qp``: their integer before clipping lies
    outside the type's range (a value less than half a step past the representable range only rounds, it
    does not clip)."""
    qmin, qmax = qp.dtype.qrange
    q = np.rint(np.asarray(x, dtype=np.float32) / qp.scale.astype(np.float32).ravel()[0])
    q += np.float32(qp.zero_point.ravel()[0])
    return int(np.count_nonzero((q < qmin) | (q > qmax)))
