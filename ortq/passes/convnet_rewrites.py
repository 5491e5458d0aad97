"""Exact rewrites of convnet graphs before planning, for the int8 kernels ONNX Runtime has.

**A zero ``Pad`` in front of a ``Conv`` folds into the convolution's own ``pads``.** TensorFlow-style "same" padding (Hugging Face's MobileNet with ``tf_padding``, tf2onnx graphs, CREPE) exports
as ``Pad -> Conv``. Quantized as it stands, the Pad sits between two int8 kernels as ``DQ -> Pad -> Q -> DQ ->
Conv``: ONNX Runtime keeps that QuantizeLinear / DequantizeLinear pair in float around every convolution (its
own ``PadFusion`` runs only on float graphs). A constant-mode Pad of zeros that pads only the spatial axes is
the convolution's zero padding, so it folds exactly: the Conv reads the Pad's input with the amounts added to
its ``pads``. Pads computed from constants (a ``ConstantOfShape -> Concat -> Slice`` chain) are evaluated with
``onnx.reference``; the constant chain left unused is removed.

**An ``AveragePool`` whose window covers the whole input becomes ``GlobalAveragePool``.** PyTorch's
``AvgPool2d(k, ceil_mode=True)`` with ``k`` above the feature map (Hugging Face's EfficientNet pooler, ``k`` =
1280) exports as such a pool with ``count_include_pad=1``. The float kernel divides by the part of the window
inside the input (a mean), but ``QLinearAveragePool`` divides by the whole ``k x k`` window: the int8 pool
returns zeros and every logit after it is zero. The global pool is the same mean and has an int8 kernel that
gets it right.

**Hardswish and Hardsigmoid after a convolution become ``Add -> Clip -> Mul``.** ONNX Runtime has no int8
kernel for either: they ran in float between DequantizeLinear / QuantizeLinear, with layout transposes around
them (MobileNetV3). ``HardSigmoid(x) = Clip(x + beta/alpha, 0, 1/alpha) * alpha`` and ``HardSwish(x) = x *
HardSigmoid(x)`` (alpha 1/6, beta 1/2): the Add is a ``QLinearAdd`` with a constant, the Clip folds into its
QuantizeLinear, the Mul by ``alpha`` is a change of scale with no kernel (:mod:`ortq.passes.int8_graph`) and
the product a ``QLinearMul``. Only activations a Conv feeds are rewritten (elsewhere the single float op is
faster).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

# auto_pad values under which a Conv's padding is its ``pads`` attribute (VALID: none at all).
_EXPLICIT = (None, b"NOTSET", "NOTSET", b"VALID", "VALID")

__all__ = ["decompose_hard_activations", "fold_pads_into_convs", "global_average_pools", "rewrite_convnet"]


def _constant_value(name: str, graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto],
                    inits: dict[str, onnx.TensorProto], opset: int) -> np.ndarray | None:
    """The value of ``name`` when it depends on initializers only (evaluated with ``onnx.reference``)."""
    if name in inits:
        try:
            return numpy_helper.to_array(inits[name])
        except Exception:  # stored outside the proto: not a small pads vector
            return None
    nodes: dict[int, onnx.NodeProto] = {}
    used: set[str] = set()
    stack = [name]
    while stack:
        v = stack.pop()
        if not v or v in used:
            continue
        used.add(v)
        if v in inits:
            continue
        node = producers.get(v)
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type in ("If", "Loop", "Scan"):
            return None  # a graph input or something we will not evaluate
        if len(nodes) > 64:
            return None
        nodes[id(node)] = node
        stack.extend(node.input)
    order = [n for n in graph.node if id(n) in nodes]
    sub = helper.make_graph(order, "pads", [], [helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)],
                            initializer=[inits[v] for v in sorted(used) if v in inits])
    try:
        from onnx.reference import ReferenceEvaluator

        model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", opset)])
        return np.asarray(ReferenceEvaluator(model).run(None, {})[0])
    except Exception as exc:  # an op the reference evaluator lacks: leave the Pad alone
        logger.debug("pads %s not evaluated: %s", name, exc)
        return None


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _spatial_pads(node: onnx.NodeProto, graph: onnx.GraphProto, producers, inits, opset: int) -> list[int] | None:
    """The spatial pads ``[x1_begin, x2_begin, ..., x1_end, ...]`` of a zero constant-mode Pad that leaves the
    batch and channel axes alone, or None."""
    mode = _attr(node, "mode")
    if mode not in (None, b"constant", "constant"):
        return None
    if len(node.input) > 3 and node.input[3]:
        return None  # explicit axes (opset 18): not handled
    if len(node.input) > 1:
        pads = _constant_value(node.input[1], graph, producers, inits, opset)
        value = (_constant_value(node.input[2], graph, producers, inits, opset)
                 if len(node.input) > 2 and node.input[2] else 0)
    else:
        pads, value = _attr(node, "pads"), _attr(node, "value") or 0.0
    if pads is None or value is None or np.any(np.asarray(value) != 0):
        return None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    rank = len(pads) // 2
    if rank < 3 or len(pads) != 2 * rank or any(p < 0 for p in pads):
        return None
    begin, end = pads[:rank], pads[rank:]
    if begin[:2] != [0, 0] or end[:2] != [0, 0]:
        return None
    return begin[2:] + end[2:]


def fold_pads_into_convs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold every zero Pad whose only consumers are Convs (input 0, explicit padding) into their ``pads``.

    Returns the model (a copy when something changed) and the number of Pads folded.
    """
    graph = model.graph
    if not any(n.op_type == "Pad" for n in graph.node):
        return model, 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for v in n.input:
            consumers.setdefault(v, []).append(n)
    outputs = {o.name for o in graph.output}
    folded = []
    for pad in list(graph.node):
        if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx") or pad.output[0] in outputs:
            continue
        users = consumers.get(pad.output[0], [])
        if not users or any(u.op_type != "Conv" or u.domain not in ("", "ai.onnx") or list(u.input).count(pad.output[0]) != 1
                            or u.input[0] != pad.output[0] or _attr(u, "auto_pad") not in _EXPLICIT
                            for u in users):
            continue
        spatial = _spatial_pads(pad, graph, producers, inits, opset)
        if spatial is None:
            continue
        n = len(spatial) // 2
        for conv in users:
            old = [0] * (2 * n) if _attr(conv, "auto_pad") in (b"VALID", "VALID") else _attr(conv, "pads") or [0] * (2 * n)
            kernel = _attr(conv, "kernel_shape")
            if len(old) != 2 * n or (kernel is not None and len(kernel) != n):
                break
        else:
            for conv in users:
                valid = _attr(conv, "auto_pad") in (b"VALID", "VALID")
                old = [0] * (2 * n) if valid else list(_attr(conv, "pads") or [0] * (2 * n))
                new = [a + b for a, b in zip(old, spatial)]
                kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
                del conv.attribute[:]
                conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
                conv.input[0] = pad.input[0]
            folded.append(pad)
    if not folded:
        return model, 0
    for pad in folded:
        graph.node.remove(pad)
    if not any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):  # subgraphs read outer names implicitly
        _drop_dead(graph)
    logger.info("%d Pad nodes folded into their convolutions", len(folded))
    return model, len(folded)


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes (and initializers) nothing reads any more, such as the constant chains of folded pads."""
    keep = {o.name for o in graph.output}
    alive = []
    for node in reversed(graph.node):
        if any(o in keep for o in node.output):
            alive.append(node)
            keep.update(node.input)
    alive.reverse()
    if len(alive) != len(graph.node):
        del graph.node[:]
        graph.node.extend(alive)
    used = {v for n in graph.node for v in n.input} | {o.name for o in graph.output}
    used |= {i.name for i in graph.input}  # an initializer that is also an input stays a default
    dead = [t for t in graph.initializer if t.name not in used]
    for t in dead:
        graph.initializer.remove(t)


def _pool_covers_input(node: onnx.NodeProto, dims: list) -> bool:
    """Whether an AveragePool with zero pads has one output position per axis whose window holds the whole
    input (static spatial ``dims``)."""
    kernel = _attr(node, "kernel_shape")
    if kernel is None or len(dims) != len(kernel) or not all(isinstance(d, int) and d > 0 for d in dims):
        return False
    if any(p != 0 for p in _attr(node, "pads") or []) or _attr(node, "auto_pad") not in (None, b"NOTSET", "NOTSET"):
        return False
    if any(d != 1 for d in _attr(node, "dilations") or []):
        return False
    strides = _attr(node, "strides") or [1] * len(kernel)
    ceil = bool(_attr(node, "ceil_mode") or 0)
    for d, k, s in zip(dims, kernel, strides):
        steps = (d - k) / s
        if k < d or (int(np.ceil(steps)) if ceil else int(np.floor(steps))) + 1 != 1:
            return False
    return True


def global_average_pools(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Turn every AveragePool whose single window covers its whole (static) input into GlobalAveragePool.

    Returns the model (a copy when something changed) and the number of pools rewritten.
    """
    pools = [i for i, n in enumerate(model.graph.node) if n.op_type == "AveragePool" and n.domain in ("", "ai.onnx")]
    if not pools:
        return model, 0
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # no shapes, no rewrite
        logger.debug("shape inference failed: %s", exc)
        return model, 0
    shapes = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    nodes = model.graph.node
    covering = [i for i in pools if len(shapes.get(nodes[i].input[0], [])) >= 3
                and _pool_covers_input(nodes[i], shapes[nodes[i].input[0]][2:])]
    if not covering:
        return model, 0
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for i in covering:
        node = model.graph.node[i]
        node.op_type = "GlobalAveragePool"
        del node.attribute[:]
    logger.info("%d AveragePool nodes over their whole input rewritten as GlobalAveragePool", len(covering))
    return model, len(covering)


