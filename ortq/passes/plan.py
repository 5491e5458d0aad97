"""The quantization plan: which tensors get QDQ pairs, with which parameters, and why every other node stays
in float.

Planning runs twice: :func:`calibration_targets` before calibration (which activations need ranges), and
:func:`make_plan` after it (ranges in hand, every decision final). The plan is data, written to the report;
:mod:`ortq.passes.insert_qdq` only carries it out.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ortq.calibrators.base import TensorRange
from ortq.config import PerChannel, QuantizationConfig, QuantType

logger = logging.getLogger(__name__)

# QDQ scales are float32 and QuantizeLinear takes float32 below opset 19: float16 / bfloat16 tensors stay float.
_FLOAT_TYPES = (ir.DataType.FLOAT,)


@dataclass(frozen=True)
class InputRole:
    """How one input of a quantizable node is treated: an activation (calibrated), or a constant weight."""

    index: int
    kind: str  # "activation" | "weight"
    axis: int | None = None  # per-channel axis of a weight


def _const_rank(value: ir.Value | None) -> int | None:
    if value is None or value.const_value is None:
        return None
    return len(value.const_value.shape)


def _matmul_roles(node: ir.Node) -> list[InputRole]:
    roles = []
    for i in (0, 1):
        rank = _const_rank(node.inputs[i])
        if i == 1 and rank == 2:
            roles.append(InputRole(i, "weight", axis=1))  # [K, N]: one scale per output column
        elif rank is not None and rank >= 1:
            roles.append(InputRole(i, "weight", axis=None))
        else:
            roles.append(InputRole(i, "activation"))
    return roles


def _gemm_roles(node: ir.Node) -> list[InputRole]:
    attr = node.attributes.get("transB")
    trans_b = bool(attr.as_int()) if attr is not None else False
    b_role = InputRole(1, "weight", axis=0 if trans_b else 1) if _const_rank(node.inputs[1]) == 2 else InputRole(
        1, "activation"
    )
    a_role = InputRole(0, "weight") if _const_rank(node.inputs[0]) else InputRole(0, "activation")
    return [a_role, b_role]


def _conv_roles(node: ir.Node) -> list[InputRole]:
    w = InputRole(1, "weight", axis=0) if _const_rank(node.inputs[1]) else InputRole(1, "activation")
    return [InputRole(0, "activation"), w]


# Op type -> the inputs that get QDQ pairs. Biases and shape inputs stay float.
OP_RULES: dict[str, Callable[[ir.Node], list[InputRole]]] = {
    "MatMul": _matmul_roles,
    "Gemm": _gemm_roles,
    "Conv": _conv_roles,
}


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor. Scales are finite and > 0 by construction."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: QuantType
    axis: int | None = None

    def to_dict(self) -> dict[str, Any]:
        scale = self.scale.ravel()
        return {
            "dtype": self.dtype.value,
            "axis": self.axis,
            "scale": float(scale[0]) if scale.size == 1 else [float(scale.min()), float(scale.max())],
            "zero_point": int(self.zero_point.ravel()[0]) if self.zero_point.size == 1 else "per-channel",
        }


@dataclass
class NodeDecision:
    name: str
    op_type: str
    quantized: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "quantized": self.quantized, "reason": self.reason}


@dataclass
class QuantPlan:
    """Everything :func:`ortq.passes.insert_qdq.insert_qdq` needs, plus the reason for each float node."""

    activations: dict[str, QParams] = field(default_factory=dict)
    weights: dict[str, QParams] = field(default_factory=dict)
    # node name -> input indices to route through their DequantizeLinear
    node_inputs: dict[str, list[int]] = field(default_factory=dict)
    decisions: list[NodeDecision] = field(default_factory=list)

    @property
    def quantized_nodes(self) -> list[str]:
        return [d.name for d in self.decisions if d.quantized]

    @property
    def float_nodes(self) -> dict[str, str]:
        return {d.name: d.reason for d in self.decisions if not d.quantized}

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_nodes": len(self.decisions),
            "num_quantized": len(self.quantized_nodes),
            "activations": {k: v.to_dict() for k, v in sorted(self.activations.items())},
            "weights": {k: v.to_dict() for k, v in sorted(self.weights.items())},
            "nodes": [d.to_dict() for d in self.decisions],
        }


def ensure_node_names(graph: ir.Graph) -> None:
    """Give every unnamed node a stable unique name, so plans and reports can refer to it."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def mask_only_values(graph: ir.Graph) -> set[str]:
    """Names of values computed only from mask-like graph inputs and constants (the additive attention mask
    with its float-min constants lives here). Such values are never quantized."""
    mask_inputs = {v.name for v in graph.inputs if "mask" in (v.name or "").lower()}
    if not mask_inputs:
        return set()
    tainted: set[str] = set(mask_inputs)
    constant: set[str] = set(graph.initializers)
    for node in graph:  # graph nodes are topologically sorted
        ins = [v for v in node.inputs if v is not None]
        if all(v.name in constant or v.const_value is not None for v in ins):
            constant.update(o.name for o in node.outputs)  # Constant nodes and folds of constants
            continue
        rest = [v for v in ins if v.name not in tainted and v.name not in constant and v.const_value is None]
        if not rest:
            tainted.update(o.name for o in node.outputs)
    return tainted


