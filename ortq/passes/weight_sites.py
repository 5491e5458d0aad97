"""The weights the weight-only pass quantizes: ``MatMul`` / ``Gemm`` nodes with a constant 2-D float32
weight and embedding ``Gather`` tables, found without holding their values.

A :class:`MatMulSite` reads its weight from the initializer each time it is asked for it; a weight mapped from
an external data file is unmapped once checked or quantized (:func:`~ortq.passes.initializers.unmap`), so a
model over 2 GB is never resident whole in the process: its pages come and go layer by layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ortq.config import WeightOnlyConfig
from ortq.io import unmap
from ortq.passes.gather_quant import gather_table

MIN_EMBEDDING_ELEMENTS = 1 << 18  # smaller tables (positions, token types) stay in float
_PASSTHROUGH = {"Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze"}


@dataclass
class MatMulSite:
    """A MatMul (or Gemm) with a constant weight. The weight is read from its initializer when needed, not
    held: one mapped from an external data file is unmapped (:meth:`release`) once read, so that a model over
    2 GB is never resident whole."""

    node: ir.Node
    weight: ir.Value  # [K, N] initializer ([N, K] for a Gemm with transB)
    shape: tuple[int, int]  # (K, N)
    transposed: bool = False  # the initializer holds W^T (Gemm transB)
    bias_add: ir.Node | None = None
    bias: np.ndarray | None = None
    tied_gather: list[ir.Node] = field(default_factory=list)
    bits: int = 4
    why_bits: str = ""

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name or "MatMul"

    def w_t(self) -> np.ndarray:
        """The weight transposed, ``[N, K]`` contiguous: the layout MatMulNBits stores."""
        a = self.weight.const_value.numpy()
        return a if self.transposed else np.ascontiguousarray(a.T)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4

    def release(self) -> None:
        unmap([self.weight])


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _const_initializer(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer() or value.is_graph_input():
        return None
    return value.const_value.numpy()


def reaches_graph_output(value: ir.Value, depth: int = 3) -> bool:
    if value.is_graph_output():
        return True
    if depth == 0:
        return False
    for use in value.uses():
        n = use.node
        if n.op_type in _PASSTHROUGH or n.op_type == "Add":
            if reaches_graph_output(n.outputs[0], depth - 1):
                return True
    return False


def _bias_add(node: ir.Node, n: int) -> tuple[ir.Node | None, np.ndarray | None]:
    """The ``Add`` of a constant ``[N]`` bias that alone consumes ``node``'s output, if any."""
    out = node.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1 - uses[0].idx]
    b = _const_initializer(other)
    if b is None or b.dtype != np.float32 or b.shape != (n,):
        return None, None
    return add, b


def find_sites(graph: ir.Graph, config: WeightOnlyConfig, skipped: dict[str, str]):
    sites: list[MatMulSite] = []
    gathers: list[tuple[ir.Node, np.ndarray]] = []
    for node in graph:
        name = node.name or (node.outputs[0].name if node.outputs else "")
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            if matches(name, config.nodes_to_exclude):
                skipped[name] = "excluded by nodes_to_exclude"
                continue
            tensor = _const_tensor(node.inputs[1])
            if tensor is None:
                continue  # activation x activation: not a weight
            dtype, shape = tensor.dtype.numpy(), tuple(tensor.shape.numpy())
            if dtype != np.float32:
                skipped[name] = f"weight dtype {dtype} is not float32"
                continue
            if len(shape) != 2:
                skipped[name] = f"weight is {len(shape)}-D, not 2-D"
                continue
            a = node.inputs[0]
            if a is not None and a.shape is not None and len(a.shape) < 2:
                skipped[name] = "input A is 1-D"
                continue
            if shape[0] < 16:
                skipped[name] = f"K={shape[0]} < 16"
                continue
            if not _all_finite(node.inputs[1]):
                skipped[name] = "weight holds NaN or infinite values"
                continue
            site = MatMulSite(node=node, weight=node.inputs[1], shape=shape)
            site.bias_add, site.bias = _bias_add(node, shape[1])
            sites.append(site)
        elif node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
            site = _gemm_site(node, name, config, skipped)
            if site is not None:
                sites.append(site)
        elif node.op_type == "Gather" and node.domain in ("", "ai.onnx") and config.quantize_embeddings:
            table, why = gather_table(node)
            if table is None:
                if why not in ("data is not a constant initializer",):
                    skipped[name] = why
                continue
            shape, size = table.shape, table.size
            del table  # read again when quantized
            if matches(name, config.nodes_to_exclude):
                skipped[name] = "excluded by nodes_to_exclude"
                continue
            if size < MIN_EMBEDDING_ELEMENTS:
                skipped[name] = f"embedding table {list(shape)} is small (< {MIN_EMBEDDING_ELEMENTS} values)"
                continue
            if not _all_finite(node.inputs[0]):
                skipped[name] = "embedding table holds NaN or infinite values"
                continue
            gathers.append(node)
    return sites, gathers