def decompose_hard_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Write every HardSwish / HardSigmoid (alpha > 0) whose input a Conv computes as ``Add -> Clip -> Mul``
    (times its input for HardSwish). Returns the model (a copy when something changed) and the count."""
    graph = model.graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    hard = [i for i, n in enumerate(graph.node) if n.op_type in ("HardSwish", "HardSigmoid") and n.domain in ("", "ai.onnx")
            and producers.get(n.input[0]) == "Conv" and (_attr(n, "alpha") or 0.2) > 0]
    if not hard:
        return model, 0
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    names = {v for n in graph.node for v in (*n.input, *n.output)} | {t.name for t in graph.initializer}
    names |= {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        return name

    def const(base: str, value: float) -> str:
        name = fresh(base)
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    nodes = list(graph.node)
    for i in hard:
        node = nodes[i]
        swish = node.op_type == "HardSwish"
        alpha = 1 / 6 if swish else float(_attr(node, "alpha") or 0.2)
        beta = 0.5 if swish else float(_attr(node, "beta") if _attr(node, "beta") is not None else 0.5)
        base, x, y = node.name or node.output[0], node.input[0], node.output[0]
        shifted, clipped = fresh(f"{base}/shifted"), fresh(f"{base}/clipped")
        gate = fresh(f"{base}/gate") if swish else y
        new = [
            helper.make_node("Add", [x, const(f"{base}/shift", beta / alpha)], [shifted], name=fresh(f"{base}/Add")),
            helper.make_node("Clip", [shifted, const(f"{base}/min", 0.0), const(f"{base}/max", 1 / alpha)], [clipped],
                             name=fresh(f"{base}/Clip")),
            helper.make_node("Mul", [clipped, const(f"{base}/alpha", alpha)], [gate], name=fresh(f"{base}/Scale")),
        ]
        if swish:
            new.append(helper.make_node("Mul", [x, gate], [y], name=fresh(f"{base}/Mul")))
        nodes[i] = new
    del graph.node[:]
    graph.node.extend(n for item in nodes for n in (item if isinstance(item, list) else [item]))
    logger.info("%d Hardswish / Hardsigmoid nodes written as Add -> Clip -> Mul", len(hard))
    return model, len(hard)


def rewrite_convnet(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """All three rewrites; returns the model and ``{"folded_pads", "global_pools", "hard_activations"}``."""
    model, pads = fold_pads_into_convs(model)
    model, pools = global_average_pools(model)
    model, hard = decompose_hard_activations(model)
    return model, {"folded_pads": pads, "global_pools": pools, "hard_activations": hard}