def _is_float(value: ir.Value) -> bool:
    return value.dtype in _FLOAT_TYPES if value.dtype is not None else True


def _skips_activation_matmul(node: ir.Node, roles: list[InputRole], config: QuantizationConfig) -> bool:
    return (
        not config.quantize_activation_matmuls
        and node.op_type == "MatMul"
        and all(r.kind == "activation" for r in roles)
    )


def calibration_targets(model: ir.Model, config: QuantizationConfig) -> list[str]:
    """Activation tensors whose ranges calibration must estimate for ``config``."""
    graph = model.graph
    ensure_node_names(graph)
    masked = mask_only_values(graph)
    names: dict[str, None] = {}
    for node in graph:
        if node.op_type not in config.operators_to_quantize or node.domain not in ("", "ai.onnx"):
            continue
        rule = OP_RULES.get(node.op_type)
        if rule is None or _excluded(node.name, config.nodes_to_exclude):
            continue
        roles = rule(node)
        if _skips_activation_matmul(node, roles, config):
            continue
        for role in roles:
            v = node.inputs[role.index]
            if role.kind == "activation" and v is not None and v.name not in masked and _is_float(v):
                names[v.name] = None
    return list(names)


def activation_qparams(rng: TensorRange, dtype: QuantType, symmetric: bool) -> QParams:
    """Scale and zero point for an activation range; the range always includes 0 (ONNX Runtime needs an exact
    zero for padding). Degenerate or non-finite ranges give scale 1, zero point 0 (never inf/NaN)."""
    qmin, qmax = dtype.qrange
    low = min(float(rng.low), 0.0)
    high = max(float(rng.high), 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 0.0
    if symmetric:
        absmax = max(-low, high)
        if dtype is QuantType.QInt8:
            scale = absmax / qmax if absmax > 0 else 1.0
            zp = 0
        else:
            scale = 2 * absmax / (qmax - qmin) if absmax > 0 else 1.0
            zp = (qmax + qmin + 1) // 2
    else:
        span = high - low
        scale = span / (qmax - qmin) if span > 0 else 1.0
        zp = int(round(qmin - low / scale))
        zp = min(max(zp, qmin), qmax)
    scale = max(scale, np.finfo(np.float32).tiny)
    np_dtype = np.int8 if dtype is QuantType.QInt8 else np.uint8
    return QParams(np.array(scale, dtype=np.float32), np.array(zp, dtype=np_dtype), dtype)


def weight_qparams(
    weight: np.ndarray, axis: int | None, dtype: QuantType, symmetric: bool, reduce_range: bool
) -> QParams:
    """Scales for a constant weight, per channel along ``axis`` or per tensor."""
    w = weight.astype(np.float32)
    if axis is None:
        lo, hi = np.array(min(w.min(), 0.0)), np.array(max(w.max(), 0.0))
    else:
        red = tuple(i for i in range(w.ndim) if i != axis)
        lo = np.minimum(w.min(axis=red), 0.0)
        hi = np.maximum(w.max(axis=red), 0.0)
    np_dtype = np.int8 if dtype is QuantType.QInt8 else np.uint8
    if dtype is QuantType.QInt8:
        qmax = 63 if reduce_range else 127
        qmin = -qmax if symmetric else (-64 if reduce_range else -128)
    else:
        qmin, qmax = 0, (127 if reduce_range else 255)
    if symmetric:
        absmax = np.maximum(-lo, hi)
        half = (qmax - qmin) / 2
        scale = np.where(absmax > 0, absmax / half, 1.0)
        zp = np.full_like(scale, (qmax + qmin + 1) // 2 if dtype is QuantType.QUInt8 else 0)
    else:
        span = hi - lo
        scale = np.where(span > 0, span / (qmax - qmin), 1.0)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    scale = np.maximum(scale, np.finfo(np.float32).tiny).astype(np.float32)
    return QParams(scale, zp.astype(np_dtype), dtype, axis)


def quantize_weight(weight: np.ndarray, qp: QParams, reduce_range: bool = False) -> np.ndarray:
    """Round ``weight`` to the integer grid of ``qp`` (inverse of DequantizeLinear)."""
    scale, zp = qp.scale, qp.zero_point.astype(np.int32)
    if qp.axis is not None:
        shape = [1] * weight.ndim
        shape[qp.axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    q = np.round(weight.astype(np.float32) / scale) + zp
    lo, hi = (-128, 127) if qp.dtype is QuantType.QInt8 else (0, 255)
    return np.clip(q, lo, hi).astype(np.int8 if qp.dtype is QuantType.QInt8 else np.uint8)


def _range_problem(name: str, ranges: Mapping[str, TensorRange]) -> str | None:
    rng = ranges.get(name)
    if rng is None:
        return f"input {name!r} has no calibrated range"
    if not (math.isfinite(rng.low) and math.isfinite(rng.high)):
        return f"input {name!r} has a non-finite range"
    if rng.num_values == 0:
        return f"input {name!r} saw no finite values during calibration"
    if rng.num_excluded > 0:
        return f"input {name!r} holds {rng.num_excluded} mask/non-finite values (attention-mask path)"
    return None


def make_plan(model: ir.Model, config: QuantizationConfig, ranges: Mapping[str, TensorRange]) -> QuantPlan:
    """Decide, for every node, whether it is quantized, and compute all scales and zero points."""
    graph = model.graph
    ensure_node_names(graph)
    masked = mask_only_values(graph)
    plan = QuantPlan()
    for node in graph:
        decision = _decide(node, config, ranges, masked, plan)
        plan.decisions.append(decision)
    return plan


def _decide(
    node: ir.Node,
    config: QuantizationConfig,
    ranges: Mapping[str, TensorRange],
    masked: set[str],
    plan: QuantPlan,
) -> NodeDecision:
    def keep(reason: str) -> NodeDecision:
        return NodeDecision(node.name, node.op_type, False, reason)

    if node.domain not in ("", "ai.onnx"):
        return keep(f"custom-domain op {node.domain}::{node.op_type}")
    if node.op_type not in config.operators_to_quantize:
        return keep("op type not in operators_to_quantize (runs in float)")
    rule = OP_RULES.get(node.op_type)
    if rule is None:
        return keep(f"no QDQ rule for op type {node.op_type}")
    if _excluded(node.name, config.nodes_to_exclude):
        return keep("excluded by nodes_to_exclude")
    roles = rule(node)
    if _skips_activation_matmul(node, roles, config):
        return keep("MatMul of two activations (attention): faster and more accurate in float on CPU")
    acts, weights = {}, {}
    for role in roles:
        v = node.inputs[role.index]
        if v is None:
            return keep(f"input {role.index} is missing")
        if not _is_float(v):
            return keep(f"input {v.name!r} is {v.dtype.name.lower() if v.dtype else '?'}, not float32")
        if role.kind == "activation":
            if v.name in masked:
                return keep(f"input {v.name!r} is on the attention-mask path")
            problem = _range_problem(v.name, ranges)
            if problem:
                return keep(problem)
            acts[v.name] = activation_qparams(ranges[v.name], config.activations_dtype, config.activations_symmetric)
        else:
            w = v.const_value.numpy()
            if not np.isfinite(w).all():
                return keep(f"weight {v.name!r} holds NaN or infinite values")
            axis = role.axis if isinstance(config.weights_granularity, PerChannel) else None
            if isinstance(config.weights_granularity, PerChannel) and config.weights_granularity.axis is not None:
                axis = config.weights_granularity.axis if role.axis is not None else None
            weights[v.name] = weight_qparams(
                w, axis, config.weights_dtype, config.weights_symmetric, config.reduce_range
            )
    # A weight shared by several nodes keeps one quantization: the first decision wins.
    for name, qp in weights.items():
        plan.weights.setdefault(name, qp)
    for name, qp in acts.items():
        plan.activations.setdefault(name, qp)
    plan.node_inputs[node.name] = [r.index for r in roles]
    kinds = ", ".join(
        f"{r.kind} {node.inputs[r.index].name}" + (f" per-channel axis {r.axis}" if r.kind == "weight" and r.axis is not None
                                                   and isinstance(config.weights_granularity, PerChannel) else "")
        for r in roles
    )
    return NodeDecision(node.name, node.op_type, True, f"int8: {kinds}")
