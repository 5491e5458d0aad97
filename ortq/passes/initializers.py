"""Initializer helpers shared by the rewrite passes: typed constants, unique names, dropping dead weights."""

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
