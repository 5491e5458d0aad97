"""Validate a quantized model against its fp32 reference on ONNX Runtime execution providers.

For every requested provider (``cpu``, ``cuda``, ``tensorrt``) that can run here, both models see the same
held-out batches and the report records

* fidelity: per-sample cosine (mean and worst), max / mean abs error and SQNR of every float output, and a
  task-level figure (top-k neighbour agreement for embeddings, argmax agreement for classifiers, perplexity
  delta for language models); off the CPU, the parity of each model with its own CPU outputs;
* latency: warm-up, then fp32 and quantized alternated (A B A B) on one batch: median, p90, throughput and
  the quantized / fp32 ratio, with the thread count used;
* placement (:func:`inspect_placement`): which provider ran each node of the optimized graph, which QDQ
  groups became integer kernels, the Q/DQ nodes left over, and the share of MatMul/Gemm/Conv FLOPs that ran
  in int8.

Providers that cannot run are recorded as skipped with the reason; ``require`` turns that into
:class:`ortq.errors.ValidationFailed`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ortq.errors import CalibrationDataError, ConfigError, ModelError, ValidationFailed
from ortq.io import resolve_model_path
from ortq.report import Thresholds, ValidationReport

logger = logging.getLogger(__name__)

__all__ = [
    "INTEGER_KERNELS",
    "NBITS_KERNELS",
    "Placement",
    "NodePlacement",
    "Thresholds",
    "ValidationReport",
    "argmax_agreement",
    "cosine_similarity",
    "inspect_placement",
    "max_abs_error",
    "normalize_provider",
    "provider_availability",
    "sqnr_db",
    "topk_neighbour_agreement",
    "validate",
]

EXECUTION_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_ALIASES = {"trt": "tensorrt", "gpu": "cuda"}
TASKS = ("embeddings", "classification", "causal-lm", "none")

# Kernels that compute MatMul/Gemm/Conv/attention projections on 8-bit integers.
INTEGER_KERNELS = frozenset(
    {
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QGemm",
        "QLinearConv",
        "QLinearConvTranspose",
        "ConvInteger",
        "QAttention",
        "QOrderedMatMul",
        "QOrderedAttention",
        "QOrderedLongformerAttention",
        "DynamicQuantizeLSTM",
        "QEmbedLayerNormalization",
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
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearConcat",
        "QLinearWhere",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearReduceMean",
        "QGemm",
    }
)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
MATMUL_LIKE_SOURCE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention"})

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
_CONV_OPS = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "ConvInteger", "QLinearConv"})


# ------------------------------------------------------------------------------------------------- metrics


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two tensors, flattened, in float64. Two zero tensors give 1.0."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"cosine_similarity: shapes differ {np.shape(a)} vs {np.shape(b)}")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    if nx == 0.0 and ny == 0.0:
        return 1.0
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float(np.clip(np.dot(x, y) / (nx * ny), -1.0, 1.0))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - test)^2))`` in dB.

    ``inf`` when the two are identical; ``-inf`` when the reference is all zeros but the test is not.
    """
    r = np.asarray(reference, dtype=np.float64)
    t = np.asarray(test, dtype=np.float64)
    return _sqnr_from_sums(float(np.sum(r * r)), float(np.sum((r - t) ** 2)))


