"""Where a model ran: which execution provider ran each node of ONNX Runtime's optimized graph, which QDQ
groups became integer kernels, the Q/DQ nodes left over, and the share of MatMul/Gemm/Conv FLOPs computed in
int8 or by low-bit weight kernels.

:func:`inspect_placement` opens a profiling session (through :func:`ortq.runtime.create_session`) that also
saves the optimized graph, runs one sample batch and reads the last run's profile. FLOPs count 2 per
multiply-add at the profiled batch; weight shapes come from the initializers, never from profiled (possibly
pre-packed) buffers.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ortq.errors import ValidationFailed
from ortq.io import load_graph, resolve_model_path
from ortq.runtime import (
    EXECUTION_PROVIDERS,
    ProviderFailed,
    SessionSettings,
    create_session,
    normalize_provider,
    provider_availability,
    release_freed_memory,
    run_batches,
)

__all__ = [
    "FLOAT_MATMUL_KERNELS",
    "INTEGER_KERNELS",
    "NBITS_KERNELS",
    "QDQ_OPS",
    "QLINEAR_ELEMENTWISE",
    "NodePlacement",
    "Placement",
    "has_qdq",
    "inspect_placement",
]

# Kernels that compute MatMul/Gemm/Conv/attention projections on 8-bit integers.
INTEGER_KERNELS = frozenset(
    {
        "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QLinearConv",
        "QLinearConvTranspose", "ConvInteger", "QAttention", "QOrderedMatMul", "QOrderedAttention",
        "QOrderedLongformerAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization",
    }
)
# Weight-only low-bit kernels (int4/int8 weights; activations float, or int8 on CPU with accuracy_level 4).
NBITS_KERNELS = frozenset({"MatMulNBits", "MatMulBnb4", "MatMulFpQ4", "GatherBlockQuantized"})
# Float kernels whose FLOPs count in the MatMul/Gemm/Conv denominator.
FLOAT_MATMUL_KERNELS = frozenset(
    {"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "FusedGemm", "FusedConv", "NhwcFusedConv", "Attention"}
)
# Other integer element-wise kernels the CPU EP fuses QDQ groups into.
QLINEAR_ELEMENTWISE = frozenset(
    {
        "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearConcat",
        "QLinearWhere", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearReduceMean", "QGemm",
    }
)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
MATMUL_LIKE_SOURCE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention"})
# Source ops fed by DequantizeLinear that the CPU EP turns into QLinear kernels (a QDQ group each).
_QLINEAR_SOURCE = frozenset({"Gather", "Add", "Mul", "Concat", "GlobalAveragePool", "AveragePool", "Sigmoid",
                             "LeakyRelu"})

# (index of the activation input A, index of the weight input B) for FLOP estimates.
_AB_INDEX = {
    "MatMul": (0, 1),
    "FusedMatMul": (0, 1),
    "MatMulInteger": (0, 1),
    "MatMulIntegerToFloat": (0, 1),
    "DynamicQuantizeMatMul": (0, 1),
    "QLinearMatMul": (0, 3),
    "Gemm": (0, 1),
    "FusedGemm": (0, 1),
    "QGemm": (0, 3),
    "MatMulNBits": (0, 1),
    "MatMulBnb4": (0, 1),
    "MatMulFpQ4": (0, 1),
    "Conv": (0, 1),
    "FusedConv": (0, 1),
    "NhwcFusedConv": (0, 1),
    "ConvInteger": (0, 1),
    "QLinearConv": (0, 3),
    "ConvTranspose": (0, 1),
    "QLinearConvTranspose": (0, 3),
    "Attention": (0, 1),
    "QAttention": (0, 1),
}
_TOKEN_SUFFIX = re.compile(r"(_token_\d+)+$")
_CONV_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "ConvInteger", "QLinearConv"})



@dataclass
class NodePlacement:
    """One node of the optimized graph as it ran.

    Attributes:
        name: node name in the optimized graph (fused nodes usually keep the name of the node they replace).
        op_type: operator, e.g. ``QLinearMatMul``.
        provider: the execution provider that ran it (from profiling), or None when it did not run.
        category: ``int8`` (integer kernel), ``nbits`` (weight-only low-bit kernel), ``float_matmul``,
            ``qdq`` (a leftover QuantizeLinear / DequantizeLinear), ``memcpy`` or ``other``.
        flops: multiply-add FLOPs (2 per MAC) at the profiled batch, for MatMul/Gemm/Conv-like nodes.
        weight_matmul: the node multiplies by a constant weight (not activation x activation).
        kernel_us: time in the profiled run (CPU-side; GPU kernels run asynchronously).
    """

    name: str
    op_type: str
    domain: str = ""
    provider: str | None = None
    category: str = "other"
    flops: int | None = None
    weight_matmul: bool = False
    kernel_us: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Placement:
    """What ONNX Runtime made of a model on one provider. See :func:`inspect_placement`."""

    provider: str
    execution_providers: list[str] = field(default_factory=list)
    nodes: list[NodePlacement] = field(default_factory=list)
    source_nodes: int = 0
    source_convs: int = 0
    qdq_groups: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    optimized_model_saved: bool = False

    # ---- derived views
    @property
    def nodes_per_provider(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            k = n.provider or "not run"
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    @property
    def op_types_per_provider(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for n in self.nodes:
            d = out.setdefault(n.provider or "not run", {})
            d[n.op_type] = d.get(n.op_type, 0) + 1
        return {k: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))) for k, v in out.items()}

    def _count(self, category: str | None = None, op_types: frozenset[str] | None = None) -> dict[str, int]:
        """Nodes by op type: of one category, or of the given op types outside the int8 category."""
        if op_types is None:
            counts = Counter(n.op_type for n in self.nodes if n.category == category)
        else:
            counts = Counter(n.op_type for n in self.nodes if n.op_type in op_types and n.category != "int8")
        return dict(sorted(counts.items()))

    @property
    def integer_kernels(self) -> dict[str, int]:
        """Integer MatMul/Gemm/Conv/attention kernels by op type."""
        return self._count("int8")

    @property
    def nbits_kernels(self) -> dict[str, int]:
        return self._count("nbits")

    @property
    def float_matmuls(self) -> dict[str, int]:
        return self._count("float_matmul")

    @property
    def qlinear_elementwise(self) -> dict[str, int]:
        return self._count(op_types=QLINEAR_ELEMENTWISE)

    @property
    def unfused_qdq(self) -> dict[str, int]:
        """QuantizeLinear / DequantizeLinear nodes left in the optimized graph."""
        return self._count("qdq")

    @property
    def integer_node_names(self) -> set[str]:
        """Names of the nodes that ran as integer, QLinear element-wise or low-bit kernels, as the source
        model names them (ONNX Runtime's layout transform appends ``_token_<n>`` to the nodes it rewrites)."""
        return {
            _source_name(n.name)
            for n in self.nodes
            if (n.category in ("int8", "nbits") or n.op_type in QLINEAR_ELEMENTWISE) and self._ran(n)
        }

    def _ran(self, node: NodePlacement) -> bool:
        """Whether ``node`` ran (when a profiled run exists; every node counts when nothing ran)."""
        return node.provider is not None or not any(n.provider for n in self.nodes)

    @property
    def convolutions(self) -> dict[str, int]:
        """Convolutions of the source model and how many ran as integer kernels."""
        int8 = sum(1 for n in self.nodes if n.op_type in ("QLinearConv", "ConvInteger") and self._ran(n))
        return {"total": self.source_convs, "int8": int8, "float": max(self.source_convs - int8, 0)}

    @property
    def fused_qdq_groups(self) -> list[str]:
        """Source-model nodes fed by DequantizeLinear that became integer kernels."""
        names = self.integer_node_names
        return [g for g in self.qdq_groups if g in names]

    @property
    def unfused_qdq_groups(self) -> list[str]:
        """Source-model nodes fed by DequantizeLinear that still run in float (QDQ emulation)."""
        names = self.integer_node_names
        return [g for g in self.qdq_groups if g not in names]

    def _flops(self, categories: tuple[str, ...], weight_only: bool = False) -> int:
        """FLOPs of the nodes of ``categories`` that ran in the profiled run (nothing counts as planned)."""
        return sum(
            n.flops or 0
            for n in self.nodes
            if n.category in categories and n.provider is not None and (n.weight_matmul or not weight_only)
        )

    @property
    def flops(self) -> dict[str, Any]:
        """MatMul/Gemm/Conv FLOPs by kind, and the int8 / low-bit shares (None when unknown)."""
        total = self._flops(("int8", "nbits", "float_matmul"))
        w_total = self._flops(("int8", "nbits", "float_matmul"), weight_only=True)
        int8 = self._flops(("int8",))
        nbits = self._flops(("nbits",))
        w_int8 = self._flops(("int8",), weight_only=True)
        w_nbits = self._flops(("nbits",), weight_only=True)
        known = total > 0 and not self.opaque
        return {
            "total": total,
            "int8": int8,
            "nbits": nbits,
            "float": total - int8 - nbits,
            "int8_fraction": int8 / total if known else None,
            "nbits_fraction": nbits / total if known else None,
            "weight_matmul_total": w_total,
            "weight_matmul_int8_fraction": w_int8 / w_total if known and w_total else None,
            "weight_matmul_nbits_fraction": w_nbits / w_total if known and w_total else None,
        }

    @property
    def opaque(self) -> bool:
        """A compiling provider (TensorRT) hides per-layer precision behind fused engine nodes."""
        return any(n.provider == "TensorrtExecutionProvider" for n in self.nodes)

    @property
    def kernel_time_us(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for n in self.nodes:
            if n.kernel_us is not None:
                out[n.category] = out.get(n.category, 0.0) + n.kernel_us
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def to_dict(self, *, include_nodes: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "provider": self.provider,
            "execution_providers": self.execution_providers,
            "source_nodes": self.source_nodes,
            "optimized_nodes": len(self.nodes),
            "nodes_per_provider": self.nodes_per_provider,
            "op_types_per_provider": self.op_types_per_provider,
            "integer_kernels": self.integer_kernels,
            "nbits_kernels": self.nbits_kernels,
            "float_matmuls": self.float_matmuls,
            "qlinear_elementwise": self.qlinear_elementwise,
            "convolutions": self.convolutions,
            "unfused_qdq": self.unfused_qdq,
            "qdq_groups": {
                "total": len(self.qdq_groups),
                "fused": len(self.fused_qdq_groups),
                "unfused": self.unfused_qdq_groups,
            },
            "flops": self.flops,
            "kernel_time_us": self.kernel_time_us,
            "optimized_model_saved": self.optimized_model_saved,
            "notes": list(self.notes),
        }
        if include_nodes:
            d["nodes"] = [n.to_dict() for n in self.nodes]
        return d


def has_qdq(model: onnx.ModelProto) -> bool:
    """Whether the graph holds QuantizeLinear / DequantizeLinear nodes (TensorRT then needs INT8 enabled)."""
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def _category(op_type: str, domain: str) -> str:
    if op_type in INTEGER_KERNELS:
        return "int8"
    if op_type in NBITS_KERNELS:
        return "nbits"
    if op_type in FLOAT_MATMUL_KERNELS:
        return "float_matmul"
    if op_type in QDQ_OPS:
        return "qdq"
    if op_type.startswith("Memcpy"):
        return "memcpy"
    return "other"


def _shape_of(entry: Mapping[str, Any] | None) -> list[int] | None:
    if not entry:
        return None
    shape = next(iter(entry.values()))
    return [int(d) for d in shape] if isinstance(shape, list) else None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _node_flops(
    node: onnx.NodeProto,
    in_shapes: list[list[int] | None],
    out_shape: list[int] | None,
    weight_shapes: Mapping[str, list[int]],
) -> int | None:
    """FLOPs (2 per multiply-add) of a MatMul/Gemm/Conv-like node from profiled activation shapes.

    Weight inputs are read from the graph's initializers: profiled weight shapes can be those of a
    pre-packed buffer.
    """
    op = node.op_type
    if op not in _AB_INDEX or out_shape is None:
        return None
    a_idx, b_idx = _AB_INDEX[op]
    a = in_shapes[a_idx] if a_idx < len(in_shapes) else None
    w_name = node.input[b_idx] if b_idx < len(node.input) else ""
    w = weight_shapes.get(w_name)
    out_elems = int(np.prod(out_shape)) if out_shape else 1
    if op in _CONV_OPS:
        if w is None or len(w) < 2:
            return None
        return 2 * out_elems * int(np.prod(w[1:]))
    if op in ("ConvTranspose", "QLinearConvTranspose"):
        if w is None or a is None:
            return None
        return 2 * int(np.prod(a)) * int(np.prod(w[1:]))
    if op in ("Attention", "QAttention"):
        if a is None or w is None:
            return None
        return 2 * int(np.prod(a[:-1])) * a[-1] * w[-1]
    if op == "MatMulNBits":
        k = _attr(node, "K")
        if k is None and a is not None:
            k = a[-1]
        return 2 * out_elems * int(k) if k else None
    if a is None or not a:
        return None
    trans_a = bool(_attr(node, "transA", 0))
    k = a[-2] if trans_a and len(a) >= 2 else a[-1]
    return 2 * out_elems * int(k)


def _source_name(name: str) -> str:
    return _TOKEN_SUFFIX.sub("", name)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _is_weight(name: str, inits: set[str], producers: Mapping[str, onnx.NodeProto], depth: int = 0) -> bool:
    """A constant: an initializer, or one reached through DequantizeLinear / Transpose / Reshape / Cast."""
    if name in inits:
        return True
    node = producers.get(name)
    if node is None or depth > 4:
        return False
    if node.op_type == "Constant":
        return True
    if node.op_type in ("DequantizeLinear", "Transpose", "Reshape", "Cast", "Identity", "Unsqueeze"):
        return bool(node.input) and _is_weight(node.input[0], inits, producers, depth + 1)
    return False


def _source_shape(name: str, shapes: Mapping[str, list[int]], producers: Mapping[str, onnx.NodeProto],
                  depth: int = 0) -> list[int] | None:
    """Shape of a constant reached through shape-preserving DequantizeLinear / Identity / Cast nodes."""
    if name in shapes:
        return shapes[name]
    node = producers.get(name)
    if node is None or depth > 4 or node.op_type not in ("DequantizeLinear", "Identity", "Cast") or not node.input:
        return None
    return _source_shape(node.input[0], shapes, producers, depth + 1)


def _qdq_groups(model: onnx.ModelProto) -> list[str]:
    """Names of compute nodes whose inputs come from DequantizeLinear: the QDQ groups to fuse."""
    producers = _producers(model.graph)
    groups = []
    for n in model.graph.node:
        if n.op_type in QDQ_OPS:
            continue
        if n.op_type not in MATMUL_LIKE_SOURCE and n.op_type not in _QLINEAR_SOURCE:
            continue
        from_dq = [producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input if i]
        # a QLinear element-wise group needs every input dequantized (an Add of a float bias is no group)
        if any(from_dq) if n.op_type in MATMUL_LIKE_SOURCE or n.op_type == "Gather" else all(from_dq):
            groups.append(n.name or f"<{n.op_type}>")
    return groups


def _profile_node_events(profile_path: str) -> dict[str, dict[str, Any]]:
    """Node events of the last ``model_run`` in an onnxruntime profile, keyed by node name."""
    with open(profile_path, encoding="utf-8") as fh:
        events = json.load(fh)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else -1
    nodes: dict[str, dict[str, Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        if e.get("ts", 0) < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        args = e.get("args", {})
        rec = nodes.setdefault(
            name,
            {
                "op_type": args.get("op_name"),
                "provider": args.get("provider"),
                "input_type_shape": args.get("input_type_shape", []),
                "output_type_shape": args.get("output_type_shape", []),
                "dur": 0.0,
            },
        )
        rec["dur"] += float(e.get("dur", 0))
    return nodes


def inspect_placement(
    model_path: str | os.PathLike,
    provider: str = "cpu",
    sample_feeds: Mapping[str, np.ndarray] | None = None,
    *,
    intra_op_num_threads: int = 2,
    runs: int = 2,
) -> Placement:
    """Run ``model_path`` once or twice on ``provider`` and report what ONNX Runtime actually executed.

    The session is created with ``optimized_model_filepath`` (the graph after ONNX Runtime's fusions, e.g.
    QDQ groups -> ``QLinearMatMul``) and profiling on; the last run's profile gives, for every node, the
    provider that ran it and its activation shapes, from which MatMul/Gemm/Conv FLOPs are estimated.

    Args:
        model_path: an ``.onnx`` file or an exported folder.
        provider: ``cpu``, ``cuda`` or ``tensorrt``.
        sample_feeds: one batch of inputs (FLOPs are counted at this batch). Without it no node runs and only
            the optimized graph is described.
        intra_op_num_threads: threads of the session.
        runs: runs before the profiled one is read (the last is used).

    Returns:
        :class:`Placement`. ``Placement.integer_node_names`` are the nodes that became integer or low-bit
        kernels; ``Placement.unfused_qdq_groups`` the source nodes fed by DequantizeLinear that did not.

    Raises:
        ModelError: the model cannot be loaded on the CPU provider.
        ValidationFailed: ``provider`` is not available or cannot run the model.
    """
    key = normalize_provider(provider)
    ok, reason = provider_availability(key)
    if not ok:
        raise ValidationFailed(f"cannot inspect placement on {key}: {reason}")
    path = resolve_model_path(model_path)
    source = load_graph(path)  # names and shapes: the session reads the weights from the file
    placement = Placement(provider=EXECUTION_PROVIDERS[key], source_nodes=len(source.graph.node))
    placement.qdq_groups = _qdq_groups(source)
    placement.source_convs = sum(1 for n in source.graph.node if n.op_type in _CONV_OPS)
    settings = SessionSettings(threads=intra_op_num_threads)
    with tempfile.TemporaryDirectory(prefix="ortq-placement-") as tmp:
        opt_path = os.path.join(tmp, "optimized.onnx")
        prefix = os.path.join(tmp, "profile")
        common = {
            "provider": key, "settings": settings, "int8_qdq": has_qdq(source), "trt_cache_dir": tmp,
            "profile_prefix": prefix, "what": str(path),
        }
        try:
            sess = create_session(path, optimized_model_path=opt_path, **common)
        except ProviderFailed as exc:
            # Compiling providers (TensorRT) cannot serialize their fused nodes: retry without saving.
            try:
                sess = create_session(path, **common)
            except ProviderFailed:
                raise ValidationFailed(str(exc)) from exc
            placement.notes.append("the optimized graph could not be saved on this provider (compiled nodes)")
        placement.execution_providers = list(sess.get_providers())
        profile_nodes: dict[str, dict[str, Any]] = {}
        if sample_feeds is not None:
            for _ in run_batches(sess, [sample_feeds] * max(1, runs), what="the placement sample batch"):
                pass
        profile_file = sess.end_profiling()
        if sample_feeds is not None:
            profile_nodes = _profile_node_events(profile_file)
        else:
            placement.notes.append("no sample feeds: providers and FLOPs unknown (nothing ran)")
        del sess
        release_freed_memory()
        if os.path.isfile(opt_path):
            placement.optimized_model_saved = True
            graph_model = onnx.load(opt_path, load_external_data=False)
        else:
            graph_model = source
        _fill_nodes(placement, graph_model, source, profile_nodes)
    if placement.opaque:
        placement.notes.append(
            "TensorRT compiles subgraphs into engines: per-layer precision is not visible through onnxruntime, "
            "so the int8 FLOP share is unknown (check the engine with trtexec --verbose)"
        )
    return placement


def _fill_nodes(
    placement: Placement,
    graph_model: onnx.ModelProto,
    source: onnx.ModelProto,
    profile_nodes: Mapping[str, Mapping[str, Any]],
) -> None:
    g = graph_model.graph
    weight_shapes = {t.name: list(t.dims) for t in g.initializer}
    for t in source.graph.initializer:
        weight_shapes.setdefault(t.name, list(t.dims))
    inits = set(weight_shapes)
    producers = _producers(g)
    seen: set[str] = set()
    for node in g.node:
        prof = profile_nodes.get(node.name)
        seen.add(node.name)
        np_ = NodePlacement(
            name=node.name,
            op_type=node.op_type,
            domain=node.domain,
            provider=prof.get("provider") if prof else None,
            category=_category(node.op_type, node.domain),
            kernel_us=float(prof["dur"]) if prof else None,
        )
        if node.op_type in _AB_INDEX and prof:
            in_shapes = [_shape_of(x) for x in prof.get("input_type_shape", [])]
            outs = prof.get("output_type_shape", [])
            b_idx = _AB_INDEX[node.op_type][1]
            w_name = node.input[b_idx] if b_idx < len(node.input) else ""
            if w_name and w_name not in weight_shapes:
                # a float kernel reading a dequantized weight: the DequantizeLinear's initializer, else the
                # profiled shape (a float kernel's weight input is the plain tensor)
                shape = _source_shape(w_name, weight_shapes, producers)
                if shape is None and np_.category == "float_matmul" and b_idx < len(in_shapes):
                    shape = in_shapes[b_idx]
                if shape is not None:
                    weight_shapes[w_name] = shape
            np_.flops = _node_flops(node, in_shapes, _shape_of(outs[0]) if outs else None, weight_shapes)
            np_.weight_matmul = b_idx < len(node.input) and _is_weight(node.input[b_idx], inits, producers)
        placement.nodes.append(np_)
    # Nodes that exist only in the running session (compiled TensorRT / fused kernels not in the saved graph).
    for name, prof in profile_nodes.items():
        if name in seen:
            continue
        op = str(prof.get("op_type") or "")
        placement.nodes.append(
            NodePlacement(
                name=name,
                op_type=op,
                provider=prof.get("provider"),
                category=_category(op, ""),
                kernel_us=float(prof.get("dur", 0.0)),
            )
        )


