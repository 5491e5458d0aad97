"""Normalize a loaded float model before planning, so that graphs from other exporters plan like ours.

* Weights stored as ``Constant`` nodes (older PyTorch exports, tf2onnx, paddle2onnx) become initializers, so
  the planner sees them as constant weights.
* Opsets below 13 (per-channel ``DequantizeLinear`` needs 13; the ONNX model zoo's graphs are opset 7-9) are
  upgraded with ``onnx.version_converter``; a conversion that fails is refused with a
  :class:`~ortq.errors.ModelError`.
* A BatchNormalization, or a per-channel constant Add / Mul, after a Conv folds into the convolution; a ``Sum``
  becomes ``Add`` nodes; a division by a constant after a Clip becomes a product.
* A zero ``Pad`` in front of a ``Conv`` folds into the convolution's ``pads``, so no QuantizeLinear /
  DequantizeLinear pair is left in float between two int8 convolutions; an ``AveragePool`` over its whole input
  becomes ``GlobalAveragePool``, whose int8 kernel computes the same mean; a Hardswish / Hardsigmoid after a Conv
  becomes ``Add -> Clip -> Mul``, which int8 kernels run (:mod:`ortq.passes.convnet_rewrites`).
* Shape inference fills in element types when a quantizable node's inputs have none (an integer ``MatMul``
  must not get QDQ pairs).
* Nodes holding subgraphs (``If``, ``Loop``, ``Scan``) and recurrent nodes (``LSTM``, ``GRU``, ``RNN``) stay in
  float: only the main graph is quantized. Each is recorded with its reason.
* Models that are already quantized are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import onnx

from ortq.errors import ModelError, first_line
from ortq.io import default_opset, needs_external_data
from ortq.passes.convnet_rewrites import rewrite_convnet
from ortq.runtime import create_session

logger = logging.getLogger(__name__)

TARGET_OPSET = 13
SUBGRAPH_OPS = ("If", "Loop", "Scan")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
QUANTIZED_OPS = (
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulNBits",
    "GatherBlockQuantized",
)
# Op types whose float inputs the planner may quantize; their input types must be known.
_QUANTIZABLE = ("MatMul", "Gemm", "Conv")


@dataclass
class Preparation:
    """What :func:`prepare_model` changed, and the nodes it leaves in float with their reasons."""

    source_opset: int
    opset: int
    lifted_constants: int = 0
    initializer_inputs: int = 0
    evaluated_weights: int = 0
    folded_batch_norms: int = 0
    sums_as_adds: int = 0
    folded_pads: int = 0
    global_pools: int = 0
    hard_activations: int = 0
    shape_inference: bool = False
    float_nodes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["initializers_removed_from_inputs"] = d.pop("initializer_inputs")
        return d






def _iter_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_nodes(g)


def _is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def _count_subgraph_nodes(node: onnx.NodeProto) -> int:
    n = 0
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            n += sum(1 for _ in _iter_nodes(g))
    return n


@functools.cache
def _runtime_supports_opset(opset: int) -> bool:
    """Whether this onnxruntime loads a model stamped with ``opset`` (probed on a one-node model)."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    probe.ir_version = onnx.helper.find_min_ir_version_for(list(probe.opset_import), ignore_unknown=True)
    try:
        create_session(probe.SerializeToString(), what="the opset probe")
    except ModelError:
        return False
    return True