def _sqnr_from_sums(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute element-wise difference."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return float(d.max()) if d.size else 0.0


def argmax_agreement(reference_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """Share of rows whose argmax over the last axis is the same."""
    r = np.asarray(reference_logits).argmax(axis=-1)
    t = np.asarray(test_logits).argmax(axis=-1)
    return float(np.mean(r == t)) if r.size else 1.0


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0.0, 1.0, n)


def topk_neighbour_agreement(reference: np.ndarray, test: np.ndarray, k: int = 5) -> float:
    """Mean overlap of the k nearest neighbours (cosine, self excluded) of each row, reference vs test.

    1.0 means every sample keeps exactly the same k neighbours within the set; this is what a retrieval
    index built on the quantized embeddings would return differently.

    Args:
        reference: ``[n, d]`` embeddings from the fp32 model.
        test: ``[n, d]`` embeddings from the quantized model, same rows.
        k: neighbours per row; capped at ``n - 1``.
    """
    ref = _normalize_rows(reference)
    tst = _normalize_rows(test)
    n = ref.shape[0]
    if ref.shape != tst.shape:
        raise ValueError(f"topk_neighbour_agreement: shapes differ {ref.shape} vs {tst.shape}")
    k = min(int(k), n - 1)
    if k < 1:
        return 1.0

    def neighbours(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        # Stable order: ties broken by index so identical inputs give identical sets.
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    nr, nt = neighbours(ref), neighbours(tst)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(nr, nt, strict=True)]
    return float(np.mean(overlap))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def next_token_nll(logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods and the number of predicted tokens.

    Position ``t`` predicts ``input_ids[t + 1]``; pairs where either token is padding are skipped. Computed
    one sample at a time to keep memory flat for large vocabularies.
    """
    total, count = 0.0, 0
    b, s = input_ids.shape[:2]
    mask = np.ones((b, s), dtype=bool) if attention_mask is None else attention_mask.astype(bool)
    for i in range(b):
        valid = mask[i, :-1] & mask[i, 1:]
        if not valid.any():
            continue
        lp = _log_softmax(logits[i, :-1][valid])
        targets = input_ids[i, 1:][valid]
        total -= float(lp[np.arange(len(targets)), targets].sum())
        count += int(valid.sum())
    return total, count


# ------------------------------------------------------------------------------------------- providers


def normalize_provider(name: str) -> str:
    """``cpu`` / ``cuda`` / ``tensorrt`` (``trt``) or a full ``...ExecutionProvider`` name -> the short key."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in EXECUTION_PROVIDERS:
        return key
    for short, full in EXECUTION_PROVIDERS.items():
        if key == full.lower():
            return short
    raise ConfigError(f"unknown provider {name!r}; choose from: {', '.join(EXECUTION_PROVIDERS)}")


def provider_availability(name: str) -> tuple[bool, str | None]:
    """Whether this onnxruntime build offers the provider, and why not."""
    import onnxruntime as ort

    key = normalize_provider(name)
    ep = EXECUTION_PROVIDERS[key]
    available = ort.get_available_providers()
    if ep in available:
        return True, None
    if key == "cpu":  # pragma: no cover - every build has it
        return False, "CPUExecutionProvider missing from this onnxruntime build"
    hint = "pip install 'ortq[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU and CUDA/cuDNN"
    if key == "tensorrt":
        hint += " and TensorRT libraries on LD_LIBRARY_PATH"
    return False, f"{ep} is not in this onnxruntime build ({ort.__version__}: {', '.join(available)}); {hint}"


def _provider_chain(key: str, *, quantized: bool, has_qdq: bool, cache_dir: str | None) -> tuple[list, list]:
    """Providers and options for a session on ``key``; GPU providers keep CPU as the fallback."""
    cuda_opts = {"device_id": 0, "cudnn_conv_algo_search": "DEFAULT"}
    if key == "cpu":
        return ["CPUExecutionProvider"], [{}]
    if key == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], [cuda_opts, {}]
    trt_opts: dict[str, Any] = {"device_id": 0, "trt_fp16_enable": False}
    if quantized and has_qdq:
        # Explicit (QDQ) quantization: TensorRT honours the Q/DQ scales; INT8 must be enabled in the builder.
        trt_opts["trt_int8_enable"] = True
    if cache_dir:
        trt_opts.update(
            {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir, "trt_timing_cache_enable": True}
        )
    return (
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        [trt_opts, cuda_opts, {}],
    )


class _ProviderFailed(Exception):
    """A provider is listed by onnxruntime but could not be used for this model."""


def _session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Idle worker threads must not spin: two sessions alternate on the same cores, and a spinning pool of
    # one would be timed as the other's latency.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _make_session(
    path: Path,
    key: str,
    *,
    threads: int,
    quantized: bool,
    has_qdq: bool,
    cache_dir: str | None = None,
    optimized_model_path: str | None = None,
    profile_prefix: str | None = None,
):
    import onnxruntime as ort

    so = _session_options(threads)
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers, options = _provider_chain(key, quantized=quantized, has_qdq=has_qdq, cache_dir=cache_dir)
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers, provider_options=options)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if key == "cpu":
            raise ModelError(f"{path}: onnxruntime cannot load the model ({msg})") from exc
        raise _ProviderFailed(f"{EXECUTION_PROVIDERS[key]} could not create a session: {msg}") from exc
    if EXECUTION_PROVIDERS[key] not in sess.get_providers():
        raise _ProviderFailed(
            f"{EXECUTION_PROVIDERS[key]} could not be initialised (missing CUDA/cuDNN/TensorRT libraries?); "
            f"onnxruntime fell back to {', '.join(sess.get_providers())}"
        )
    return sess


