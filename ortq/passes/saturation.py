"""The part of an activation's range its consumers can tell apart: values beyond it saturate downstream.

A tensor read only by ops that saturate does not need its whole calibrated range on the integer grid. The
convolution in front of a decomposed Hardswish (``x * Clip(x + 3, 0, 6) / 6``, :mod:`ortq.passes.convnet_rewrites`)
gives the same result for every ``x <= -3``: the Clip sends ``x + 3`` to 0 and the product is 0 whatever ``x``
is. A squeeze-excitation's Hardsigmoid input (``Clip(x + 3, 0, 6)``) only matters on ``[-3, 3]``; a SiLU input
(``x * Sigmoid(x)``) only down to where the int8 Sigmoid rounds to zero. Quantizing such a tensor over the
interval its consumers distinguish, rather than over the calibrated ``[min, max]`` (which for a BatchNorm'd
convolution is about as wide below zero as above), makes its step up to several times finer at no cost: the
values beyond it clip to the interval's end, which every consumer maps to the same output.

:func:`needed_interval` walks the consumers of a value:

* ``Relu`` / ``Clip`` with constant bounds: the bounds (intersected with what the op's own consumers need);
* ``Add`` / ``Sub`` / ``Mul`` / ``Div`` by a scalar constant: what the op's output needs, mapped back;
* ``Sigmoid``: the inputs whose Sigmoid is within half a step of 0 or 1 on the Sigmoid output's integer grid
  (its calibrated range) read as the same integer;
* ``Mul(x, g)`` where the gate ``g`` is a function of ``x`` alone through the ops above (a Hardswish or SiLU
  gate): below the point where ``g`` is zero (exactly, or on its integer grid) the product is zero;
* anything else (a convolution, a graph output): the whole real line.

The interval is the union over the consumers. Values reached through other ops are never narrowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from ortq.calibrators.base import TensorRange
from ortq.passes.int8_graph import clip_bounds

__all__ = ["needed_interval", "narrowed_range"]

_INF = (-math.inf, math.inf)
# Recursion depth of the consumer walk (a Hardswish chain is four ops deep).
_MAX_DEPTH = 6
# Grid points for locating where a gate function reaches zero.
_GRID = 8193


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None:
        return None
    a = value.const_value.numpy()
    if a.size != 1 or not np.isfinite(a).all():
        return None
    return float(a.reshape(()))


def _step(name: str, ranges: Mapping[str, TensorRange]) -> float:
    """The uint8 step of a calibrated tensor (0 when it has no finite range)."""
    r = ranges.get(name)
    if r is None or not (math.isfinite(r.low) and math.isfinite(r.high)):
        return 0.0
    return (max(r.high, 0.0) - min(r.low, 0.0)) / 255.0


def _unary(node: ir.Node, x_index: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """The elementwise function ``node`` applies to its input ``x_index`` (others constant), or None."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op in ("Relu", "Clip"):
        b = clip_bounds(node)
        if b is None or x_index != 0:
            return None
        return lambda t: np.clip(t, b[0], b[1])
    if op == "Sigmoid":
        return lambda t: 1.0 / (1.0 + np.exp(-t))
    if op == "HardSigmoid":
        alpha = node.attributes.get("alpha")
        beta = node.attributes.get("beta")
        a = float(alpha.as_float()) if alpha is not None else 0.2
        b = float(beta.as_float()) if beta is not None else 0.5
        return lambda t: np.clip(a * t + b, 0.0, 1.0)
    if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
        c = _scalar(node.inputs[1 - x_index])
        if c is None:
            return None
        if op == "Add":
            return lambda t: t + c
        if op == "Mul":
            return lambda t: t * c
        if op == "Sub":
            return (lambda t: t - c) if x_index == 0 else (lambda t: c - t)
        if x_index == 0 and c != 0:
            return lambda t: t / c
    return None


def _gate_of(gate: ir.Value, x: ir.Value) -> Callable[[np.ndarray], np.ndarray] | None:
    """``gate`` as a function of ``x`` when it is computed from ``x`` alone by elementwise ops with constants."""
    chain: list[Callable[[np.ndarray], np.ndarray]] = []
    v = gate
    for _ in range(_MAX_DEPTH):
        if v is x:
            break
        node = v.producer()
        if node is None:
            return None
        data = [i for i, inp in enumerate(node.inputs) if inp is not None and _scalar(inp) is None]
        if len(data) != 1:
            return None
        f = _unary(node, data[0])
        if f is None:
            return None
        chain.append(f)
        v = node.inputs[data[0]]
    else:
        return None
    if v is not x or not chain:
        return None

    def apply(t: np.ndarray) -> np.ndarray:
        for f in reversed(chain):
            t = f(t)
        return t

    return apply


