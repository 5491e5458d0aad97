"""Graph-edit helpers shared by the rewrite passes: typed constants, unique names, values by name, inserting
nodes after a value's producer, block-quantized weights, dropping dead weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a typed, shaped initializer called ``name`` and return its value."""
    value = ir.val(name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def unique_name(taken: set[str], base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first not in ``taken`` (which it is then added to)."""
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def drop_unused_initializers(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Remove the given initializers from ``graph`` when nothing reads them (graph inputs and outputs stay)."""
    for v in values:
        if v is None or not v.is_initializer() or v.uses() or v.is_graph_output() or v.is_graph_input():
            continue
        if v.name in graph.initializers and graph.initializers[v.name] is v:
            del graph.initializers[v.name]


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every value of ``graph`` (node inputs and outputs, graph inputs, initializers) by name."""
    values = {v.name: v for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
    values.update({v.name: v for v in graph.inputs})
    values.update(graph.initializers)
    return values


def insert_after_producer(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Insert ``nodes`` right after the node producing ``value`` (first in the graph for a graph input)."""
    producer = value.producer()
    if producer is None:
        graph.insert_before(graph.node(0), nodes)
    else:
        graph.insert_after(producer, nodes)


def float16_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """``array`` stored as a float16 initializer ``{name}_f16`` and read through a ``Cast`` to float32 at the
    top of the graph, called ``name``: half the bytes on disk; ONNX Runtime folds the constant Cast when the
    session is created, so kernels see a float32 initializer (exactly ``array`` when it is float16-exact)."""
    half = add_initializer(graph, f"{name}_f16", np.asarray(array).astype(np.float16))
    cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT}, name=f"{name}_cast")
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = name, ir.DataType.FLOAT, ir.Shape(np.shape(array))
    graph.insert_before(graph.node(0), cast)
    return out


def block_initializers(
    graph: ir.Graph, base: str, packed_codes: np.ndarray, scales: np.ndarray, packed_zero_points: np.ndarray | None,
    bits: int, *, float16_scales: bool = False,
) -> tuple[ir.Value, ir.Value, ir.Value | None]:
    """Register the codes, scales and (optional) zero points of a block-quantized weight as
    ``{base}_q{bits}``, ``{base}_scales`` and ``{base}_zero_points`` (the scales stored in float16 behind a
    Cast with ``float16_scales``, see :func:`float16_constant`)."""
    data = ir.Value(name=f"{base}_q{bits}", const_value=ir.tensor(packed_codes))
    graph.register_initializer(data)
    if float16_scales:
        scale = float16_constant(graph, f"{base}_scales", scales)
    else:
        scale = ir.Value(name=f"{base}_scales", const_value=ir.tensor(scales))
        graph.register_initializer(scale)
    zero = None
    if packed_zero_points is not None:
        zero = ir.Value(name=f"{base}_zero_points", const_value=ir.tensor(packed_zero_points))
        graph.register_initializer(zero)
    return data, scale, zero
