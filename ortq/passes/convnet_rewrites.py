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

**A ``BatchNormalization`` after a ``Conv`` folds into the convolution's weights and bias.** Graphs exported
from Paddle (PP-OCR), Keras or PyTorch in training mode keep ``Conv -> BatchNormalization``; ONNX Runtime folds
the pair only in a float graph. Quantized as it stands, the Conv's output is quantized before the per-channel
affine, the BatchNormalization runs in float between QuantizeLinear / DequantizeLinear pairs and no
``QLinearConv`` forms (PP-OCR's MobileNetV3 direction classifier: 0.55x fp32's speed, feature cosine 0.96).
``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = scale / sqrt(var + epsilon)`` per output channel is
the same function up to float rounding. A per-channel constant ``Add`` (Paddle's exported bias) or ``Mul``
(a normalisation written out) after a Conv folds the same way, and so does a BatchNormalization after a
one-group ``ConvTranspose`` (its weight's output channels are axis 1).

**Hardswish and Hardsigmoid after a convolution become ``Add -> Clip -> Mul``.** ONNX Runtime has no int8
kernel for either: they ran in float between DequantizeLinear / QuantizeLinear, with layout transposes around
them (MobileNetV3). ``HardSigmoid(x) = Clip(x + beta/alpha, 0, 1/alpha) * alpha`` and ``HardSwish(x) = x *
HardSigmoid(x)`` (alpha 1/6, beta 1/2): the Add is a ``QLinearAdd`` with a constant, the Clip folds into its
QuantizeLinear, the Mul by ``alpha`` is a change of scale with no kernel (:mod:`ortq.passes.int8_graph`) and
the product a ``QLinearMul``. Only activations a Conv feeds are rewritten (elsewhere the single float op is
faster). A decomposed Hardswish exported with its division (``x * Clip(x + 3, 0, 6) / 6``, Paddle) gets the
same free change of scale: a ``Div`` by a scalar constant after the Clip, or after a Mul by it, becomes a
``Mul`` by the reciprocal (no int8 kernel divides).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ortq.io import default_opset
from ortq.passes.initializers import unique_name

logger = logging.getLogger(__name__)

# auto_pad values under which a Conv's padding is its ``pads`` attribute (VALID: none at all).
_EXPLICIT = (None, b"NOTSET", "NOTSET", b"VALID", "VALID")

__all__ = ["constant_weights", "decompose_hard_activations", "divisions_after_clips", "fold_batch_norms", "fold_pads_into_convs",
           "global_average_pools", "rewrite_convnet", "sums_as_adds"]


# Ops whose output is not a function of their inputs alone (or that hold subgraphs).
_NOT_CONSTANT = frozenset({"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
                           "RandomUniformLike", "Multinomial", "Bernoulli"})
# Op type -> inputs that hold weights.
_WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "MatMul": (1,), "Gemm": (1, 2)}


def _constant_value(name: str, graph: onnx.GraphProto, producers: dict[str, onnx.NodeProto],
                    inits: dict[str, onnx.TensorProto], opset: int, reads: set[str] | None = None) -> np.ndarray | None:
    """The value of ``name`` when it depends on initializers only (evaluated with ``onnx.reference``); the
    initializers it reads are added to ``reads``."""
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
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type in _NOT_CONSTANT:
            return None  # a graph input or something we will not evaluate
        if len(nodes) > 64:
            return None
        nodes[id(node)] = node
        stack.extend(node.input)
    if reads is not None:
        reads.update(v for v in used if v in inits)
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


def _index(graph: onnx.GraphProto):
    """``(producers, initializers, consumers, outputs)`` of ``graph``: the node writing each tensor, the
    initializers by name, the nodes reading each tensor (once per read) and the graph outputs' names."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for v in n.input:
            consumers.setdefault(v, []).append(n)
    return ({o: n for n in graph.node for o in n.output}, {t.name: t for t in graph.initializer}, consumers,
            {o.name for o in graph.output})


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name of ``graph`` (node inputs and outputs, initializers, graph inputs): what a new name
    must not be."""
    return ({v for n in graph.node for v in (*n.input, *n.output)} | {t.name for t in graph.initializer}
            | {i.name for i in graph.input})


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


def constant_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Evaluate every weight (and bias) of a Conv / ConvTranspose / MatMul / Gemm that a chain of constant
    nodes computes (``ConstantOfShape``, a ``Cast`` or ``Transpose`` of an initializer) into an initializer.
    Quantized as computed, such a weight is quantized again on every run and no integer kernel prepacks it
    (the model zoo's test copies of VGG-19: 0.91x fp32). Returns the model and the count."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    wanted = sorted({n.input[i] for n in graph.node if n.domain in ("", "ai.onnx") and n.op_type in _WEIGHT_INPUTS
                     for i in _WEIGHT_INPUTS[n.op_type] if i < len(n.input) and n.input[i]
                     and n.input[i] not in inits and n.input[i] in producers}
                    - {o.name for o in graph.output})
    if not wanted:
        return model, 0
    opset = default_opset(model) or 13
    init_protos = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for n in graph.node:
        for v in set(n.input):
            readers[v] = readers.get(v, 0) + 1
    convs = {n.input[i] for n in graph.node if n.op_type in ("Conv", "ConvTranspose") for i in (1, 2) if i < len(n.input)}
    values = {}
    for name in wanted:
        reads: set[str] = set()
        value = _constant_value(name, graph, producers, init_protos, opset, reads)
        # A MatMul / Gemm weight computed from a table something else reads too (a tied embedding's Transpose)
        # stays as it is: the weight-only passes quantize the shared table once for both.
        if value is None or value.dtype.kind != "f" or (name not in convs and any(readers.get(r, 0) > 1 for r in reads)):
            continue
        values[name] = value
    if not values:
        return model, 0
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for node in graph.node:  # the producers stop writing them: the values become initializers
        node.output[:] = [f"{o}__folded_away" if o in values else o for o in node.output]
    graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in values.items())
    if not any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):
        _drop_dead(graph)
    logger.info("%d weights computed by constant nodes evaluated into initializers", len(values))
    return model, len(values)