def _check_opset_supported(opset: int, source: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelError(f"{source}: opset {opset} is newer than onnx {onnx.__version__} knows (<= {newest})")
    # Every onnxruntime release runs opset 21; above, ask the installed one.
    if opset > 21 and not _runtime_supports_opset(opset):
        import onnxruntime as ort

        raise ModelError(
            f"{source}: opset {opset} is newer than onnxruntime {ort.__version__} supports; "
            "re-export the model with a lower opset or upgrade onnxruntime"
        )


_VALID_TYPES = frozenset(onnx.TensorProto.DataType.values())


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _tensor_size_problem(t: onnx.TensorProto) -> str | None:
    """Why the data of an embedded tensor does not fit its shape and type, or None."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type in (onnx.TensorProto.STRING, 0):
        return None
    if any(d < 0 for d in t.dims):
        return f"has a negative dimension {list(t.dims)}"
    count = 1
    for d in t.dims:
        count *= d
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    if t.HasField("raw_data"):
        packed = t.data_type in _SUB_BYTE_TYPES
        expected = (count + 1) // 2 if packed else count * itemsize
        if len(t.raw_data) != expected:
            return f"holds {len(t.raw_data)} bytes, its shape {list(t.dims)} needs {expected}"
        return None
    stored = sum(len(getattr(t, f)) for f in _TYPED_FIELDS)
    if stored and stored != count and t.data_type not in _SUB_BYTE_TYPES | _COMPLEX_TYPES:
        return f"holds {stored} values, its shape {list(t.dims)} needs {count}"
    return None


_SUB_BYTE_TYPES = frozenset(
    getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)
)
_COMPLEX_TYPES = frozenset((onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128))


def _check_readable(model: onnx.ModelProto, source: str) -> None:
    """Refuse what a checked model may still hold: names that are not UTF-8, element types that do not exist."""

    def bad_name(text) -> bool:
        return not isinstance(text, str)

    def check_texts(where: str, *texts) -> None:
        if any(bad_name(t) for t in texts):
            raise ModelError(f"{source}: {where} holds text that is not valid UTF-8; the file is corrupt")

    def check_graph(graph: onnx.GraphProto) -> None:
        check_texts("the graph", graph.name, graph.doc_string)
        for t in graph.initializer:
            check_texts("an initializer", t.doc_string)
            if bad_name(t.name):
                raise ModelError(f"{source}: initializer name {t.name!r} is not valid UTF-8; the file is corrupt")
            if t.data_type not in _VALID_TYPES:
                raise ModelError(f"{source}: initializer {t.name!r} has unknown element type {t.data_type}")
            problem = _tensor_size_problem(t)
            if problem:
                raise ModelError(f"{source}: initializer {t.name!r} {problem}; the file is corrupt")
        for v in (*graph.input, *graph.output, *graph.value_info):
            if bad_name(v.name):
                raise ModelError(f"{source}: value name {v.name!r} is not valid UTF-8; the file is corrupt")
            check_texts(f"value {v.name!r}", v.doc_string, *(d.dim_param for d in v.type.tensor_type.shape.dim))
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type not in _VALID_TYPES:
                raise ModelError(f"{source}: value {v.name!r} has unknown element type {v.type.tensor_type.elem_type}")
        for node in graph.node:
            texts = (node.name, node.op_type, node.domain, node.doc_string, *node.input, *node.output,
                     *(a.name for a in node.attribute))
            if any(bad_name(t) for t in texts):
                raise ModelError(f"{source}: node {node.name!r} holds a name that is not valid UTF-8; the file is corrupt")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    problem = _tensor_size_problem(attr.t)
                    if problem:
                        raise ModelError(f"{source}: tensor of node {node.name!r} {problem}; the file is corrupt")
                elif attr.type == onnx.AttributeProto.GRAPH:
                    check_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        check_graph(g)

    check_texts(
        "the model header",
        model.producer_name, model.producer_version, model.domain, model.doc_string,
        *(o.domain for o in model.opset_import), *(p.key for p in model.metadata_props),
        *(p.value for p in model.metadata_props),
    )
    check_graph(model.graph)


def _upgrade_opset(model: onnx.ModelProto, source: str, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(model, TARGET_OPSET)
    except Exception as exc:  # the converter raises RuntimeError / ConvertError / ValueError
        raise ModelError(
            f"{source}: opset {opset} could not be upgraded to {TARGET_OPSET} for QDQ quantization "
            f"({first_line(exc)}); re-export the model with opset >= {TARGET_OPSET}"
        ) from exc
    min_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    if converted.ir_version < min_ir:
        converted.ir_version = min_ir
    try:
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise ModelError(
            f"{source}: upgrading opset {opset} to {TARGET_OPSET} gave an invalid model ({first_line(exc)}); "
            f"re-export the model with opset >= {TARGET_OPSET}"
        ) from exc
    logger.info("%s: opset upgraded from %d to %d", source, opset, TARGET_OPSET)
    return converted


def _lift_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Turn tensor-valued ``Constant`` nodes (of any graph) into initializers of their graph."""
    before = sum(1 for n in _iter_nodes(model.graph) if n.op_type == "Constant" and _is_default_domain(n))
    if not before:
        return model, 0
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    try:
        ir_model = ir.from_proto(model)
        LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(ir_model)
        lifted = ir.to_proto(ir_model)
    except Exception as exc:
        raise ModelError(f"cannot lift Constant nodes to initializers ({first_line(exc)})") from exc
    after = sum(1 for n in _iter_nodes(lifted.graph) if n.op_type == "Constant" and _is_default_domain(n))
    return lifted, before - after


def _initializers_out_of_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Initializers listed as graph inputs (old exporters' ``keep_initializers_as_inputs``) become plain
    constants: a weight that could be fed at run time cannot be quantized, and its quantized replacement would
    leave a required input behind."""
    names = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in names]
    removed = len(model.graph.input) - len(kept)
    if not removed:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.input[:]
    out.graph.input.extend(kept)
    min_ir = onnx.helper.find_min_ir_version_for(list(out.opset_import), ignore_unknown=True)
    out.ir_version = max(out.ir_version, min_ir, 4)  # IR < 4 requires initializers to be inputs
    return out, removed


def _missing_types(model: onnx.ModelProto) -> bool:
    """True when some input of a quantizable main-graph node has no known element type."""
    g = model.graph
    known = {v.name for v in (*g.input, *g.value_info, *g.output) if v.type.tensor_type.elem_type}
    known |= {t.name for t in g.initializer}
    for node in g.node:
        if node.op_type in _QUANTIZABLE and _is_default_domain(node):
            if any(name and name not in known for name in node.input):
                return True
    return False


def _infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    if needs_external_data(model):  # shape inference takes the model through one protobuf message
        return model, False
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False), True
    except Exception as exc:  # inference is a help, not a requirement: ONNX Runtime has the last word
        logger.debug("shape inference failed: %s", first_line(exc))
        return model, False


def prepare_model(model: onnx.ModelProto, *, source: str = "model") -> tuple[onnx.ModelProto, Preparation]:
    """Normalize ``model`` for planning (see the module docstring). ``model`` itself is not modified.

    Args:
        model: a loaded, checked float model.
        source: how to name the model in error messages (its path).

    Returns:
        The prepared model (``model`` itself when nothing needed a change) and what was done.

    Raises:
        ModelError: the model is already quantized, or its opset cannot be upgraded.
    """
    quantized = sorted(
        {n.op_type for n in _iter_nodes(model.graph) if n.op_type in QUANTIZED_OPS and n.domain in ("", "ai.onnx", "com.microsoft")}
    )
    if quantized:
        raise ModelError(
            f"{source}: the model is already quantized (holds {', '.join(quantized)}); quantize the float model"
        )
    _check_readable(model, source)
    if not model.graph.output:
        raise ModelError(f"{source}: the graph has no outputs")
    opset = default_opset(model)
    _check_opset_supported(opset, source)
    prep = Preparation(source_opset=opset, opset=opset)
    if 0 < opset < TARGET_OPSET:
        model = _upgrade_opset(model, source, opset)
        prep.opset = default_opset(model)
    model, prep.initializer_inputs = _initializers_out_of_inputs(model)
    if prep.initializer_inputs:
        logger.info("%s: %d initializers removed from the graph inputs", source, prep.initializer_inputs)
    model, prep.lifted_constants = _lift_constants(model)
    if prep.lifted_constants:
        logger.info("%s: %d Constant nodes lifted to initializers", source, prep.lifted_constants)
    model, rewrites = rewrite_convnet(model)
    prep.folded_batch_norms, prep.sums_as_adds = rewrites["folded_batch_norms"], rewrites["sums_as_adds"]
    prep.evaluated_weights = rewrites["evaluated_weights"]
    prep.folded_pads, prep.global_pools = rewrites["folded_pads"], rewrites["global_pools"]
    prep.hard_activations = rewrites["hard_activations"]
    if _missing_types(model):
        model, prep.shape_inference = _infer_shapes(model)
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if not _is_default_domain(node):
            continue
        if node.op_type in SUBGRAPH_OPS:
            inner = _count_subgraph_nodes(node)
            prep.float_nodes[name] = (
                f"{node.op_type} holds subgraphs: only the main graph is quantized, its {inner} inner nodes "
                "stay in float"
            )
        elif node.op_type in RECURRENT_OPS:
            prep.float_nodes[name] = f"recurrent op {node.op_type}: its gate weights stay in float (no QDQ rule)"
    if prep.float_nodes:
        logger.info("%s: %d nodes with subgraphs or recurrences stay in float", source, len(prep.float_nodes))
    return model, prep