def _zero_below(f: Callable[[np.ndarray], np.ndarray], low: float, tol: float) -> float:
    """The largest ``t`` in ``[low, 0]`` such that ``|f| <= tol`` on all of ``[low, t]`` (on a fine grid),
    or ``-inf`` when ``f`` is not within ``tol`` of zero at ``low``."""
    if not math.isfinite(low) or low >= 0:
        return -math.inf
    grid = np.linspace(low, 0.0, _GRID)
    with np.errstate(over="ignore"):
        small = np.abs(f(grid)) <= tol
    if not small[0]:
        return -math.inf
    bad = np.flatnonzero(~small)
    last = (bad[0] - 1) if bad.size else grid.size - 1
    return float(grid[last])


def _consumer_interval(node: ir.Node, index: int, x: ir.Value, ranges: Mapping[str, TensorRange],
                       depth: int) -> tuple[float, float]:
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return _INF
    out = node.outputs[0]
    if op in ("Relu", "Clip") and index == 0:
        b = clip_bounds(node)
        if b is None:
            return _INF
        lo, hi = needed_interval(out, ranges, depth + 1)
        return max(b[0], lo), min(b[1], hi)
    if op == "Sigmoid":
        # Inputs whose Sigmoid lies within half an output step of 0 read as the same integer (zero point 0
        # for a calibrated range starting at 0); symmetrically near 1 when the range ends at 1.
        step = _step(out.name, ranges)
        r = ranges.get(out.name)
        if step <= 0 or r is None or r.low < 0:
            return _INF
        half = step / 2
        lo = -math.log(1 / half - 1) if half < 0.5 else -math.inf
        hi = math.log(1 / half - 1) if half < 0.5 and r.high >= 1 - half else math.inf
        return lo, hi
    if op in ("Add", "Sub", "Mul", "Div") and len(node.inputs) == 2:
        other = node.inputs[1 - index]
        c = _scalar(other)
        if c is not None:
            lo, hi = needed_interval(out, ranges, depth + 1)
            if op == "Add":
                return lo - c, hi - c
            if op == "Sub":
                return (lo + c, hi + c) if index == 0 else (c - hi, c - lo)
            if op == "Mul" and c != 0:
                return (lo / c, hi / c) if c > 0 else (hi / c, lo / c)
            if op == "Div" and index == 0 and c != 0:
                return (lo * c, hi * c) if c > 0 else (hi * c, lo * c)
            return _INF
        if op == "Mul" and other is not None and other is not x:
            gate = _gate_of(other, x)
            r = ranges.get(x.name)
            if gate is None or r is None:
                return _INF
            # the product is zero where the gate is: exactly, or where the gate's integer is its zero point
            tol = _step(other.name, ranges) / 2 if other.name in ranges else 0.0
            return _zero_below(gate, float(r.low), tol), math.inf
    return _INF


def needed_interval(value: ir.Value, ranges: Mapping[str, TensorRange], depth: int = 0) -> tuple[float, float]:
    """The interval of ``value`` its consumers distinguish (see the module docstring): clipping ``value`` to
    it leaves every consumer's result unchanged (on the integer grids of ``ranges``). ``(-inf, inf)`` when
    any consumer needs every value."""
    if depth > _MAX_DEPTH or value.is_graph_output():
        return _INF
    uses = list(value.uses())
    if not uses:
        return _INF
    lo, hi = math.inf, -math.inf
    for use in uses:
        a, b = _consumer_interval(use.node, use.idx, value, ranges, depth)
        lo, hi = min(lo, a), max(hi, b)
        if lo == -math.inf and hi == math.inf:
            break
    return (lo, hi) if lo <= hi else _INF


def narrowed_range(value: ir.Value, rng: TensorRange, ranges: Mapping[str, TensorRange]) -> TensorRange:
    """``rng`` (the calibrated range of ``value``) cut to :func:`needed_interval`; unchanged when the
    interval covers it."""
    lo, hi = needed_interval(value, ranges)
    low, high = max(rng.low, lo), min(rng.high, hi)
    if (low, high) == (rng.low, rng.high) or not low < high:
        return rng
    return TensorRange(low=low, high=high, num_values=rng.num_values, num_excluded=rng.num_excluded)
