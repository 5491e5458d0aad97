"""Carry out a :class:`~ortq.passes.plan.QuantPlan`: QuantizeLinear/DequantizeLinear pairs on activations,
int8 weights behind a DequantizeLinear, rewired through use-def links."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ortq.io import unmap
from ortq.passes.base import ReportingPass
from ortq.passes.initializers import (
    add_initializer,
    drop_unused_initializers,
    insert_after_producer,
    unique_name,
    values_by_name,
)
from ortq.passes.int4_storage import unpack_nodes
from ortq.passes.plan import QParams, QuantPlan, quantize_weight

logger = logging.getLogger(__name__)

# Per-channel DequantizeLinear (axis attribute) needs opset 13.
MIN_QDQ_OPSET = 13


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
    values = values_by_name(graph)

    for name, qp in plan.activations.items():
        if name in plan.rescaled:
            continue
        value = values[name]
        scale = add_initializer(graph, unique_name(names, f"{name}_scale"), qp.scale)
        zp = add_initializer(graph, unique_name(names, f"{name}_zero_point"), qp.zero_point)
        q = ir.node("QuantizeLinear", [value, scale, zp], name=unique_name(names, f"{name}_QuantizeLinear"))
        q.outputs[0].name = unique_name(names, f"{name}_quantized")
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zp], name=unique_name(names, f"{name}_DequantizeLinear"))
        dq.outputs[0].name = unique_name(names, f"{name}_dequantized")
        if value.dtype is not None:
            dq.outputs[0].dtype = value.dtype
        if value.shape is not None:
            dq.outputs[0].shape = value.shape
        insert_after_producer(graph, value, [q, dq])
        dq_of[name] = dq.outputs[0]

    for name, source in plan.rescaled.items():  # graph order: a source is quantized (or rescaled) before
        dq_of[name] = _rescaled_dq(graph, names, values[name], dq_of[source], plan.activations[name])

    for name, qp in plan.weights.items():
        value = values[name]
        w = value.const_value.numpy()
        scale = add_initializer(graph, unique_name(names, f"{name}_scale"), qp.scale)
        zp = add_initializer(graph, unique_name(names, f"{name}_zero_point"), qp.zero_point)
        if int4_weights and name in int4_weights:
            unpack, w_float = unpack_nodes(graph, unique_name(names, name), int4_weights[name])
            q_node = ir.node(
                "QuantizeLinear", [w_float, scale, zp], attributes=_axis_attrs(qp), name=unique_name(names, f"{name}_int8")
            )
            graph.insert_before(graph.node(0), [*unpack, q_node])
            q_w = q_node.outputs[0]
            q_w.name = unique_name(names, f"{name}_quantized")
            anchor = q_node
        else:
            anchor = None
            q_w = add_initializer(graph, unique_name(names, f"{name}_quantized"), quantize_weight(w, qp))
        dq = ir.node(
            "DequantizeLinear", [q_w, scale, zp], attributes=_axis_attrs(qp), name=unique_name(names, f"{name}_DequantizeLinear")
        )
        dq.outputs[0].name = unique_name(names, f"{name}_dequantized")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(w.shape)
        del w
        unmap([value])  # its int8 copy is made: the float weight's pages leave the process
        if anchor is not None:
            graph.insert_after(anchor, [dq])
        else:
            graph.insert_before(graph.node(0), [dq])
        dq_of[name] = dq.outputs[0]

    for name in plan.rewire_all:  # a quantized kernel output: every consumer reads the DequantizeLinear
        dq_out = dq_of[name]
        q_node = dq_out.producer().inputs[0].producer()
        for use in list(values[name].uses()):
            if use.node is not q_node:
                use.node.replace_input_with(use.idx, dq_out)

    for name, source in plan.rescaled.items():  # every consumer reads the rescaled DequantizeLinear: the Mul
        graph.remove(values[name].producer(), safe=True)  # goes, and the source's own one if nothing reads it
        dq = dq_of[source]
        if not list(dq.uses()) and not dq.is_graph_output() and source not in plan.rescaled:
            graph.remove(dq.producer(), safe=True)

    biases = _insert_biases(graph, plan, names)

    for node in list(graph):
        indices = plan.node_inputs.get(node.name)
        if not indices:
            continue
        for i in indices:
            v = node.inputs[i]
            if v is not None and v.name in dq_of:
                node.replace_input_with(i, dq_of[v.name])

    drop_unused_initializers(graph, [values[name] for name in plan.weights] + biases)
    if not any(n.op_type in ("If", "Loop", "Scan") for n in graph):
        # constants of removed ops (a Mul turned into a scale) and initializers the source left unread: ONNX
        # Runtime warns about each one when it loads the model
        drop_unused_initializers(graph, list(graph.initializers.values()))
    return model


def _rescaled_dq(graph: ir.Graph, names: set[str], value: ir.Value, source_dq: ir.Value, qp: QParams) -> ir.Value:
    """A DequantizeLinear reading the integers behind ``source_dq`` with ``qp`` (the scale multiplied by the
    removed Mul's constant); returns its output, which stands for ``value``."""
    name = value.name
    scale = add_initializer(graph, unique_name(names, f"{name}_scale"), qp.scale)
    zp = add_initializer(graph, unique_name(names, f"{name}_zero_point"), qp.zero_point)
    dq = ir.node("DequantizeLinear", [source_dq.producer().inputs[0], scale, zp],
                 name=unique_name(names, f"{name}_DequantizeLinear"))
    dq.outputs[0].name = unique_name(names, f"{name}_dequantized")
    if value.dtype is not None:
        dq.outputs[0].dtype = value.dtype
    if value.shape is not None:
        dq.outputs[0].shape = value.shape
    graph.insert_after(source_dq.producer(), [dq])
    return dq.outputs[0]


def _insert_biases(graph: ir.Graph, plan: QuantPlan, names: set[str]) -> list[ir.Value]:
    """Give each planned Conv / Gemm its bias as int32 (scale: activation scale x weight scale, zero point 0)
    behind a DequantizeLinear, as ONNX Runtime's QDQ selectors require; return the float biases replaced."""
    nodes = {n.name: n for n in graph}
    replaced = []
    for node_name, (index, _bias, act, weight) in plan.biases.items():
        node = nodes[node_name]
        value = node.inputs[index]
        a_qp, w_qp = plan.activations.get(act), plan.weights.get(weight)
        if value is None or a_qp is None or w_qp is None:
            continue
        b = value.const_value.numpy().astype(np.float64)
        scale = (np.float64(a_qp.scale) * w_qp.scale.astype(np.float64)).astype(np.float32).reshape(-1)
        if scale.size not in (1, b.size):
            continue
        scale = np.maximum(scale, np.finfo(np.float32).tiny)
        q = np.clip(np.round(b / scale), -(2**31), 2**31 - 1).astype(np.int32)
        if scale.size == 1:
            scale = scale.reshape(())
        base = unique_name(names, f"{node_name}_bias")
        q_init = add_initializer(graph, f"{base}_quantized", q)
        s_init = add_initializer(graph, f"{base}_scale", scale)
        z_init = add_initializer(graph, f"{base}_zero_point", np.zeros(scale.shape, np.int32))
        attrs = {"axis": 0} if scale.ndim == 1 else {}
        dq = ir.node("DequantizeLinear", [q_init, s_init, z_init], attributes=attrs, name=f"{base}_DequantizeLinear")
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(b.shape)
        graph.insert_before(node, [dq])
        node.replace_input_with(index, dq.outputs[0])
        replaced.append(value)
    return replaced


class InsertQDQPass(ReportingPass):
    """QDQ insertion as a pass: :func:`insert_qdq` with the plan (and int4 codes) given at construction.

    Report: the numbers of activations and weights quantized, of weights stored as int4 codes, and the
    opset the model ends with.
    """

    report_key = "insert_qdq"

    def __init__(self, plan: QuantPlan, *, int4_weights: dict | None = None):
        super().__init__()
        self.plan = plan
        self.int4_weights = int4_weights

    def rewrite(self, model: ir.Model) -> bool:
        insert_qdq(model, self.plan, int4_weights=self.int4_weights)
        self.report = {
            "activations": len(self.plan.activations),
            "weights": len(self.plan.weights),
            "int4_weights": len(self.int4_weights or {}),
            "quantized_outputs": len(self.plan.rewire_all),
            "int32_biases": len(self.plan.biases),
            "opset": model.opset_imports.get("", 0),
        }
        return bool(self.plan.activations or self.plan.weights)
