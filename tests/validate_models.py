"""Tiny ONNX models for the validation tests: an MLP, a toy language model, their QDQ versions made by
onnxruntime's quantize_static (the oracle), and a model whose only QDQ group cannot fuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BATCH = 8


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def mlp(path: Path, *, out_name: str = "y", n_out: int = 16, seed: int = 0) -> Path:
    """x[b, 32] -> MatMul(32x64) -> Add -> Relu -> MatMul(64 x n_out) -> out_name."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((32, 64)) * 0.2).astype(np.float32)
    w2 = (rng.standard_normal((64, n_out)) * 0.2).astype(np.float32)
    b1 = (rng.standard_normal(64) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "B1"], ["h2"], name="add1"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "W2"], [out_name], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(b1, "B1")],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def lm(path: Path, vocab: int = 50, dim: int = 16, seed: int = 0) -> Path:
    """input_ids[b, s] -> Gather(emb) -> MatMul(dim x vocab) -> logits[b, s, vocab]."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((vocab, dim)).astype(np.float32)
    w = (rng.standard_normal((dim, vocab)) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "W"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "lm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "W")],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def qdq(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
    )
    onnx.checker.check_model(onnx.load(str(dst)))
    return dst


def weight_only_dq(src: Path, dst: Path) -> Path:
    """Only the weight of mm1 goes through an int8 DequantizeLinear; the activation stays float."""
    m = onnx.load(str(src))
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W1"))
    scale = np.float32(np.abs(w).max() / 127)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    m.graph.initializer.remove(next(t for t in m.graph.initializer if t.name == "W1"))
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(q, "W1_q"),
            numpy_helper.from_array(np.array(scale, np.float32), "W1_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "W1_zp"),
        ]
    )
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["W1_q", "W1_scale", "W1_zp"], ["W1"], name="W1_dq"))
    return save(m, dst)


def make_mlp_models(d: Path):
    rng = np.random.default_rng(1)
    calib = [{"x": rng.standard_normal((BATCH, 32)).astype(np.float32)} for _ in range(4)]
    held = [{"x": rng.standard_normal((BATCH, 32)).astype(np.float32)} for _ in range(4)]
    fp32 = mlp(d / "fp32.onnx")
    q = qdq(fp32, d / "qdq.onnx", calib)
    return fp32, q, held


def make_lm_models(d: Path):
    rng = np.random.default_rng(2)

    def batch():
        ids = rng.integers(0, 50, size=(4, 12)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, 8:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    fp32 = lm(d / "fp32.onnx")
    q = qdq(fp32, d / "qdq.onnx", [batch() for _ in range(3)])
    return fp32, q, [batch() for _ in range(3)]
