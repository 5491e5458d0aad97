"""SmoothQuant: move activation outliers into the weights before int8 quantization.

For an activation ``X`` (channels last) feeding MatMuls with constant weights ``W`` ([K, N]), per input
channel ``j``::

    s_j = max|X_j| ** alpha / max_n |W_jn| ** (1 - alpha)
    X' = X / s        W' = diag(s) W          X' W' == X W

``X / s`` is folded into the producing ``LayerNormalization`` (scale and bias divided by ``s``) when every
consumer of ``X`` is such a MatMul (pre-LN transformers); otherwise (post-LN BERT, where ``X`` also feeds the
residual) one ``Mul`` by ``1 / s`` is inserted on the MatMul branch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ortq.io import computed_on_read, unmap
from ortq.passes.base import ReportingPass
from ortq.passes.initializers import add_initializer
from ortq.passes.plan import ensure_node_names

logger = logging.getLogger(__name__)


@dataclass
class SmoothGroup:
    """One activation and the MatMul consumers that share its smoothing scales."""

    activation: str
    matmuls: list[str]
    folded_into: str | None  # the LayerNormalization node, or None when a Mul is inserted


def smooth_groups(model: ir.Model, quantized_nodes: set[str] | None = None) -> list[SmoothGroup]:
    """Activations fed to MatMuls whose weights are constant [K, N] matrices."""
    ensure_node_names(model.graph)
    groups: dict[str, SmoothGroup] = {}
    for node in model.graph:
        if node.op_type != "MatMul" or (quantized_nodes is not None and node.name not in quantized_nodes):
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None or w.const_value is None or len(w.const_value.shape) != 2:
            continue
        if w.const_value.dtype != ir.DataType.FLOAT or (x.dtype is not None and x.dtype != ir.DataType.FLOAT):
            continue  # float32 scales: integer and float16 MatMuls are left alone
        finite = bool(np.isfinite(w.const_value.numpy()).all())
        unmap([w])  # read again when smoothed: a model over 2 GB is not kept resident meanwhile
        if not finite:
            continue  # a NaN / inf weight would spread through the scales to every output column
        producer = x.producer()
        if producer is None:
            continue
        group = groups.setdefault(x.name, SmoothGroup(x.name, [], None))
        group.matmuls.append(node.name)
    values = {v.name: v for n in model.graph for v in n.outputs}
    for group in groups.values():
        x = values[group.activation]
        producer = x.producer()
        consumers = {use.node.name for use in x.uses()}
        ln_ok = (
            producer.op_type == "LayerNormalization"
            and consumers <= set(group.matmuls)
            and not x.is_graph_output()
            and producer.inputs[1] is not None
            and producer.inputs[1].const_value is not None
            and len(producer.inputs[1].uses()) == 1
            and (len(producer.inputs) < 3 or producer.inputs[2] is None or len(producer.inputs[2].uses()) == 1)
        )
        if ln_ok:
            group.folded_into = producer.name
    return list(groups.values())


def _fake_quant(x: np.ndarray, axis: int | None, symmetric: bool, qmax: int) -> np.ndarray:
    """Quantize-dequantize ``x``: per tensor (asymmetric, 8-bit) or per channel along ``axis`` (symmetric)."""
    if symmetric:
        red = tuple(i for i in range(x.ndim) if i != axis) if axis is not None else None
        absmax = np.abs(x).max(axis=red, keepdims=True)
        scale = np.where(absmax > 0, absmax / qmax, 1.0)
        return np.clip(np.round(x / scale), -qmax, qmax) * scale
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zp = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale


ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _fake_quant_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """Quantize-dequantize ``w [K, N]`` with asymmetric 4-bit blocks of ``block_size`` along K."""
    k, n = w.shape
    pad = (-k) % block_size
    wp = np.pad(w, ((0, pad), (0, 0)))
    blocks = wp.reshape(-1, block_size, n)
    lo = np.minimum(blocks.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(blocks.max(axis=1, keepdims=True), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0)
    zp = np.round(-lo / scale)
    q = np.clip(np.round(blocks / scale) + zp, 0, 15)
    return ((q - zp) * scale).reshape(-1, n)[:k]


def search_alpha(
    rows: np.ndarray,
    weights: list[np.ndarray],
    absmax: np.ndarray,
    alphas: Iterable[float] = ALPHAS,
    *,
    weight_block_size: int | None = None,
) -> tuple[float | None, dict[str, float]]:
    """The alpha whose smoothed int8 MatMuls best reproduce ``rows @ W`` for every consumer ``W``.

    Weights are simulated as per-channel int8, or as 4-bit blocks of ``weight_block_size`` (int4 storage).
    Returns ``(None, errors)`` when no smoothing is best. Errors are relative squared errors of the
    MatMul outputs, summed over consumers.
    """
    w_cat = np.concatenate(weights, axis=1).astype(np.float32)
    ref = rows @ w_cat
    denom = float(np.sum(ref.astype(np.float64) ** 2)) or 1.0

    def error(s: np.ndarray | None) -> float:
        x = rows if s is None else rows / s
        w = w_cat if s is None else w_cat * s[:, None]
        wq = _fake_quant_blocks(w, weight_block_size) if weight_block_size else _fake_quant(w, 1, True, 127)
        out = _fake_quant(x, None, False, 255) @ wq
        return float(np.sum((out - ref).astype(np.float64) ** 2)) / denom

    errors = {"none": error(None)}
    best, best_err = None, errors["none"]
    for alpha in alphas:
        e = error(smoothing_scales(absmax, weights, alpha))
        errors[f"{alpha:.2f}"] = e
        if e < best_err:
            best, best_err = alpha, e
    return best, errors


def smoothing_scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = a_j^alpha / w_j^(1-alpha)``, with w_j the max over all consumers' row j; 1 where undefined."""
    w_absmax = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0)
    a = np.maximum(act_absmax.astype(np.float64), 1e-5)
    w = np.maximum(w_absmax.astype(np.float64), 1e-5)
    s = a**alpha / w ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def apply_smoothing(
    model: ir.Model,
    groups: list[SmoothGroup],
    absmax: dict[str, np.ndarray],
    alpha: float | dict[str, float],
) -> dict[str, dict[str, float]]:
    """Fold SmoothQuant scales into ``model`` in place; returns per-activation summary for the report.

    ``alpha`` is one strength for every group, or a strength per activation name (groups missing from the
    dict are left alone).
    """
    nodes = {n.name: n for n in model.graph}
    summary: dict[str, dict[str, float]] = {}
    for group in groups:
        group_alpha = alpha.get(group.activation) if isinstance(alpha, dict) else alpha
        if group.activation not in absmax or group_alpha is None:
            continue
        matmuls = [nodes[m] for m in group.matmuls]
        sources = [m.inputs[1] for m in matmuls]
        weights = [v.const_value.numpy() for v in sources]
        if len({w.shape[0] for w in weights}) != 1 or weights[0].shape[0] != absmax[group.activation].shape[0]:
            continue
        s = smoothing_scales(absmax[group.activation], weights, group_alpha)
        del weights
        unmap(sources)
        for m, source in zip(matmuls, sources):
            _set_const(model.graph, m, 1, _scaled_rows(source.const_value, s), suffix="smoothed")
        if group.folded_into is not None:
            ln = nodes[group.folded_into]
            for idx in (1, 2):
                if idx < len(ln.inputs) and ln.inputs[idx] is not None:
                    p = ln.inputs[idx].const_value.numpy()
                    _set_const(model.graph, ln, idx, (p / s).astype(p.dtype), suffix="smoothed")
        else:
            x = matmuls[0].inputs[0]
            inv = add_initializer(model.graph, f"{group.activation}_smooth_inv", (1.0 / s).astype(np.float32))
            mul = ir.node("Mul", [x, inv], name=f"{group.activation}_SmoothQuant_Mul")
            mul.outputs[0].name = f"{group.activation}_smoothed"
            if x.dtype is not None:
                mul.outputs[0].dtype = x.dtype
            if x.shape is not None:
                mul.outputs[0].shape = x.shape
            model.graph.insert_after(x.producer(), [mul])
            for m in matmuls:
                m.replace_input_with(0, mul.outputs[0])
        summary[group.activation] = {
            "alpha": group_alpha,
            "scale_min": float(s.min()),
            "scale_max": float(s.max()),
            "folded": group.folded_into is not None,
        }
    return summary