# ------------------------------------------------------------------------------------------- placement


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

    def _count(self, category: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            if n.category == category:
                out[n.op_type] = out.get(n.op_type, 0) + 1
        return dict(sorted(out.items()))

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
        out: dict[str, int] = {}
        for n in self.nodes:
            if n.op_type in QLINEAR_ELEMENTWISE and n.category != "int8":
                out[n.op_type] = out.get(n.op_type, 0) + 1
        return dict(sorted(out.items()))

    @property
    def unfused_qdq(self) -> dict[str, int]:
        """QuantizeLinear / DequantizeLinear nodes left in the optimized graph."""
        return self._count("qdq")

    @property
    def integer_node_names(self) -> set[str]:
        """Names of the nodes that run as integer or low-bit kernels (for the quantization planner)."""
        return {n.name for n in self.nodes if n.category in ("int8", "nbits")}

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
        return sum(
            n.flops or 0
            for n in self.nodes
            if n.category in categories and (n.weight_matmul or not weight_only)
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


def _qdq_groups(model: onnx.ModelProto) -> list[str]:
    """Names of compute nodes whose inputs come from DequantizeLinear: the QDQ groups to fuse."""
    producers = _producers(model.graph)
    groups = []
    for n in model.graph.node:
        if n.op_type in QDQ_OPS:
            continue
        if n.op_type not in MATMUL_LIKE_SOURCE and n.op_type not in ("Gather",):
            continue
        if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input):
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
    source = onnx.load(str(path), load_external_data=False)
    has_qdq = any(n.op_type in QDQ_OPS for n in source.graph.node)
    placement = Placement(provider=EXECUTION_PROVIDERS[key], source_nodes=len(source.graph.node))
    placement.qdq_groups = _qdq_groups(source)
    with tempfile.TemporaryDirectory(prefix="ortq-placement-") as tmp:
        opt_path = os.path.join(tmp, "optimized.onnx")
        prefix = os.path.join(tmp, "profile")
        try:
            sess = _make_session(
                path,
                key,
                threads=intra_op_num_threads,
                quantized=True,
                has_qdq=has_qdq,
                cache_dir=tmp,
                optimized_model_path=opt_path,
                profile_prefix=prefix,
            )
        except _ProviderFailed as exc:
            if key == "cpu":
                raise
            # Compiling providers (TensorRT) cannot serialize their fused nodes: retry without saving.
            try:
                sess = _make_session(
                    path, key, threads=intra_op_num_threads, quantized=True, has_qdq=has_qdq,
                    cache_dir=tmp, profile_prefix=prefix,
                )
            except _ProviderFailed:
                raise ValidationFailed(str(exc)) from exc
            placement.notes.append("the optimized graph could not be saved on this provider (compiled nodes)")
        placement.execution_providers = list(sess.get_providers())
        profile_nodes: dict[str, dict[str, Any]] = {}
        if sample_feeds is not None:
            names = [i.name for i in sess.get_inputs()]
            feed = {k: v for k, v in sample_feeds.items() if k in names}
            for _ in range(max(1, runs)):
                sess.run(None, feed)
        profile_file = sess.end_profiling()
        if sample_feeds is not None:
            profile_nodes = _profile_node_events(profile_file)
        else:
            placement.notes.append("no sample feeds: providers and FLOPs unknown (nothing ran)")
        del sess
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
            np_.flops = _node_flops(node, in_shapes, _shape_of(outs[0]) if outs else None, weight_shapes)
            b_idx = _AB_INDEX[node.op_type][1]
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


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class _Model:
    path: Path
    folder: Path | None
    proto: onnx.ModelProto


def _load(model: str | os.PathLike, what: str) -> _Model:
    p = Path(model)
    path = resolve_model_path(p)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    folder = p if p.is_dir() else None
    if folder is None and _has_tokenizer(path.parent):
        folder = path.parent
    return _Model(path, folder, proto)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json"))


def _vocab_size(model: onnx.ModelProto, input_name: str) -> int | None:
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("Gather", "GatherBlockQuantized") and len(n.input) > 1 and n.input[1] == input_name:
            dims = inits.get(n.input[0])
            if dims:
                return int(dims[0])
    return None


def synthetic_batches(
    model: onnx.ModelProto, *, batch_size: int, num_samples: int, seq_len: int = 32, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Seeded random feeds that fit ``model``'s inputs: token ids below the embedding size, a padding mask
    with varied lengths, zeros for ``token_type_ids``, standard normal floats elsewhere."""
    from ortq.data import graph_inputs

    rng = np.random.default_rng(seed)
    specs = graph_inputs(model)
    shapes = {}
    for vi in model.graph.input:
        if vi.name in specs:
            dims = vi.type.tensor_type.shape.dim
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    batches = []
    left = num_samples
    while left > 0:
        b = min(batch_size, left)
        lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=b)
        lengths[0] = seq_len
        mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        feed = {}
        for name, spec in specs.items():
            shape = []
            for i, d in enumerate(shapes.get(name, [])):
                shape.append(d if d else (b if i == 0 else seq_len))
            lname = name.lower()
            if np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_:
                if "mask" in lname:
                    arr = mask if list(mask.shape) == shape else np.ones(shape, dtype=np.int64)
                elif "type" in lname or "position" in lname:
                    arr = (
                        np.broadcast_to(np.arange(shape[-1]), shape).copy()
                        if "position" in lname
                        else np.zeros(shape, dtype=np.int64)
                    )
                else:
                    vocab = _vocab_size(model, name) or 1000
                    arr = rng.integers(0, vocab, size=shape)
                    if list(mask.shape) == shape:
                        arr = np.where(mask.astype(bool), arr, 0)
                feed[name] = arr.astype(spec.dtype)
            else:
                feed[name] = rng.standard_normal(shape).astype(spec.dtype)
        batches.append(feed)
        left -= b
    return batches


def _batches(
    data: Any, ref: _Model, *, batch_size: int, num_samples: int
) -> tuple[list[dict[str, np.ndarray]], str]:
    from ortq.data import load_batches, real_text

    if data is None:
        if ref.folder is not None and _has_tokenizer(ref.folder):
            texts = real_text("heldout", num_samples)
            batches = load_batches(
                texts, model=ref.proto, tokenizer=ref.folder, batch_size=batch_size, num_samples=num_samples
            )
            return list(batches), f"real held-out text ({len(texts)} sentences, ortq.data.real_text('heldout'))"
        logger.warning(
            "no validation data and no tokenizer beside %s: using seeded random inputs; pass data= for a "
            "meaningful fidelity figure",
            ref.path,
        )
        return (
            synthetic_batches(ref.proto, batch_size=batch_size, num_samples=num_samples),
            "synthetic (seeded random inputs; pass --data for a meaningful figure)",
        )
    if isinstance(data, (str, os.PathLike)):
        source = f"file {data}"
    elif isinstance(data, Mapping):
        source = "arrays"
    else:
        source = "user-supplied batches"
    tokenizer = ref.folder if ref.folder is not None else None
    batches = load_batches(
        data, model=ref.proto, tokenizer=tokenizer, batch_size=batch_size, num_samples=num_samples
    )
    return list(batches), source


def _batch_len(feed: Mapping[str, np.ndarray]) -> int:
    for v in feed.values():
        return int(np.shape(v)[0]) if np.ndim(v) else 1
    return 0


# ---------------------------------------------------------------------------------------- accumulators


class _OutputStats:
    """Streaming fidelity of one output: per-sample cosine, global SQNR, abs errors."""

    def __init__(self) -> None:
        self.cosines: list[float] = []
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.sum_abs = 0.0
        self.count = 0
        self.sample_sqnr: list[float] = []

    def update(self, ref: np.ndarray, test: np.ndarray, mask: np.ndarray | None) -> None:
        ref = np.asarray(ref)
        test = np.asarray(test)
        if ref.shape != test.shape:
            raise ValidationFailed(f"output shapes differ: reference {ref.shape} vs quantized {test.shape}")
        # One sample at a time in float64: memory stays flat for [batch, seq, vocab] logits.
        for i in range(ref.shape[0] if ref.ndim else 1):
            r = ref[i] if ref.ndim else ref
            t = test[i] if test.ndim else test
            if mask is not None:
                r, t = r[mask[i]], t[mask[i]]
            r = np.asarray(r, dtype=np.float64)
            t = np.asarray(t, dtype=np.float64)
            if r.size == 0:
                continue
            self.cosines.append(cosine_similarity(r, t))
            d = r - t
            s, n = float(np.sum(r * r)), float(np.sum(d * d))
            self.sample_sqnr.append(_sqnr_from_sums(s, n))
            self.signal += s
            self.noise += n
            ad = np.abs(d)
            self.max_abs = max(self.max_abs, float(ad.max()))
            self.sum_abs += float(ad.sum())
            self.count += int(ad.size)

    def result(self) -> dict[str, Any]:
        c = np.asarray(self.cosines) if self.cosines else np.asarray([np.nan])
        return {
            "cosine_mean": float(np.mean(c)),
            "cosine_min": float(np.min(c)),
            "cosine_p01": float(np.percentile(c, 1)),
            "max_abs_error": self.max_abs,
            "mean_abs_error": self.sum_abs / self.count if self.count else None,
            "sqnr_db": _sqnr_from_sums(self.signal, self.noise),
            "sqnr_db_min": float(np.min(self.sample_sqnr)) if self.sample_sqnr else None,
            "samples": len(self.cosines),
        }


class _TaskStats:
    def __init__(self, task: str, output: str | None, k: int) -> None:
        self.task = task
        self.output = output
        self.k = k
        self.ref_emb: list[np.ndarray] = []
        self.q_emb: list[np.ndarray] = []
        self.agree = 0
        self.total = 0
        self.nll_ref = 0.0
        self.nll_q = 0.0
        self.tokens = 0

    def update(self, ref: np.ndarray, q: np.ndarray, feed: Mapping[str, np.ndarray]) -> None:
        mask = feed.get("attention_mask")
        if self.task == "embeddings":
            self.ref_emb.append(_pool(ref, mask))
            self.q_emb.append(_pool(q, mask))
        elif self.task == "classification":
            r, t = ref.argmax(-1), q.argmax(-1)
            self.agree += int(np.sum(r == t))
            self.total += int(r.size)
        elif self.task == "causal-lm":
            ids = feed.get("input_ids")
            if ids is None:
                return
            nr, cnt = next_token_nll(ref, ids, mask)
            nq, _ = next_token_nll(q, ids, mask)
            self.nll_ref += nr
            self.nll_q += nq
            self.tokens += cnt
            m = np.ones(ids.shape, dtype=bool) if mask is None else mask.astype(bool)
            for i in range(ids.shape[0]):
                valid = m[i, :-1] & m[i, 1:]
                self.agree += int(np.sum(ref[i, :-1][valid].argmax(-1) == q[i, :-1][valid].argmax(-1)))
                self.total += int(valid.sum())

    def result(self) -> dict[str, Any] | None:
        if self.task == "embeddings" and self.ref_emb:
            r, q = np.concatenate(self.ref_emb), np.concatenate(self.q_emb)
            k = min(self.k, r.shape[0] - 1)
            cos = [cosine_similarity(a, b) for a, b in zip(r, q, strict=True)]
            return {
                "task": "embeddings",
                "output": self.output,
                "metric": f"top{k}_neighbour_agreement",
                "agreement": topk_neighbour_agreement(r, q, k) if k >= 1 else None,
                "k": k,
                "embedding_cosine_mean": float(np.mean(cos)),
                "embedding_cosine_min": float(np.min(cos)),
                "samples": int(r.shape[0]),
            }
        if self.task == "classification" and self.total:
            return {
                "task": "classification",
                "output": self.output,
                "metric": "argmax_agreement",
                "agreement": self.agree / self.total,
                "samples": self.total,
            }
        if self.task == "causal-lm" and self.tokens:
            ppl_r = math.exp(self.nll_ref / self.tokens)
            ppl_q = math.exp(self.nll_q / self.tokens)
            return {
                "task": "causal-lm",
                "output": self.output,
                "metric": "next_token_top1_agreement",
                "agreement": self.agree / self.total if self.total else None,
                "perplexity_reference": ppl_r,
                "perplexity_quantized": ppl_q,
                "perplexity_delta_pct": 100.0 * (ppl_q - ppl_r) / ppl_r,
                "tokens": self.tokens,
            }
        return None


def _pool(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    h = np.asarray(hidden, dtype=np.float64)
    if h.ndim == 2:
        return h
    if mask is None or mask.shape != h.shape[:2]:
        return h.reshape(h.shape[0], -1, h.shape[-1]).mean(axis=1)
    m = mask.astype(np.float64)[..., None]
    return (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def infer_task(output_names: Sequence[str], output_shapes: Sequence[tuple[int, ...]], feed_names: Iterable[str]) -> tuple[str, str | None]:
    """Guess the task from the model's first float output: (task, output name)."""
    feeds = set(feed_names)
    for name, shape in zip(output_names, output_shapes, strict=True):
        lname = name.lower()
        rank = len(shape)
        if "logits" in lname:
            if rank == 2:
                return "classification", name
            if rank == 3 and "input_ids" in feeds:
                return "causal-lm", name
        if rank == 3 and ("hidden" in lname or "token_embeddings" in lname) and "attention_mask" in feeds:
            return "embeddings", name
        if rank == 2 and any(s in lname for s in ("embedding", "pooler", "sentence")):
            return "embeddings", name
        break  # only the primary output decides
    return "none", None


# ------------------------------------------------------------------------------------------------ latency


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def _time_run(sess, feed) -> float:
    t0 = time.perf_counter()
    sess.run(None, feed)
    return (time.perf_counter() - t0) * 1e3


def measure_latency(
    reference_session, quantized_session, feed: Mapping[str, np.ndarray], *, warmup_runs: int, runs: int
) -> dict[str, Any]:
    """Warm both sessions, then alternate reference / quantized runs (A B A B) on ``feed``.

    Returns a dict with ``reference`` and ``quantized`` stats (first run, warm-up mean, median, p90, min,
    throughput in samples/s), ``ratio`` (quantized / reference median) and ``pairwise_ratio_median``.
    """
    n = _batch_len(feed)
    first = {"reference": _time_run(reference_session, feed), "quantized": _time_run(quantized_session, feed)}
    warm = {"reference": [first["reference"]], "quantized": [first["quantized"]]}
    for _ in range(max(0, warmup_runs - 1)):
        warm["reference"].append(_time_run(reference_session, feed))
        warm["quantized"].append(_time_run(quantized_session, feed))
    times: dict[str, list[float]] = {"reference": [], "quantized": []}
    for i in range(runs):
        order = ("reference", "quantized") if i % 2 == 0 else ("quantized", "reference")
        for which in order:
            sess = reference_session if which == "reference" else quantized_session
            times[which].append(_time_run(sess, feed))
    out: dict[str, Any] = {"batch_size": n, "warmup_runs": warmup_runs, "runs": runs}
    for which in ("reference", "quantized"):
        t = times[which] or warm[which]
        med = _percentile(t, 50)
        out[which] = {
            "first_run_ms": first[which],
            "warmup_ms": float(np.mean(warm[which])),
            "median_ms": med,
            "p90_ms": _percentile(t, 90),
            "min_ms": float(np.min(t)),
            "mean_ms": float(np.mean(t)),
            "throughput_per_s": n / (med / 1e3) if med > 0 else None,
        }
    r_med, q_med = out["reference"]["median_ms"], out["quantized"]["median_ms"]
    out["ratio"] = q_med / r_med if r_med > 0 else None
    out["speedup"] = r_med / q_med if q_med > 0 else None
    pairs = [q / r for q, r in zip(times["quantized"], times["reference"], strict=True) if r > 0]
    out["pairwise_ratio_median"] = float(np.median(pairs)) if pairs else out["ratio"]
    return out


# ---------------------------------------------------------------------------------------------- validate


def _float_outputs(sess) -> list[str]:
    return [o.name for o in sess.get_outputs() if "float" in (o.type or "") or "double" in (o.type or "")]


def _model_summary(m: _Model) -> dict[str, Any]:
    ops: dict[str, int] = {}
    for n in m.proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    size = m.path.stat().st_size
    locations = {
        e.value
        for t in m.proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    for loc in locations:
        f = m.path.parent / loc
        if f.is_file():
            size += f.stat().st_size
    return {
        "path": str(m.path),
        "size_bytes": size,
        "nodes": len(m.proto.graph.node),
        "opset": next((i.version for i in m.proto.opset_import if i.domain in ("", "ai.onnx")), None),
        "op_types": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    }



def validate(
    quantized: str | os.PathLike,
    reference: str | os.PathLike,
    data: Any = None,
    *,
    providers: Sequence[str] = ("cpu",),
    require: Sequence[str] = (),
    num_samples: int = 64,
    batch_size: int = 16,
    task: str | None = None,
    thresholds: Thresholds | None = None,
    report_dir: str | os.PathLike | None = None,
    intra_op_num_threads: int = 2,
    latency_runs: int = 20,
    warmup_runs: int = 3,
    top_k: int = 5,
    placement: bool = True,
) -> ValidationReport:
    """Compare ``quantized`` with its fp32 ``reference`` on each requested execution provider.

    Args:
        quantized: the quantized model: an ``.onnx`` file or an exported folder holding ``model.onnx``.
        reference: the fp32 model, same inputs and outputs.
        data: held-out samples: None (real held-out text when a tokenizer sits beside the reference, else
            seeded random inputs), a file (``.txt``/``.jsonl``/``.csv``/``.parquet``/``.npz``), a list of
            strings, or an iterable of feed dicts. Use data the model was not calibrated on.
        providers: ``cpu``, ``cuda``, ``tensorrt`` (or full ``...ExecutionProvider`` names).
        require: providers that must run; if one cannot, :class:`ValidationFailed` is raised (exit code 1).
            Required providers are added to ``providers``.
        num_samples: held-out samples to compare.
        batch_size: samples per run; latency is measured on the first batch.
        task: ``embeddings``, ``classification``, ``causal-lm`` or ``none``; None infers it from the outputs.
        thresholds: limits whose violation makes ``report.ok`` False (see :class:`Thresholds`).
        report_dir: when given, report.json, report.md and report.png are written there (atomically).
        intra_op_num_threads: threads of every session (recorded in the report).
        latency_runs: timed runs per model after warm-up, alternated A B A B.
        warmup_runs: untimed runs per model first (the first one is reported as ``first_run_ms``).
        top_k: neighbours for the embeddings agreement.
        placement: also run :func:`inspect_placement` for both models on each provider.

    Returns:
        A :class:`ValidationReport`; ``report.violations`` lists every threshold violated and ``report.ok``
        is False when there is any. The function raises only for bad input or a missing required provider.
    """
    if num_samples < 1 or batch_size < 1:
        raise ConfigError("num_samples and batch_size must be positive integers")
    if latency_runs < 0 or warmup_runs < 1:
        raise ConfigError("latency_runs must be >= 0 and warmup_runs >= 1")
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    keys: list[str] = []
    for p in list(providers) + list(require):
        k = normalize_provider(p)
        if k not in keys:
            keys.append(k)
    required = {normalize_provider(p) for p in require}
    thresholds = thresholds or Thresholds()

    # Fail fast on a required provider that this build does not have.
    availability = {k: provider_availability(k) for k in keys}
    for k in keys:
        ok, reason = availability[k]
        if k in required and not ok:
            raise ValidationFailed(f"required provider {k} is not available: {reason}")

    q_model = _load(quantized, "quantized")
    r_model = _load(reference, "reference")
    batches, data_source = _batches(data, r_model, batch_size=batch_size, num_samples=num_samples)
    if not batches:
        raise CalibrationDataError("validation data is empty")
    has_qdq = any(n.op_type in QDQ_OPS for n in q_model.proto.graph.node)

    rows: dict[str, dict[str, Any]] = {}
    sessions: dict[str, tuple[Any, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ortq-validate-") as cache_dir:
        for k in keys:
            row: dict[str, Any] = {"name": k, "execution_provider": EXECUTION_PROVIDERS[k]}
            ok, reason = availability[k]
            if not ok:
                row.update(status="skipped", reason=reason)
                rows[k] = row
                continue
            try:
                rs = _make_session(
                    r_model.path, k, threads=intra_op_num_threads, quantized=False, has_qdq=False, cache_dir=cache_dir
                )
                qs = _make_session(
                    q_model.path, k, threads=intra_op_num_threads, quantized=True, has_qdq=has_qdq, cache_dir=cache_dir
                )
            except _ProviderFailed as exc:
                if k in required:
                    raise ValidationFailed(f"required provider {k} cannot run: {exc}") from exc
                row.update(status="skipped", reason=str(exc))
                rows[k] = row
                continue
            row.update(status="ok", reason=None, session_providers=list(qs.get_providers()))
            sessions[k] = (rs, qs)
            rows[k] = row

        task_name, task_output, out_names = _setup_outputs(sessions, batches[0], task)
        fidelity = {k: {o: _OutputStats() for o in out_names} for k in sessions}
        tasks = {k: _TaskStats(task_name, task_output, top_k) for k in sessions}
        parity = {k: {"reference": _OutputStats(), "quantized": _OutputStats()} for k in sessions if k != "cpu"}
        primary = task_output or (out_names[0] if out_names else None)
        samples = 0
        for feed in batches:
            samples += _batch_len(feed)
            mask = feed.get("attention_mask")
            cpu_out: tuple[dict, dict] | None = None
            # CPU first, so the GPU rows can be compared with its outputs.
            for k, (rs, qs) in sorted(sessions.items(), key=lambda kv: kv[0] != "cpu"):
                try:
                    ro = dict(zip([o.name for o in rs.get_outputs()], rs.run(None, _feed_for(rs, feed)), strict=True))
                    qo = dict(zip([o.name for o in qs.get_outputs()], qs.run(None, _feed_for(qs, feed)), strict=True))
                except Exception as exc:
                    if k == "cpu":
                        raise ModelError(f"onnxruntime failed to run the models on cpu: {exc}") from exc
                    raise ValidationFailed(f"{k}: run failed: {str(exc).splitlines()[0][:300]}") from exc
                for o in out_names:
                    m = _mask_for(ro[o], mask)
                    fidelity[k][o].update(ro[o], qo[o], m)
                if task_output is not None:
                    tasks[k].update(ro[task_output], qo[task_output], feed)
                if k == "cpu":
                    cpu_out = (ro, qo)
                elif cpu_out is not None and primary is not None:
                    m = _mask_for(ro[primary], mask)
                    parity[k]["reference"].update(cpu_out[0][primary], ro[primary], m)
                    parity[k]["quantized"].update(cpu_out[1][primary], qo[primary], m)

        for k, (rs, qs) in sessions.items():
            row = rows[k]
            outs = {o: s.result() for o, s in fidelity[k].items()}
            head = outs.get(primary, {}) if primary else {}
            row["fidelity"] = {
                "primary_output": primary,
                "cosine": head.get("cosine_mean"),
                "cosine_min": head.get("cosine_min"),
                "max_abs_error": head.get("max_abs_error"),
                "mean_abs_error": head.get("mean_abs_error"),
                "sqnr_db": head.get("sqnr_db"),
                "outputs": outs,
            }
            row["task"] = tasks[k].result()
            if k in parity and parity[k]["reference"].cosines:
                row["parity_vs_cpu"] = {
                    "output": primary,
                    "reference": _parity_summary(parity[k]["reference"]),
                    "quantized": _parity_summary(parity[k]["quantized"]),
                }
            if latency_runs > 0:
                feed = batches[0]
                row["latency"] = measure_latency(
                    _Bound(rs, feed), _Bound(qs, feed), feed, warmup_runs=warmup_runs, runs=latency_runs
                )
        sessions.clear()

        if placement:
            for k in list(rows):
                if rows[k].get("status") != "ok":
                    continue
                try:
                    rows[k]["placement"] = {
                        "reference": inspect_placement(
                            r_model.path, k, batches[0], intra_op_num_threads=intra_op_num_threads
                        ).to_dict(),
                        "quantized": inspect_placement(
                            q_model.path, k, batches[0], intra_op_num_threads=intra_op_num_threads
                        ).to_dict(),
                    }
                except (ValidationFailed, _ProviderFailed) as exc:
                    rows[k]["placement"] = {"error": str(exc)}

    from ortq.hostinfo import host_info

    gpu_requested = any(k != "cpu" for k in keys)
    report_data = {
        "schema": "ortq.validation-report",
        "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": {"quantized": _model_summary(q_model), "reference": _model_summary(r_model)},
        "data": {
            "source": data_source,
            "num_samples": samples,
            "batch_size": max(_batch_len(b) for b in batches),
            "num_batches": len(batches),
            "first_batch_shapes": {k: list(np.shape(v)) for k, v in batches[0].items()},
        },
        "task": task_name,
        "settings": {
            "intra_op_num_threads": intra_op_num_threads,
            "inter_op_num_threads": 1,
            "execution_mode": "sequential",
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "warmup_runs": warmup_runs,
            "latency_runs": latency_runs,
            "latency_order": "alternating A B A B on the first batch",
            "providers_requested": keys,
            "providers_required": sorted(required),
        },
        "host": host_info(gpus=gpu_requested),
        "providers": [rows[k] for k in keys],
        "thresholds": thresholds.to_dict(),
    }
    report = ValidationReport(report_data)
    if report_dir is not None:
        report.save(report_dir)
    return report


class _Bound:
    """A session whose ``run`` ignores extra feeds (the fp32 and quantized graphs may differ in inputs)."""

    def __init__(self, sess, feed: Mapping[str, np.ndarray]) -> None:
        self._sess = sess
        self._feed = _feed_for(sess, feed)

    def run(self, names, feed):
        return self._sess.run(names, self._feed)


def _feed_for(sess, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    missing = names - set(feed)
    if missing:
        raise CalibrationDataError(f"validation data lacks graph input(s): {', '.join(sorted(missing))}")
    return {k: v for k, v in feed.items() if k in names}


def _mask_for(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """Padded positions are left out of fidelity when the output is laid out [batch, seq, ...]."""
    if mask is None or np.ndim(output) < 2 or tuple(np.shape(output)[:2]) != tuple(mask.shape):
        return None
    return mask.astype(bool)


def _parity_summary(s: _OutputStats) -> dict[str, Any]:
    r = s.result()
    return {k: r[k] for k in ("cosine_mean", "cosine_min", "max_abs_error", "sqnr_db")}


def _setup_outputs(
    sessions: Mapping[str, tuple[Any, Any]], feed: Mapping[str, np.ndarray], task: str | None
) -> tuple[str, str | None, list[str]]:
    if not sessions:
        return task or "none", None, []
    rs, qs = next(iter(sessions.values()))
    q_names = set(_float_outputs(qs))
    out_names = [o for o in _float_outputs(rs) if o in q_names]
    if not out_names:
        raise ModelError(
            "the quantized and reference models share no float output name; validate models with the same outputs"
        )
    ro = rs.run(out_names[:1], _feed_for(rs, feed))
    inferred, inferred_out = infer_task(out_names[:1], [np.shape(ro[0])], feed.keys())
    if task is None:
        return inferred, inferred_out, out_names
    if task == "none":
        return "none", None, out_names
    if inferred == task:
        return task, inferred_out, out_names
    # A forced task uses the primary output.
    return task, out_names[0], out_names
