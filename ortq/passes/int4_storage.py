"""int4 weight storage for static int8 models (W4A8): the file holds 4-bit block-quantized weights, the
CPU runs the int8 kernels.

``MatMulNBits`` is the fast path for one token at a time, but for encoders (hundreds of rows per MatMul)
ONNX Runtime's int8 GEMM is faster than its int4 kernel and than fp32. Here each weight is stored as packed
4-bit codes with per-block scales and zero points, followed by a small unpacking subgraph of plain ONNX ops
(BitShift, Sub, Cast, Mul, Reshape, Transpose) and a per-channel ``QuantizeLinear``. Every input of that
subgraph is a constant, so ONNX Runtime folds it once at session creation into the int8 weight that its
QDQ fusion turns into ``MatMulIntegerToFloat``: the model is as small as int4 and as fast as int8.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from ortq.passes._int4 import BlockQuantized, pack, quantize_gptq, quantize_rtn
from ortq.passes.base import ReportingPass
from ortq.passes.initializers import add_initializer
from ortq.passes.plan import QuantPlan

logger = logging.getLogger(__name__)


def int4_weights(
    weights: dict[str, np.ndarray],
    *,
    block_size: int,
    hessians: dict[str, np.ndarray] | None = None,
) -> dict[str, BlockQuantized]:
    """4-bit codes of each ``[K, N]`` weight, quantized along K (GPTQ with a Hessian, else RTN)."""
    out = {}
    for name, w in weights.items():
        w_t = np.ascontiguousarray(w.T.astype(np.float32))  # [N, K]: blocks run along K
        h = (hessians or {}).get(name)
        if h is not None:
            out[name] = quantize_gptq(w_t, h, bits=4, block_size=block_size)
        else:
            out[name] = quantize_rtn(w_t, bits=4, block_size=block_size)
    return out


def unpack_nodes(graph: ir.Graph, base: str, bq: BlockQuantized) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing the float ``[K, N]`` weight from ``bq``'s packed codes; returns them and the output."""
    rows, nb, bs, k = bq.q.shape[0], bq.n_blocks, bq.block_size, bq.k
    packed = pack(bq.q, 4)  # [N, nb * bs / 2], low nibble first
    zp = bq.zero_points if bq.zero_points is not None else np.full((rows, nb), 8, np.uint8)
    c = {
        "packed": add_initializer(graph, f"{base}_int4", packed),
        "four": add_initializer(graph, f"{base}_int4_shift", np.array(4, np.uint8)),
        "axis": add_initializer(graph, f"{base}_int4_axis", np.array([2], np.int64)),
        "shape3": add_initializer(graph, f"{base}_int4_blocks", np.array([rows, nb, bs], np.int64)),
        "shape2": add_initializer(graph, f"{base}_int4_rows", np.array([rows, nb * bs], np.int64)),
        "scales": add_initializer(graph, f"{base}_int4_scales", bq.scales.reshape(rows, nb, 1).astype(np.float32)),
        "zp": add_initializer(graph, f"{base}_int4_zero_points", zp.reshape(rows, nb, 1).astype(np.float32)),
    }
    nodes = []

    def add(op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        node = ir.node(op, inputs, attrs or None, name=f"{base}_int4_{op}_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    hi = add("BitShift", [c["packed"], c["four"]], direction="RIGHT")
    lo = add("Sub", [c["packed"], add("BitShift", [hi, c["four"]], direction="LEFT")])
    pairs = add("Concat", [add("Unsqueeze", [lo, c["axis"]]), add("Unsqueeze", [hi, c["axis"]])], axis=2)
    codes = add("Reshape", [add("Cast", [pairs], to=ir.DataType.FLOAT.value), c["shape3"]])
    w = add("Reshape", [add("Mul", [add("Sub", [codes, c["zp"]]), c["scales"]]), c["shape2"]])
    if nb * bs != k:
        starts = add_initializer(graph, f"{base}_int4_start", np.array([0], np.int64))
        ends = add_initializer(graph, f"{base}_int4_end", np.array([k], np.int64))
        axes = add_initializer(graph, f"{base}_int4_slice_axis", np.array([1], np.int64))
        w = add("Slice", [w, starts, ends, axes])
    w_kn = add("Transpose", [w], perm=[1, 0])
    return nodes, w_kn


def int4_targets(model: ir.Model, plan: QuantPlan) -> dict[str, str]:
    """The MatMul weights ``plan`` quantizes per output channel (axis 1, 2-D) -> the activation each multiplies:
    the weights int4 storage applies to."""
    nodes = {n.name: n for n in model.graph}
    targets: dict[str, str] = {}
    for name in plan.quantized_nodes:
        node = nodes[name]
        w = node.inputs[1] if node.op_type == "MatMul" else None
        qp = plan.weights.get(w.name) if w is not None else None
        if qp is not None and qp.axis == 1 and len(w.const_value.shape) == 2 and w.name not in targets:
            targets[w.name] = node.inputs[0].name
    return targets


class Int4StoragePass(ReportingPass):
    """W4A8: replace each :func:`int4_targets` weight of ``plan`` by its 4-bit values (GPTQ where a Hessian
    of its activation is given, else RTN) and keep the codes in ``self.codes`` for :class:`InsertQDQPass`.

    The float weights are replaced by their dequantized 4-bit values so that the int8 scales planned
    afterwards are computed from what the file stores: plan again on the rewritten model.

    Args:
        plan: the plan of the float model (which weights are quantized per channel).
        block_size: 4-bit block length along K.
        hessians: ``X^T X`` per activation name (from :mod:`ortq.calibrators.activations`), or None.
    """

    report_key = "int4_storage"

    def __init__(self, plan: QuantPlan, *, block_size: int, hessians: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        self.plan = plan
        self.block_size = block_size
        self.hessians = hessians
        self.codes: dict[str, BlockQuantized] = {}

    def rewrite(self, model: ir.Model) -> bool:
        targets = int4_targets(model, self.plan)
        self.codes = {}
        if not targets:
            self.report = {"weights": 0}
            return False
        by_weight = None
        if self.hessians is not None:
            by_weight = {w: self.hessians[a] for w, a in targets.items() if a in self.hessians}
        values = {v.name: v for v in model.graph.initializers.values()}
        self.codes = int4_weights(
            {w: values[w].const_value.numpy() for w in targets}, block_size=self.block_size, hessians=by_weight
        )
        for name, bq in self.codes.items():
            values[name].const_value = ir.tensor(np.ascontiguousarray(bq.dequantize().T), name=name)
        algorithm = "GPTQ" if by_weight else "RTN"
        logger.info("int4 storage for %d weights (%s)", len(self.codes), algorithm)
        self.report = {"weights": len(self.codes), "algorithm": algorithm.lower(), "block_size": self.block_size}
        return True