def _scaled_rows(weight: ir.TensorProtocol, s: np.ndarray) -> np.ndarray | ir.LazyTensor:
    """``diag(s) W``. A weight mapped from an external data file gives a tensor computed on each read (from
    the source, unmapped after): the smoothed model then holds no copy of the weights, whatever their size."""
    def scaled(w: np.ndarray) -> np.ndarray:
        return (w * s[:, None]).astype(w.dtype)

    if not isinstance(weight, ir.ExternalTensor):
        return scaled(weight.numpy())
    return computed_on_read([weight], scaled, list(weight.shape))


def _set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray | ir.TensorProtocol,
               suffix: str) -> None:
    old = node.inputs[index]
    name = f"{old.name}_{suffix}"
    i = 1
    while name in graph.initializers:
        name = f"{old.name}_{suffix}_{i}"
        i += 1
    if isinstance(array, np.ndarray):
        new = add_initializer(graph, name, array)
    else:
        array.name = name
        new = ir.val(name, array.dtype, array.shape, const_value=array)
        graph.register_initializer(new)
    node.replace_input_with(index, new)
    if not old.uses() and old.name in graph.initializers and not old.is_graph_output():
        del graph.initializers[old.name]




class SmoothQuantPass(ReportingPass):
    """SmoothQuant on the float model, from activation statistics gathered beforehand.

    Args:
        alpha: one strength for every activation, or ``"auto"``: per activation, the strength (or none) whose
            int8 MatMuls best reproduce the float outputs on the sampled rows (:func:`search_alpha`).
        absmax: per-channel ``max |x|`` of each :func:`smooth_groups` activation.
        rows: sampled rows of each activation (needed by ``"auto"``).
        weight_block_size: simulate the weights as 4-bit blocks of this size in the search (int4 storage).

    Report: ``{"alpha": alpha, "activations": {name: {"alpha", "scale_min", "scale_max", "folded", ...}}}``.
    """

    report_key = "smooth_quant"

    def __init__(
        self,
        alpha: float | str,
        absmax: Mapping[str, np.ndarray],
        rows: Mapping[str, np.ndarray] | None = None,
        *,
        weight_block_size: int | None = None,
    ):
        super().__init__()
        self.alpha = alpha
        self.absmax = dict(absmax)
        self.rows = dict(rows or {})
        self.weight_block_size = weight_block_size

    def rewrite(self, model: ir.Model) -> bool:
        groups = smooth_groups(model)
        if not groups:
            logger.info("SmoothQuant: no MatMul with a constant weight to smooth")
            self.report = {"alpha": self.alpha, "activations": {}}
            return False
        if self.alpha == "auto":
            nodes = {n.name: n for n in model.graph}
            chosen: dict[str, float] = {}
            errors: dict[str, dict[str, float]] = {}
            for g in groups:
                if g.activation not in self.rows:
                    continue
                sources = [nodes[m].inputs[1] for m in g.matmuls]
                best, errs = search_alpha(
                    self.rows[g.activation], [v.const_value.numpy() for v in sources], self.absmax[g.activation],
                    weight_block_size=self.weight_block_size,
                )
                unmap(sources)
                errors[g.activation] = errs
                if best is not None:
                    chosen[g.activation] = best
            summary = apply_smoothing(model, groups, self.absmax, chosen)
            for name, errs in errors.items():
                entry = summary.setdefault(name, {"alpha": None})
                entry["relative_error_unsmoothed"] = errs["none"]
                entry["relative_error_chosen"] = min(errs.values())
        else:
            summary = apply_smoothing(model, groups, self.absmax, float(self.alpha))
        self.report = {"alpha": self.alpha, "activations": summary}
        smoothed = sum(1 for v in summary.values() if v.get("alpha") is not None)
        logger.info("SmoothQuant (alpha %s) on %d of %d activations", self.alpha, smoothed, len(groups))
        return smoothed > 0
