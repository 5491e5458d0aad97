"""Embedding Gathers to ``com.microsoft.GatherBlockQuantized``.

The CPU kernel of ONNX Runtime reads ``uint8`` data (``bits`` 4 or 8) with ``gather_axis=0`` and the
quantized axis last: data ``[V, D * bits / 8]`` (4-bit codes packed two per byte, low nibble first),
scales ``[V, ceil(D / block_size)]`` and optional zero points packed like the data
(``[V, ceil(n_blocks * bits / 8)]``); without zero points it uses ``2**(bits - 1)``. This is the same
byte layout as ``MatMulNBits`` stores a ``[N, K]`` weight, so a table tied to an ``lm_head`` is stored once.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ortq.passes._int4 import BlockQuantized
from ortq.passes.initializers import block_initializers

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


def gather_table(node: ir.Node) -> tuple[np.ndarray | None, str]:
    """The constant 2-D float table of an embedding ``Gather`` (axis 0), or None and the reason it is not one."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx"):
        return None, "not a Gather"
    axis = node.attributes.get("axis")
    if axis is not None and axis.as_int() != 0:
        return None, "gather axis is not 0"
    data = node.inputs[0]
    if data is None or data.const_value is None or not data.is_initializer() or data.is_graph_input():
        return None, "data is not a constant initializer"
    if data.const_value.dtype != ir.DataType.FLOAT:
        return None, f"data type {data.const_value.dtype.name} is not float32"
    if len(data.const_value.shape) != 2:
        return None, "data is not 2-D"
    return data.const_value.numpy(), ""


def replace_gather(
    graph: ir.Graph,
    node: ir.Node,
    bq: BlockQuantized,
    *,
    shared: tuple[ir.Value, ir.Value, ir.Value | None] | None = None,
) -> ir.Node:
    """Replace ``node`` (an embedding Gather) by ``GatherBlockQuantized`` reading ``bq``.

    Args:
        graph: the graph holding ``node``.
        node: the Gather.
        bq: the table ``[V, D]`` quantized along D.
        shared: ``(B, scales, zero_points)`` initializers of a ``MatMulNBits`` holding the same matrix
            (``B`` of shape ``[V, n_blocks, blob]``): the Gather reads them through a Reshape of B
            instead of storing its own copy. Requires D to be a multiple of the block size.
    """
    rows, d = bq.q.shape[0], bq.k
    base = node.inputs[0].name or node.name or "embedding"
    if shared is not None:
        b_value, scales_value, zp_value = shared
        shape_value = ir.Value(
            name=f"{base}_gbq_shape", const_value=ir.tensor(np.array([rows, -1], np.int64))
        )
        graph.register_initializer(shape_value)
        reshape = ir.node("Reshape", [b_value, shape_value], name=f"{node.name or base}_gbq_data")
        graph.insert_before(node, reshape)
        data_value = reshape.outputs[0]
        data_value.name = f"{base}_gbq_data"
    else:
        codes = bq.q[:, :d]
        data_value, scales_value, zp_value = block_initializers(
            graph, base, _pack_rows(codes, bq.bits), bq.scales, bq.packed_zero_points(), bq.bits
        )
    inputs = [data_value, node.inputs[1], scales_value]
    if zp_value is not None:
        inputs.append(zp_value)
    new = ir.node(
        "GatherBlockQuantized",
        inputs,
        {"gather_axis": 0, "quantize_axis": 1, "block_size": bq.block_size, "bits": bq.bits},
        domain=MS_DOMAIN,
        name=(node.name or base) + "_gbq",
    )
    graph.insert_before(node, new)
    swap_output(graph, node, new)
    return new


def share_gather(graph: ir.Graph, node: ir.Node, quantized: ir.Node) -> ir.Node:
    """Replace ``node``, a Gather of a table already replaced by ``quantized`` (a ``GatherBlockQuantized``),
    by one reading the same quantized initializers: a shared table is stored once."""
    inputs = [quantized.inputs[0], node.inputs[1], *quantized.inputs[2:]]
    attrs = {k: a.value for k, a in quantized.attributes.items()}
    new = ir.node("GatherBlockQuantized", inputs, attrs, domain=MS_DOMAIN, name=(node.name or "Gather") + "_gbq")
    graph.insert_before(node, new)
    swap_output(graph, node, new)
    return new


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    from ortq.passes._int4 import pack

    return pack(codes, bits)


def swap_output(graph: ir.Graph, old: ir.Node, new: ir.Node, old_output: ir.Value | None = None) -> None:
    """Move every use of ``old``'s output (or ``old_output``) to ``new``'s first output, keep its name, and
    remove ``old`` together with initializers nobody reads any more."""
    out = old_output if old_output is not None else old.outputs[0]
    name = out.name
    new_out = new.outputs[0]
    new_out.type = out.type
    new_out.shape = out.shape
    out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    out.name = None
    new_out.name = name
    graph.remove(old, safe=True)

