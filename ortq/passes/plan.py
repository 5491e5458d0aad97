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
from ortq.io import unmap
from ortq.passes.int8_graph import (
    OUTPUT_QUANTIZED_OPS,
    QLINEAR_OPS,
    chain_inputs,
    clip_bounds,
    folded_activation,
    is_chain_op,
    scalar_constant,
)
from ortq.passes.saturation import narrowed_range

logger = logging.getLogger(__name__)

# QDQ scales are float32 and QuantizeLinear takes float32 below opset 19: float16 / bfloat16 tensors stay float.
_FLOAT_TYPES = (ir.DataType.FLOAT,)


@dataclass(frozen=True)
class InputRole:
    """How one input of a quantizable node is treated: an activation (calibrated), or a constant weight."""

    index: int
    kind: str  # "activation" | "weight" | "bias" (int32, scale of activation x weight)
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


def _bias_role(node: ir.Node) -> list[InputRole]:
    """The int32 bias of a Conv / Gemm: ONNX Runtime fuses the node only when every input comes from a
    DequantizeLinear, the bias included."""
    if len(node.inputs) > 2 and _const_rank(node.inputs[2]) == 1:
        return [InputRole(2, "bias")]
    return []


def _gemm_roles(node: ir.Node) -> list[InputRole]:
    attr = node.attributes.get("transB")
    trans_b = bool(attr.as_int()) if attr is not None else False
    b_role = InputRole(1, "weight", axis=0 if trans_b else 1) if _const_rank(node.inputs[1]) == 2 else InputRole(
        1, "activation"
    )
    a_role = InputRole(0, "weight") if _const_rank(node.inputs[0]) else InputRole(0, "activation")
    beta = node.attributes.get("beta")
    bias = _bias_role(node) if b_role.kind == "weight" and (beta is None or beta.as_float() == 1.0) else []
    return [a_role, b_role, *bias]


def _conv_roles(node: ir.Node) -> list[InputRole]:
    w = InputRole(1, "weight", axis=0) if _const_rank(node.inputs[1]) else InputRole(1, "activation")
    return [InputRole(0, "activation"), w, *(_bias_role(node) if w.kind == "weight" else [])]


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
    # activations whose every consumer reads the DequantizeLinear (quantized outputs of int8 kernels)
    rewire_all: set[str] = field(default_factory=set)
    # node name -> (bias input index, bias, activation, weight): int32 bias of scale activation x weight
    biases: dict[str, tuple[int, str, str, str]] = field(default_factory=dict)
    # output of a Mul by a positive scalar -> its 8-bit input: the Mul is removed, the output read from the
    # input's integers with the scale multiplied (its parameters are in ``activations``)
    rescaled: dict[str, str] = field(default_factory=dict)

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
            "quantized_outputs": sorted(self.rewire_all),
            "int32_biases": len(self.biases),
            "rescaled_outputs": dict(sorted(self.rescaled.items())),
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
        if config.int8_chain and node.op_type in OUTPUT_QUANTIZED_OPS:
            names.update(dict.fromkeys(_output_candidates(node)))
    if config.int8_chain:  # chain ops whose inputs will all be 8-bit, in graph order as make_plan walks
        eight_bit = set(names)
        for node in graph:
            if not is_chain_op(node) or node.op_type in OP_RULES or _excluded(node.name, config.nodes_to_exclude):
                continue
            data = [i for i in chain_inputs(node) if scalar_constant(node, i) is None]
            if not data or not all(node.inputs[i].name in eight_bit for i in data):
                continue
            outputs = _output_candidates(node) if node.op_type in QLINEAR_OPS else [node.outputs[0].name]
            eight_bit.update(outputs)
            if node.op_type in QLINEAR_OPS:
                names.update(dict.fromkeys(outputs))
    return list(names)


def _output_candidates(node: ir.Node) -> list[str]:
    """The tensors whose ranges an output-quantized node may need: its output, and the output of the
    Relu / Clip folded into it."""
    out = [node.outputs[0].name] if not node.outputs[0].is_graph_output() else []
    act = folded_activation(node)
    return out + ([act.outputs[0].name] if act is not None else [])


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
    folded: dict[str, str] = {}  # Relu/Clip node -> the node whose output QuantizeLinear absorbs it
    for node in graph:
        if node.name in folded:
            decision = NodeDecision(node.name, node.op_type, False,
                                    f"folded into the int8 output of {folded[node.name]} (no node left to run)")
        elif config.int8_chain and is_chain_op(node) and node.op_type not in OP_RULES:
            decision = _decide_chain(node, config, ranges, plan, folded)
        else:
            decision = _decide(node, config, ranges, masked, plan)
            if decision.quantized and config.int8_chain and node.op_type in OUTPUT_QUANTIZED_OPS:
                decision.reason += _plan_output(node, config, ranges, plan, folded)
        plan.decisions.append(decision)
    return plan


def _fold_qparams(rng: TensorRange, bounds: tuple[float, float], config: QuantizationConfig) -> QParams | None:
    """Parameters of a Relu / Clip output that make the activation redundant for ONNX Runtime (the integer
    range maps inside ``bounds``), or None when the activation dtype cannot (symmetric int8 below zero)."""
    lo_bound, hi_bound = bounds
    clipped = TensorRange(max(rng.low, lo_bound), min(rng.high, hi_bound), rng.num_values, rng.num_excluded)
    qp = activation_qparams(clipped, config.activations_dtype, config.activations_symmetric)
    qmin, qmax = config.activations_dtype.qrange
    zp = int(qp.zero_point)
    scale = np.float32(qp.scale)
    if np.float32(qmin - zp) * scale < lo_bound:
        return None
    while np.float32(qmax - zp) * scale > hi_bound:  # float rounding can overshoot the Clip's max
        scale = np.nextafter(scale, np.float32(0))
    return QParams(np.array(scale, dtype=np.float32), qp.zero_point, qp.dtype)