def fold_pads_into_convs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold every zero Pad whose only consumers are Convs (input 0, explicit padding) into their ``pads``.

    Returns the model (a copy when something changed) and the number of Pads folded.
    """
    graph = model.graph
    if not any(n.op_type == "Pad" for n in graph.node):
        return model, 0
    opset = default_opset(model) or 13
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers, inits, consumers, outputs = _index(graph)
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


def _initializer_array(name: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    t = inits.get(name)
    if t is None:
        return None
    try:
        return numpy_helper.to_array(t)
    except Exception:  # stored outside the proto
        return None


def _bn_scale_shift(bn: onnx.NodeProto, const_of, channels: int):
    """``(s, t)`` with ``BatchNormalization(y) = y * s + t`` per channel, or None when the node is not a plain
    inference-mode normalisation of ``channels`` channels with constant parameters (``const_of(name)``)."""
    if len(bn.input) != 5 or any(o for o in bn.output[1:]) or _attr(bn, "training_mode"):
        return None
    params = [const_of(v) for v in bn.input[1:]]
    if any(p is None or p.shape != (channels,) or p.dtype.kind != "f" for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = _attr(bn, "epsilon")
    s = gamma / np.sqrt(var + (1e-5 if eps is None else float(eps)))
    return s, beta - mean * s


def _channel_constant(node: onnx.NodeProto, conv_out: str, const_of, channels: int) -> np.ndarray | None:
    """The other input of the Add / Mul ``node`` as ``channels`` float64 values when it is a constant scalar or
    per-channel ``[C, 1, 1]`` / ``[1, C, 1, 1]`` tensor (``const_of(name)``: an initializer or a chain of
    constants, else None)."""
    if len(node.input) != 2 or node.input[0] == node.input[1]:
        return None
    other = node.input[1] if node.input[0] == conv_out else node.input[0]
    t = const_of(other)
    if t is None or t.dtype.kind != "f" or t.size not in (1, channels) or t.ndim > 4:
        return None
    if t.size == channels and (t.ndim < 3 or t.shape[-3] != channels or any(d != 1 for d in t.shape[-2:])):
        return None  # only [C, 1, 1] / [1, C, 1, 1] (2-D convs) broadcasts along the channels
    return np.broadcast_to(t.astype(np.float64).reshape(-1), (channels,))


def _affine(node: onnx.NodeProto, conv_out: str, const_of, channels: int):
    """``(s, t)`` with ``node(y) = y * s + t`` per channel of ``conv_out``, or None."""
    if node.op_type == "BatchNormalization":
        return _bn_scale_shift(node, const_of, channels)
    c = _channel_constant(node, conv_out, const_of, channels)
    if c is None:
        return None
    return (np.ones(channels), c) if node.op_type == "Add" else (c, np.zeros(channels))


def fold_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Fold every inference-mode BatchNormalization, and every Add / Mul of a per-channel constant, that is the
    only reader of a Conv's (or a one-group ConvTranspose's) output, with constant weight and bias, into that
    convolution. Returns the model (a copy when something changed) and the number folded."""
    if not any(n.op_type in ("BatchNormalization", "Add", "Mul") for n in model.graph.node):
        return model, 0
    opset = default_opset(model) or 13
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producers, inits, consumers, outputs = _index(graph)
    names = _names(graph)
    convs = ("Conv", "ConvTranspose")
    folded = []
    for bn in list(graph.node):
        if bn.domain not in ("", "ai.onnx") or bn.op_type not in ("BatchNormalization", "Add", "Mul"):
            continue
        conv = producers.get(bn.input[0]) if bn.op_type == "BatchNormalization" else next(
            (producers[v] for v in bn.input if v in producers and producers[v].op_type in convs), None)
        if (conv is None or conv.op_type not in convs or conv.domain not in ("", "ai.onnx")
                or len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in outputs
                or (conv.op_type == "ConvTranspose" and (_attr(conv, "group") or 1) != 1)):
            continue
        def const_of(name: str) -> np.ndarray | None:  # an initializer, or a chain of constants evaluated
            return _constant_value(name, graph, producers, inits, opset)

        w = const_of(conv.input[1])
        b = const_of(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if w is None or w.dtype.kind != "f" or w.ndim < 3 or (len(conv.input) > 2 and conv.input[2] and b is None):
            continue
        axis = 0 if conv.op_type == "Conv" else 1  # the output channels' axis of the weight
        if bn.op_type != "BatchNormalization" and w.ndim != 4:
            continue  # a constant's broadcast is checked for 2-D convolutions only
        st = _affine(bn, conv.output[0], const_of, w.shape[axis])
        if st is None:
            continue
        shape = [1] * w.ndim
        shape[axis] = -1
        s, t = st
        w_new = (w.astype(np.float64) * s.reshape(shape)).astype(w.dtype)
        b_new = ((b.astype(np.float64) if b is not None else 0.0) * s + t).astype(w.dtype)
        new_names = []
        for base, value in ((f"{conv.input[1]}_bn_folded", w_new), (f"{bn.name or bn.output[0]}_bias", b_new)):
            name = unique_name(names, base)
            graph.initializer.append(numpy_helper.from_array(value, name))
            inits[name] = graph.initializer[-1]
            new_names.append(name)
        del conv.input[1:]
        conv.input.extend(new_names)
        conv.output[0] = bn.output[0]
        producers[conv.output[0]] = conv  # a second fold (bias Add, then BatchNormalization) reads it
        folded.append(bn)
    if not folded:
        return model, 0
    for bn in folded:
        graph.node.remove(bn)
    if not any(n.op_type in ("If", "Loop", "Scan") for n in graph.node):
        _drop_dead(graph)
    logger.info("%d BatchNormalization / per-channel Add or Mul nodes folded into their convolutions", len(folded))
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
    names = _names(graph)

    def fresh(base: str) -> str:
        return unique_name(names, base)

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


def divisions_after_clips(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Write every ``Div`` by a scalar float constant whose dividend a Clip computes (or a Mul of a Clip's
    output: a decomposed Hardswish) as a ``Mul`` by the reciprocal. Returns the model and the count."""
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}

    def after_clip(name: str) -> bool:
        p = producers.get(name)
        return p is not None and (p.op_type == "Clip" or (p.op_type == "Mul" and any(
            producers.get(v) is not None and producers[v].op_type == "Clip" for v in p.input)))

    found = []
    for i, n in enumerate(graph.node):
        if n.op_type != "Div" or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or not after_clip(n.input[0]):
            continue
        c = _initializer_array(n.input[1], inits)
        if c is not None and c.size == 1 and c.dtype.kind == "f" and np.isfinite(c).all() and float(c.reshape(())) != 0:
            found.append((i, c))
    if not found:
        return model, 0
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    names = _names(graph)
    for i, c in found:
        node = graph.node[i]
        name = unique_name(names, f"{node.input[1]}_reciprocal")
        graph.initializer.append(numpy_helper.from_array((1.0 / c.astype(np.float64)).astype(c.dtype), name))
        node.op_type = "Mul"
        node.input[1] = name
    _drop_dead(graph)
    logger.info("%d divisions by a constant after a Clip written as products", len(found))
    return model, len(found)


def sums_as_adds(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Write every ``Sum`` of two or more inputs (Caffe2-era graphs: ResNet's and ShuffleNet's residual
    additions) as a chain of ``Add``: ONNX Runtime has ``QLinearAdd`` but no int8 Sum, so a Sum ran in float
    between Q/DQ pairs. Returns the model and the count."""
    found = [i for i, n in enumerate(model.graph.node)
             if n.op_type == "Sum" and n.domain in ("", "ai.onnx") and len(n.input) >= 2]
    if not found:
        return model, 0
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    names = _names(graph)
    nodes: list = list(graph.node)
    for i in found:
        node = nodes[i]
        base, acc, chain = node.name or node.output[0], node.input[0], []
        for k, term in enumerate(node.input[1:], 1):
            last = k == len(node.input) - 1
            out = node.output[0] if last else unique_name(names, f"{base}/partial{k}")
            chain.append(helper.make_node("Add", [acc, term], [out], name=base if len(node.input) == 2 else f"{base}/Add{k}"))
            acc = out
        nodes[i] = chain
    del graph.node[:]
    graph.node.extend(n for item in nodes for n in (item if isinstance(item, list) else [item]))
    logger.info("%d Sum nodes written as Add", len(found))
    return model, len(found)


def rewrite_convnet(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """All the rewrites; returns the model and their counts (``evaluated_weights``, ``sums_as_adds``,
    ``folded_batch_norms``, ``folded_pads``, ``global_pools``, ``hard_activations``)."""
    model, weights = constant_weights(model)
    model, norms = fold_batch_norms(model)
    model, sums = sums_as_adds(model)
    model, pads = fold_pads_into_convs(model)
    model, pools = global_average_pools(model)
    model, hard = decompose_hard_activations(model)
    model, divisions = divisions_after_clips(model)
    hard += divisions
    return model, {"evaluated_weights": weights, "sums_as_adds": sums, "folded_batch_norms": norms, "folded_pads": pads, "global_pools": pools, "hard_activations": hard}
