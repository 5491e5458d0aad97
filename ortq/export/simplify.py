"""Decoder graph clean-up after tracing: the work ONNX Runtime would otherwise redo on every generated token.

A traced decoder computes the shapes of its ``view`` / ``reshape`` calls at run time (``Shape -> Gather ->
Unsqueeze -> Concat -> Reshape``), and projects query, key and value with three MatMuls of the same input. At a
one-token decode step these small nodes cost as much as the weights' MatMuls. Two rewrites, both exact:

* :func:`drop_identity_reshapes`: a chain of Reshapes whose result has the shape its input already had (proved
  with ONNX Runtime's symbolic shape inference: the same dimension symbols and sizes) is removed, and with it the
  shape arithmetic that fed it.
* :func:`pack_qkv`: a ``GroupQueryAttention`` whose query, key and value are MatMuls (optionally plus a bias) of
  one input by constant weights reads one MatMul of the concatenated weights instead (its packed-QKV form, as
  onnxruntime-genai's builder writes it). Weight blocks run along the input dimension, so the packed weight
  quantizes exactly like its three parts.

* :func:`pack_siblings`: other MatMuls of one input by constant weights (an MLP's gate and up projections)
  become one MatMul of the concatenated weights and a ``Split``: one weight pass, one kernel launch.
* :func:`fuse_skip_rms_norms`: a residual ``Add`` feeding an RMS norm (``x / sqrt(mean(x^2) + eps) * gamma``, as
  traced from PyTorch) becomes one ``com.microsoft.SkipSimplifiedLayerNormalization`` that also returns the sum
  for the next residual.

The parity check of the export runs after these rewrites.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from ortq.io import computed_on_read, unmap
from ortq.passes.initializers import add_initializer

logger = logging.getLogger(__name__)

GQA = "GroupQueryAttention"
_SMALL = 4096  # initializers up to this many elements are kept for shape inference (shapes, axes, constants)


def simplify_decoder(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The rewrites on a decoder with ``GroupQueryAttention``; other graphs are returned unchanged."""
    if not any(n.op_type == GQA for n in proto.graph.node):
        return proto
    return ir.serde.serialize_model(simplify_decoder_model(proto))