def _activation_range(value: ir.Value, config: QuantizationConfig, ranges: Mapping[str, TensorRange]) -> TensorRange:
    """The calibrated range of ``value``, cut to what its consumers tell apart when the config asks
    (:mod:`ortq.passes.saturation`)."""
    rng = ranges[value.name]
    return narrowed_range(value, rng, ranges) if config.narrow_saturated_ranges else rng


def _plan_output(node: ir.Node, config: QuantizationConfig, ranges: Mapping[str, TensorRange], plan: QuantPlan,
                 folded: dict[str, str]) -> str:
    """Quantize the output of an int8 kernel (folding a following Relu / Clip when the range allows); return
    what was done, for the decision's reason."""
    act = folded_activation(node)
    if act is not None and _range_problem(act.outputs[0].name, ranges) is None:
        qp = _fold_qparams(ranges[act.outputs[0].name], clip_bounds(act), config)
        if qp is not None:
            name = act.outputs[0].name
            plan.activations.setdefault(name, qp)
            plan.rewire_all.add(name)
            folded[act.name] = node.name
            return f"; output int8 with {act.op_type} {act.name} folded"
    out = node.outputs[0]
    if out.is_graph_output():
        return "; output left float (a graph output)"
    problem = _range_problem(out.name, ranges)
    if problem:
        return f"; output left float ({problem})"
    plan.activations.setdefault(out.name, activation_qparams(_activation_range(out, config, ranges),
                                                             config.activations_dtype, config.activations_symmetric))
    plan.rewire_all.add(out.name)
    return "; output int8"


def _decide_chain(node: ir.Node, config: QuantizationConfig, ranges: Mapping[str, TensorRange], plan: QuantPlan,
                  folded: dict[str, str]) -> NodeDecision:
    """An op between int8 kernels: int8 when every data input is already an 8-bit tensor of the plan."""

    def keep(reason: str) -> NodeDecision:
        return NodeDecision(node.name, node.op_type, False, reason)

    if _excluded(node.name, config.nodes_to_exclude):
        return keep("excluded by nodes_to_exclude")
    indices = chain_inputs(node)
    constants = {i: c for i in indices if (c := scalar_constant(node, i)) is not None}
    if len(constants) == len(indices):
        return keep("constant inputs only")
    for i in indices:
        v = node.inputs[i]
        if i not in constants and v.name not in plan.activations:
            kind = "a constant" if v.const_value is not None or v.is_initializer() else "not an 8-bit tensor"
            return keep(f"input {v.name!r} is {kind}: no int8 neighbour to stay in")
    if any(not _is_float(o) for o in node.outputs):
        return keep("output is not float32")
    out = node.outputs[0]
    if node.op_type == "Mul" and constants and next(iter(constants.values())) > 0 and not out.is_graph_output():
        (c_index, c), = constants.items()
        source = node.inputs[1 - c_index].name
        qp = plan.activations[source]
        plan.activations.setdefault(out.name, QParams(np.asarray(qp.scale * np.float32(c), np.float32),
                                                      qp.zero_point, qp.dtype))
        plan.rescaled[out.name] = source
        plan.rewire_all.add(out.name)
        return keep(f"folded into the scale of {source!r} (x{c:g}): no node left to run")
    for i, c in constants.items():  # the constant on the activations' integer type, like a weight
        plan.weights.setdefault(node.inputs[i].name, weight_qparams(
            np.array(c, np.float32), None, config.activations_dtype, False, False))
    plan.node_inputs[node.name] = indices
    if node.op_type in QLINEAR_OPS:
        reason = _plan_output(node, config, ranges, plan, folded)
        if "left float" in reason:
            return keep(f"int8 inputs, but the{reason.removeprefix(';')}: runs in float")
        return NodeDecision(node.name, node.op_type, True, f"int8: QLinear{node.op_type}{reason}")
    if out.is_graph_output():
        return keep("output is a graph output: runs in float between DequantizeLinear and the output")
    plan.activations.setdefault(out.name, plan.activations[node.inputs[indices[0]].name])
    plan.rewire_all.add(out.name)
    return NodeDecision(node.name, node.op_type, True, "int8: runs on 8-bit data with its input's scale")


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
    bias = next((r for r in roles if r.kind == "bias"), None)
    roles = [r for r in roles if r.kind != "bias"]
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
            acts[v.name] = activation_qparams(_activation_range(v, config, ranges), config.activations_dtype,
                                              config.activations_symmetric)
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
            del w
            unmap([v])  # read again when quantized: a model over 2 GB is not kept resident meanwhile
    # A weight shared by several nodes keeps one quantization: the first decision wins.
    for name, qp in weights.items():
        plan.weights.setdefault(name, qp)
    for name, qp in acts.items():
        plan.activations.setdefault(name, qp)
    plan.node_inputs[node.name] = [r.index for r in roles]
    if bias is not None and len(acts) == 1 and len(weights) == 1:
        b = node.inputs[bias.index]
        if np.isfinite(b.const_value.numpy()).all():
            plan.biases[node.name] = (bias.index, b.name, next(iter(acts)), next(iter(weights)))
    kinds = ", ".join(
        f"{r.kind} {node.inputs[r.index].name}" + (f" per-channel axis {r.axis}" if r.kind == "weight" and r.axis is not None
                                                   and isinstance(config.weights_granularity, PerChannel) else "")
        for r in roles
    )
    return NodeDecision(node.name, node.op_type, True, f"int8: {kinds}")