def _const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of a constant initializer (not read: a mapped one stays unmapped), else None."""
    if value is None or value.const_value is None or not value.is_initializer() or value.is_graph_input():
        return None
    return value.const_value


def _all_finite(value: ir.Value, rows: int = 1 << 22) -> bool:
    """Whether an initializer holds only finite values, read in chunks of ``rows`` values and unmapped after."""
    a = value.const_value.numpy()
    flat = a.reshape(-1)
    ok = all(np.isfinite(flat[i:i + rows]).all() for i in range(0, flat.size, rows))
    del a, flat
    unmap([value])
    return ok


def _gemm_site(node: ir.Node, name: str, config: WeightOnlyConfig, skipped: dict[str, str]) -> MatMulSite | None:
    """A Gemm ``A @ op(B) + C`` with a constant B as a MatMulNBits site (B transposed when ``transB``; the
    bias C becomes MatMulNBits' bias input), or None with the reason in ``skipped``."""

    def attr(key: str, default: float) -> float:
        a = node.attributes.get(key)
        return default if a is None else (a.as_float() if key in ("alpha", "beta") else a.as_int())

    b = _const_tensor(node.inputs[1])
    if b is None:
        return None  # activation x activation
    why = None
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = _const_initializer(c) if c is not None else None
    dtype, b_shape = b.dtype.numpy(), tuple(b.shape.numpy())
    if matches(name, config.nodes_to_exclude):
        why = "excluded by nodes_to_exclude"
    elif attr("transA", 0) or attr("alpha", 1.0) != 1.0:
        why = "Gemm with transA or alpha != 1 has no MatMulNBits form"
    elif dtype != np.float32 or len(b_shape) != 2:
        why = f"weight is {dtype} {len(b_shape)}-D, not 2-D float32"
    elif c is not None and (bias is None or bias.dtype != np.float32 or attr("beta", 1.0) != 1.0):
        why = "bias is not a constant float32 with beta 1"
    transposed = bool(attr("transB", 0))
    if why is None:
        shape = (b_shape[1], b_shape[0]) if transposed else b_shape
        if bias is not None and bias.shape != (shape[1],):
            why = f"bias shape {list(bias.shape)} is not [N]"
        elif shape[0] < 16:
            why = f"K={shape[0]} < 16"
        elif not _all_finite(node.inputs[1]):
            why = "weight holds NaN or infinite values"
    if why is not None:
        skipped[name] = why
        return None
    return MatMulSite(node=node, weight=node.inputs[1], shape=shape, transposed=transposed, bias=bias)


def tied_table(table: ir.Value, site: MatMulSite, rows: int = 4096) -> bool:
    """Whether the embedding table ``[N, K]`` equals ``site``'s weight transposed, compared by row chunks (no
    transposed copy of the whole matrix); both are unmapped after."""
    t = table.const_value.numpy()
    w = site.weight.const_value.numpy()
    n = t.shape[0]
    if site.transposed:
        same = all(np.array_equal(t[i:i + rows], w[i:i + rows]) for i in range(0, n, rows))
    else:
        same = all(np.array_equal(t[i:i + rows], w[:, i:i + rows].T) for i in range(0, n, rows))
    del t, w
    unmap([table, site.weight])
    return same