def simplify_decoder_model(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> ir.Model:
    """:func:`simplify_decoder` as an ``onnx_ir.Model`` sharing ``proto``'s tensors (other graphs unchanged):
    nothing is serialized, and weights stored externally (in ``base_dir``) stay mapped from their file."""
    if base_dir is not None:
        _load_small_external(proto, base_dir)
    model = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    if not any(n.op_type == GQA for n in model.graph):
        return model
    dims = _symbolic_dims(proto)
    for node in model.graph:  # the inferred element types, for the float -> float Casts the norms hold
        for v in node.outputs:
            if v.dtype is None and f"dtype:{v.name}" in (dims or {}):
                v.dtype = ir.DataType(dims[f"dtype:{v.name}"][0])
    reshapes = drop_identity_reshapes(model, dims) if dims else 0
    packed = pack_qkv(model)
    siblings = pack_siblings(model)
    norms = fuse_skip_rms_norms(model, dims) if dims else 0
    common_passes.RemoveUnusedNodesPass()(model)
    logger.info("decoder clean-up: %d identity reshape(s) removed, %d attention(s) read a packed QKV MatMul, "
                "%d group(s) of sibling MatMuls packed, %d residual RMS norm(s) fused", reshapes, packed, siblings,
                norms)
    return model


def _load_small_external(proto: onnx.ModelProto, base_dir: str | os.PathLike) -> None:
    """Read into ``proto`` the externally stored tensors of node attributes (``Constant`` values) and the
    small initializers (shapes, axes): shape inference needs their values, and a save streams initializers
    into its data file but not attributes, which would point at ``base_dir``'s files."""
    from onnx.external_data_helper import (
        _get_attribute_tensors,
        load_external_data_for_tensor,
        uses_external_data,
    )

    small = [t for t in proto.graph.initializer if (int(np.prod(t.dims)) if t.dims else 1) <= _SMALL]
    for t in [*small, *_get_attribute_tensors(proto)]:
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def _symbolic_dims(proto: onnx.ModelProto) -> dict[str, tuple] | None:
    """Every value's shape as a tuple of ints and symbols (None where unknown), by name (and its element type
    under ``dtype:{name}``); None if the inference fails. Large weights are left out of the copy the inference reads: only their shapes matter."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        inferred = SymbolicShapeInference.infer_shapes(_without_weights(proto), auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # noqa: BLE001 - an op the inference does not know: no reshape is removed
        logger.info("symbolic shape inference failed (%s); reshapes kept", exc)
        return None
    if inferred is None:
        return None
    graph = inferred.graph
    dims: dict[str, tuple] = {}
    for v in (*graph.value_info, *graph.input, *graph.output):
        t = v.type.tensor_type
        if t.elem_type:
            dims[f"dtype:{v.name}"] = (t.elem_type,)
        if t.HasField("shape"):
            dims[v.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            )
    for init in proto.graph.initializer:
        dims[init.name] = tuple(init.dims)
    return dims


def _without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers are graph inputs of the same type and shape."""
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = proto.ir_version, proto.producer_name
    light.opset_import.extend(proto.opset_import)
    g = light.graph
    g.name = proto.graph.name
    g.node.extend(proto.graph.node)
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    for init in proto.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        if size <= _SMALL and init.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(init)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _known(shape: tuple | None) -> bool:
    return shape is not None and all(d is not None and not (isinstance(d, int) and d <= 0) for d in shape)


def drop_identity_reshapes(model: ir.Model, dims: dict[str, tuple]) -> int:
    """Bypass each Reshape (after a chain of Reshapes) whose output shape equals the chain's input shape."""
    removed = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        source = node.inputs[0]
        while (producer := source.producer()) is not None and producer.op_type == "Reshape" \
                and producer.domain in ("", "ai.onnx"):
            source = producer.inputs[0]
        want, have = dims.get(out.name), dims.get(source.name)
        if _known(want) and want == have:
            out.replace_all_uses_with(source)
            removed += 1
    return removed


def _projection(value: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value | None] | None:
    """(input, weight, bias) when ``value`` is ``MatMul(input, W)`` or ``Add(MatMul(input, W), b)`` with constant
    2-D ``W`` and 1-D ``b`` and nothing else reads the intermediate values."""
    if value is None or value.producer() is None or len(value.uses()) != 1:
        return None
    node, bias = value.producer(), None
    if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        consts = [v for v in node.inputs if v is not None and v.const_value is not None]
        others = [v for v in node.inputs if v is not None and v.const_value is None]
        if len(consts) != 1 or len(others) != 1 or len(consts[0].const_value.shape) != 1:
            return None
        bias, value = consts[0], others[0]
        if value.producer() is None or len(value.uses()) != 1:
            return None
        node = value.producer()
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return None
    x, w = node.inputs
    if w is None or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    return x, w, bias


def _side_by_side(graph: ir.Graph, name: str, weights: list[ir.TensorProtocol]) -> ir.Value:
    """An initializer ``name`` holding ``weights`` (2-D) concatenated along axis 1. Weights mapped from an
    external data file give a tensor computed when read (from the sources, unmapped after): a large model's
    packed weights are never all held in memory, only written one at a time."""
    if not all(isinstance(w, ir.ExternalTensor) for w in weights):
        return add_initializer(graph, name, np.concatenate([w.numpy() for w in weights], axis=1))
    shape = [int(weights[0].shape[0]), sum(int(w.shape[1]) for w in weights)]
    lazy = computed_on_read(weights, lambda *ws: np.concatenate(ws, axis=1), shape)
    value = ir.val(name, dtype=weights[0].dtype, shape=ir.Shape(shape), const_value=lazy)
    graph.register_initializer(value)
    return value


def pack_qkv(model: ir.Model) -> int:
    """Feed each eligible ``GroupQueryAttention`` one MatMul of the concatenated q/k/v weights."""
    graph, packed = model.graph, 0
    for node in list(graph):
        if node.op_type != GQA or len(node.inputs) < 3 or any(v is None for v in node.inputs[:3]):
            continue
        parts = [_projection(v) for v in node.inputs[:3]]
        if any(p is None for p in parts) or len({id(p[0]) for p in parts}) != 1:
            continue
        x = parts[0][0]
        weights = [p[1].const_value for p in parts]
        if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            continue
        base = f"{node.name.rsplit('/', 1)[0]}/qkv_proj"
        w_val = _side_by_side(graph, f"{base}.weight", weights)
        matmul = ir.node("MatMul", [x, w_val], name=f"{base}/MatMul")
        matmul.outputs[0].name = f"{base}/MatMul_output_0"
        new = [matmul]
        qkv = matmul.outputs[0]
        if any(p[2] is not None for p in parts):
            biases = [p[2].const_value.numpy() if p[2] is not None else np.zeros(w.shape[1], w.dtype.numpy())
                      for p, w in zip(parts, weights, strict=True)]
            b_val = add_initializer(graph, f"{base}.bias", np.concatenate(biases))
            add = ir.node("Add", [qkv, b_val], name=f"{base}/Add")
            add.outputs[0].name = f"{base}/Add_output_0"
            new.append(add)
            qkv = add.outputs[0]
        graph.insert_before(node, new)
        node.replace_input_with(0, qkv)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        del weights
        unmap(p[1] for p in parts)
        packed += 1
    return packed


def pack_siblings(model: ir.Model) -> int:
    """MatMuls reading the same input with constant 2-D weights of one dtype as one MatMul and a ``Split``."""
    graph, groups = model.graph, {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        w = node.inputs[1]
        out = node.outputs[0]
        if w is None or w.const_value is None or len(w.const_value.shape) != 2 or out.is_graph_output() \
                or not out.uses():  # a dead node (a projection pack_qkv replaced)
            continue
        groups.setdefault(id(node.inputs[0]), []).append(node)
    packed = 0
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        weights = [n.inputs[1].const_value for n in nodes]
        if len({(w.shape[0], w.dtype) for w in weights}) != 1:
            continue
        base = f"{nodes[0].name.rsplit('/', 2)[0]}/packed"
        w_val = _side_by_side(graph, f"{base}.weight", weights)
        sizes = add_initializer(graph, f"{base}.split", np.array([w.shape[1] for w in weights], np.int64))
        matmul = ir.node("MatMul", [nodes[0].inputs[0], w_val], name=f"{base}/MatMul")
        matmul.outputs[0].name = f"{base}/MatMul_output_0"
        split = ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(nodes),
                        name=f"{base}/Split")
        first = min(nodes, key=lambda n: list(graph).index(n))
        graph.insert_before(first, [matmul, split])
        for n, out in zip(nodes, split.outputs, strict=True):
            out.name = f"{n.name}_output_0"
            n.outputs[0].name = f"{n.name}_replaced"
            n.outputs[0].replace_all_uses_with(out)
        del weights
        unmap(n.inputs[1] for n in nodes)
        packed += 1
    return packed


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value of an initializer or ``Constant`` output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value.numpy()
    return None


def _uncast(value: ir.Value) -> ir.Value:
    """``value`` before any float -> float ``Cast`` (an identity the tracer leaves around an RMS norm)."""
    while (node := value.producer()) is not None and node.op_type == "Cast" and node.inputs[0] is not None \
            and node.inputs[0].dtype == ir.DataType.FLOAT and node.attributes.get_int("to") == 1:
        value = node.inputs[0]
    return value


def _op(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _rms_norm(scale: ir.Node) -> tuple[ir.Value, ir.Value, float] | None:
    """(x, gamma, epsilon) when ``scale`` is the ``Mul`` by gamma ending ``x / sqrt(mean(x^2) + eps) * gamma``."""
    if scale.op_type != "Mul" or scale.domain not in ("", "ai.onnx") or len(scale.inputs) != 2:
        return None
    gamma = next((v for v in scale.inputs if v is not None and v.const_value is not None), None)
    if gamma is None or len(gamma.const_value.shape) != 1:
        return None
    other = scale.inputs[1] if scale.inputs[0] is gamma else scale.inputs[0]
    normed = _op(_uncast(other), "Mul")
    if normed is None:
        return None
    for x, inv in (normed.inputs, reversed(normed.inputs)):
        div = _op(inv, "Div")
        one = _constant(div.inputs[0]) if div is not None else None
        sqrt = _op(div.inputs[1], "Sqrt") if div is not None else None
        add = _op(sqrt.inputs[0], "Add") if sqrt is not None else None
        if one is None or one.size != 1 or float(one.reshape(-1)[0]) != 1.0 or add is None:
            continue
        mean = next((_op(v, "ReduceMean") for v in add.inputs if _op(v, "ReduceMean") is not None), None)
        eps = next((_constant(v) for v in add.inputs if _constant(v) is not None), None)
        if mean is None or eps is None or eps.size != 1:
            continue
        axes = mean.attributes.get_ints("axes") or (
            list(_constant(mean.inputs[1]).reshape(-1)) if len(mean.inputs) > 1 and mean.inputs[1] is not None
            and _constant(mean.inputs[1]) is not None else None
        )
        pow_ = _op(mean.inputs[0], "Pow")
        exponent = _constant(pow_.inputs[1]) if pow_ is not None else None
        if axes is None or list(axes) != [-1] or mean.attributes.get_int("keepdims", 1) != 1 or exponent is None \
                or float(exponent.reshape(-1)[0]) != 2.0:
            continue
        source = _uncast(x)
        if _uncast(pow_.inputs[0]) is source:
            return source, gamma, float(eps.reshape(-1)[0])
    return None


def fuse_skip_rms_norms(model: ir.Model, dims: dict[str, tuple]) -> int:
    """Each RMS norm of a residual sum ``Add(a, b)`` as one ``SkipSimplifiedLayerNormalization(a, b, gamma)``
    whose fourth output (the sum) replaces the ``Add`` for its other readers."""
    graph, fused = model.graph, 0
    for node in list(graph):
        found = _rms_norm(node)
        if found is None:
            continue
        x, gamma, eps = found
        add = _op(x, "Add")
        if add is None or x.is_graph_output() or any(v is None or v.const_value is not None or _constant(v) is not None
                                                     for v in add.inputs):
            continue
        a, b = add.inputs
        shape = dims.get(a.name)
        if not _known(shape) or len(shape) != 3 or dims.get(b.name) != shape:
            continue
        skip = ir.node("SkipSimplifiedLayerNormalization", [a, b, gamma], attributes={"epsilon": eps},
                       domain="com.microsoft", num_outputs=4, name=f"{node.name}/SkipSimplifiedLayerNorm")
        out, mean, inv_std, total = skip.outputs
        for value, suffix in ((out, "output"), (mean, "mean"), (inv_std, "inv_std_var"), (total, "sum")):
            value.name = f"{skip.name}_{suffix}"
        out.dtype = total.dtype = ir.DataType.FLOAT
        dims[total.name] = dims[out.name] = shape  # later norms read the sum
        graph.insert_after(add, skip)
        node.outputs[0].replace_all_uses_with(out)
        for reader in [x] + [c.outputs[0] for c, _ in x.uses() if c.op_type == "Cast" and _uncast(c.outputs[0]) is x]:
            reader.replace_all_uses_with(total)
        fused += 1
    return fused
