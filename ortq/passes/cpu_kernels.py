"""Steer ONNX Runtime's CPU EP away from a fused kernel that is slower than the ops it replaces.

ONNX Runtime fuses ``Add -> LayerNormalization`` (a transformer's residual connection) into
``com.microsoft.SkipLayerNormalization``. On some builds that CPU kernel is several times slower than the
two ops it replaces (ONNX Runtime 1.31 at 2 threads: 0.88 ms vs 0.11 ms for [16, 65, 384]), and in a
quantized encoder the residual blocks then cost as much as a third of the int8 MatMuls. The fusion matches
the ``Add`` op type only, so writing the residual as ``Sum`` (the same function) keeps the two fast kernels.

The rewrite is decided by measuring both forms on this machine at the model's hidden size, never assumed:
where the fused kernel is not slower, the graph is left as it is.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import onnx
import onnx_ir as ir

from ortq.passes.base import ReportingPass
from ortq.runtime import SessionSettings, create_session

logger = logging.getLogger(__name__)

# Rewrite only when the fused kernel is at least this much slower.
SLOWDOWN_THRESHOLD = 1.3


def residual_adds(model: ir.Model) -> list[ir.Node]:
    """``Add`` nodes whose only consumer is a ``LayerNormalization`` and whose inputs are both computed."""
    found = []
    for node in model.graph:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            continue
        consumer = uses[0].node
        if consumer.op_type != "LayerNormalization" or uses[0].idx != 0:
            continue
        if any(v is None or v.const_value is not None for v in node.inputs):
            continue  # a bias add, not a residual
        found.append(node)
    return found


def _hidden_size(node: ir.Node) -> int | None:
    ln = next(iter(node.outputs[0].uses())).node
    scale = ln.inputs[1] if len(ln.inputs) > 1 else None
    if scale is not None and scale.const_value is not None and len(scale.const_value.shape) == 1:
        return int(scale.const_value.shape[0])
    return None


def _timed(model_bytes: bytes, feeds: dict[str, np.ndarray], runs: int = 30) -> float:
    """Best wall time of ``runs`` runs of a synthetic probe model (2 threads, idle pools not spinning)."""
    sess = create_session(model_bytes, settings=SessionSettings(threads=2), what="the residual timing probe")
    for _ in range(3):
        sess.run(None, feeds)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=16)
def skip_layernorm_slowdown(hidden: int, tokens: int = 1024) -> float:
    """Time of the fused ``Add -> LayerNormalization`` over the time of the same ops kept apart (``Sum``)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [
        onnx.numpy_helper.from_array(rng.random(hidden, dtype=np.float32), "g"),
        onnx.numpy_helper.from_array(rng.random(hidden, dtype=np.float32), "b"),
    ]

    def model(op: str) -> bytes:
        nodes = [
            helper.make_node(op, ["x", "r"], ["s"]),
            helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-12),
        ]
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, tokens, hidden]) for n in ("x", "r", "y")]
        graph = helper.make_graph(nodes, "residual", io[:2], io[2:], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()

    feeds = {k: rng.random((1, tokens, hidden), dtype=np.float32) for k in ("x", "r")}
    try:
        fused = _timed(model("Add"), feeds)
        apart = _timed(model("Sum"), feeds)
    except Exception as exc:  # an ORT build without these kernels: leave graphs alone
        logger.debug("residual timing failed: %s", exc)
        return 1.0
    return fused / apart


def avoid_slow_skip_layernorm(model: ir.Model) -> dict[str, object]:
    """Rewrite residual ``Add`` -> ``Sum`` where the fused kernel measures slower here. Returns a summary."""
    adds = residual_adds(model)
    if not adds:
        return {"rewritten": 0}
    hidden = _hidden_size(adds[0]) or 768
    slowdown = skip_layernorm_slowdown(hidden)
    summary: dict[str, object] = {"residual_adds": len(adds), "hidden_size": hidden, "skiplayernorm_slowdown": slowdown}
    if slowdown < SLOWDOWN_THRESHOLD:
        summary["rewritten"] = 0
        return summary
    for node in adds:
        node.op_type = "Sum"
    summary["rewritten"] = len(adds)
    logger.info(
        "residual Add -> Sum on %d nodes: ONNX Runtime's fused SkipLayerNormalization measured %.1fx slower here",
        len(adds), slowdown,
    )
    return summary


class CpuKernelsPass(ReportingPass):
    """:func:`avoid_slow_skip_layernorm` as a pass; its summary is the report.

    The timing it decides by runs two synthetic probe models (not the model being rewritten), once per hidden
    size and process.
    """

    report_key = "cpu_kernels"

    def rewrite(self, model: ir.Model) -> bool:
        self.report = avoid_slow_skip_layernorm(model)
        return bool(self.report.get("rewritten"))
