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

The parity check of the export runs after these rewrites.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

logger = logging.getLogger(__name__)

GQA = "GroupQueryAttention"
_SMALL = 4096  # initializers up to this many elements are kept for shape inference (shapes, axes, constants)


def simplify_decoder(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Both rewrites on a decoder with ``GroupQueryAttention``; other graphs are returned unchanged."""
    if not any(n.op_type == GQA for n in proto.graph.node):
        return proto
    dims = _symbolic_dims(proto)
    model = ir.serde.deserialize_model(proto)
    reshapes = drop_identity_reshapes(model, dims) if dims else 0
    packed = pack_qkv(model)
    common_passes.RemoveUnusedNodesPass()(model)
    logger.info("decoder clean-up: %d identity reshape(s) removed, %d attention(s) read a packed QKV MatMul",
                reshapes, packed)
    return ir.serde.serialize_model(model)


def _symbolic_dims(proto: onnx.ModelProto) -> dict[str, tuple] | None:
    """Every value's shape as a tuple of ints and symbols (None where unknown), by name; None if the inference
    fails. Large weights are left out of the copy the inference reads: only their shapes matter."""
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
        weights = [p[1].const_value.numpy() for p in parts]
        if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            continue
        base = f"{node.name.rsplit('/', 1)[0]}/qkv_proj"
        w_val = _initializer(graph, f"{base}.weight", np.concatenate(weights, axis=1))
        matmul = ir.node("MatMul", [x, w_val], name=f"{base}/MatMul")
        matmul.outputs[0].name = f"{base}/MatMul_output_0"
        new = [matmul]
        qkv = matmul.outputs[0]
        if any(p[2] is not None for p in parts):
            biases = [p[2].const_value.numpy() if p[2] is not None else np.zeros(w.shape[1], w.dtype)
                      for p, w in zip(parts, weights, strict=True)]
            b_val = _initializer(graph, f"{base}.bias", np.concatenate(biases))
            add = ir.node("Add", [qkv, b_val], name=f"{base}/Add")
            add.outputs[0].name = f"{base}/Add_output_0"
            new.append(add)
            qkv = add.outputs[0]
        graph.insert_before(node, new)
        node.replace_input_with(0, qkv)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        packed += 1
    return packed


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.val(name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value
