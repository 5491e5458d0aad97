"""Carry out a :class:`~ortq.passes.plan.QuantPlan`: QuantizeLinear/DequantizeLinear pairs on activations,
int8 weights behind a DequantizeLinear, rewired through use-def links."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ortq.passes.plan import QParams, QuantPlan, quantize_weight

logger = logging.getLogger(__name__)

# Per-channel DequantizeLinear (axis attribute) needs opset 13.
MIN_QDQ_OPSET = 13


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a typed, shaped initializer called ``name`` and return its value."""
    value = ir.val(name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def _unique(graph_names: set[str], base: str) -> str:
    name, i = base, 1
    while name in graph_names:
        name = f"{base}_{i}"
        i += 1
    graph_names.add(name)
    return name


def _axis_attrs(qp: QParams) -> dict[str, int]:
    return {"axis": int(qp.axis)} if qp.axis is not None and qp.scale.size > 1 else {}


def insert_qdq(model: ir.Model, plan: QuantPlan, *, int4_weights: dict | None = None) -> ir.Model:
    """Rewrite ``model`` in place according to ``plan`` and return it.

    Each planned activation gets one QuantizeLinear -> DequantizeLinear pair right after its producer; the
    planned consumers read the DequantizeLinear output (ONNX Runtime duplicates the DQ per consumer as its
    fusions need). Each planned weight is replaced by its int8 initializer and a DequantizeLinear; weights in
    ``int4_weights`` (name -> :class:`~ortq.passes._int4.BlockQuantized` of the transposed weight) are stored
    as 4-bit codes instead, unpacked and quantized to int8 by constant subgraphs ONNX Runtime folds at load.
    """
    graph = model.graph
    opset = model.opset_imports.get("", 0)
    if opset < MIN_QDQ_OPSET:
        model.opset_imports[""] = MIN_QDQ_OPSET
        logger.info("opset raised from %d to %d for per-channel QDQ", opset, MIN_QDQ_OPSET)
    names = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
    names |= set(graph.initializers) | {v.name for v in graph.inputs}
    dq_of: dict[str, ir.Value] = {}
    values = {v.name: v for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
    values.update({v.name: v for v in graph.inputs})
    values.update(graph.initializers)

    for name, qp in plan.activations.items():
        value = values[name]
        scale = add_initializer(graph, _unique(names, f"{name}_scale"), qp.scale)
        zp = add_initializer(graph, _unique(names, f"{name}_zero_point"), qp.zero_point)
        q = ir.node("QuantizeLinear", [value, scale, zp], name=_unique(names, f"{name}_QuantizeLinear"))
        q.outputs[0].name = _unique(names, f"{name}_quantized")
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=_unique(names, f"{name}_DequantizeLinear"))
        dq.outputs[0].name = _unique(names, f"{name}_dequantized")
        if value.dtype is not None:
            dq.outputs[0].dtype = value.dtype
        if value.shape is not None:
            dq.outputs[0].shape = value.shape
        producer = value.producer()
        if producer is None:
            graph.insert_before(graph.node(0), [q, dq])
        else:
            graph.insert_after(producer, [q, dq])
        dq_of[name] = dq.outputs[0]

    for name, qp in plan.weights.items():
        value = values[name]
        w = value.const_value.numpy()
        scale = add_initializer(graph, _unique(names, f"{name}_scale"), qp.scale)
        zp = add_initializer(graph, _unique(names, f"{name}_zero_point"), qp.zero_point)
        if int4_weights and name in int4_weights:
            from ortq.passes.int4_storage import unpack_nodes

            unpack, w_float = unpack_nodes(graph, _unique(names, name), int4_weights[name])
            q_node = ir.node(
                "QuantizeLinear", [w_float, scale, zp], attributes=_axis_attrs(qp), name=_unique(names, f"{name}_int8")
            )
            graph.insert_before(graph.node(0), [*unpack, q_node])
            q_w = q_node.outputs[0]
            q_w.name = _unique(names, f"{name}_quantized")
            anchor = q_node
        else:
            anchor = None
            q_w = add_initializer(graph, _unique(names, f"{name}_quantized"), quantize_weight(w, qp))
        dq = ir.node(
            "DequantizeLinear", [q_w, scale, zp], attributes=_axis_attrs(qp), name=_unique(names, f"{name}_DequantizeLinear")
        )
        dq.outputs[0].name = _unique(names, f"{name}_dequantized")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(w.shape)
        if anchor is not None:
            graph.insert_after(anchor, [dq])
        else:
            graph.insert_before(graph.node(0), [dq])
        dq_of[name] = dq.outputs[0]

    for node in list(graph):
        indices = plan.node_inputs.get(node.name)
        if not indices:
            continue
        for i in indices:
            v = node.inputs[i]
            if v is not None and v.name in dq_of:
                node.replace_input_with(i, dq_of[v.name])

    _drop_unused_initializers(graph, set(plan.weights))
    return model


def _drop_unused_initializers(graph: ir.Graph, names: set[str]) -> None:
    for name in names:
        init = graph.initializers.get(name)
        if init is not None and not init.uses() and not init.is_graph_output():
            del graph.initializers[name]
