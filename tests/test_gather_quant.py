"""Embedding Gather -> GatherBlockQuantized, alone and tied to an lm_head MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortq.config import WeightOnlyConfig
from ortq.passes import weight_sites
from ortq.passes._int4 import BlockQuantized, on_grid, unpack
from ortq.passes.matmul_nbits import quantize_weight_only

V, D = 300, 64


def _model(table: np.ndarray, tied: bool):
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed")]
    inits = [numpy_helper.from_array(table, "E")]
    outputs = [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", D])]
    if tied:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(table.T), "E_T"))
        nodes.append(helper.make_node("MatMul", ["h", "E_T"], ["logits"], name="lm_head"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", V]))
    graph = helper.make_graph(
        nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _run(proto, ids):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids})


def _quantize(proto, config):
    model, report = quantize_weight_only(ir.from_proto(proto), config)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    return out, report


def _init(proto, name):
    """An initializer by name; a float16 one read through its Cast (``float16_scales``) as float32."""
    inits = {t.name: t for t in proto.graph.initializer}
    if name not in inits:
        return numpy_helper.to_array(inits[name + "_f16"]).astype(np.float32)
    return numpy_helper.to_array(inits[name])


def _gbq_reference(proto) -> np.ndarray:
    node = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bits, bs = attrs["bits"], attrs["block_size"]
    assert attrs["gather_axis"] == 0 and attrs["quantize_axis"] == 1
    producers = {o: n for n in proto.graph.node for o in n.output}
    if node.input[0] in producers:  # shared with MatMulNBits through a Reshape of its B
        b = _init(proto, producers[node.input[0]].input[0])
        data = b.reshape(b.shape[0], -1)
    else:
        data = _init(proto, node.input[0])
    scales = _init(proto, node.input[2])
    nb = scales.shape[1]
    d = data.shape[1] * 8 // bits
    q = unpack(data, bits, d)
    q = np.concatenate([q, np.zeros((q.shape[0], nb * bs - d), np.uint8)], axis=1)
    zp = unpack(_init(proto, node.input[3]), bits, nb) if len(node.input) > 3 and node.input[3] else None
    return BlockQuantized(q=q, scales=scales, zero_points=zp, bits=bits, block_size=bs, k=d).dequantize()


@pytest.fixture(autouse=True)
def _small_tables(monkeypatch):
    monkeypatch.setattr(weight_sites, "MIN_EMBEDDING_ELEMENTS", 1024)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_gather_block_quantized_equals_numpy_reference(symmetric, block_size):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, D)).astype(np.float32)
    qproto, report = _quantize(
        _model(table, tied=False), WeightOnlyConfig(block_size=block_size, symmetric=symmetric)
    )
    assert [n.op_type for n in qproto.graph.node] == ["GatherBlockQuantized"]
    assert not any(t.name == "E" for t in qproto.graph.initializer)
    ids = rng.integers(0, V, (3, 7))
    ref = _gbq_reference(qproto)
    np.testing.assert_array_equal(_run(qproto, ids)[0], ref[ids])
    (entry,) = report["nodes"]
    assert entry["op"] == "GatherBlockQuantized" and entry["bits"] == 4
    assert entry["bytes_after"] < entry["bytes_before"] / 5
    assert np.sqrt(np.square(ref - table).mean()) < 0.15 * table.std()


@pytest.mark.parametrize("symmetric", [False, True])
def test_on_grid_table_roundtrips_exactly(symmetric):
    rng = np.random.default_rng(1)
    table = on_grid(np.zeros((V, D)), 4, 32, symmetric, rng)
    qproto, _ = _quantize(_model(table, tied=False), WeightOnlyConfig(symmetric=symmetric))
    ids = rng.integers(0, V, (2, 9))
    np.testing.assert_array_equal(_run(qproto, ids)[0], table[ids])


def test_small_tables_stay_float(monkeypatch):
    monkeypatch.setattr(weight_sites, "MIN_EMBEDDING_ELEMENTS", V * D + 1)
    table = np.ones((V, D), np.float32)
    qproto, report = _quantize(_model(table, tied=False), WeightOnlyConfig())
    assert [n.op_type for n in qproto.graph.node] == ["Gather"]
    assert "small" in report["float_nodes"]["embed"]


def test_tied_embedding_and_lm_head_share_one_copy():
    rng = np.random.default_rng(2)
    table = on_grid(np.zeros((V, D)), 8, 64, True, rng)  # an 8-bit symmetric grid, as for a Q8_0 table
    proto = _model(table, tied=True)
    qproto, report = _quantize(proto, WeightOnlyConfig(accuracy_level=None))
    ops = sorted(n.op_type for n in qproto.graph.node)
    assert ops == ["Cast", "GatherBlockQuantized", "MatMulNBits", "Reshape"]  # Cast: the float16 scales
    (entry,) = report["nodes"]
    assert entry["bits"] == 8 and entry["symmetric"] and entry["tied_gathers"] == ["embed"]
    assert entry["weight_rel_rmse"] == 0.0
    big = [t for t in qproto.graph.initializer if numpy_helper.to_array(t).size >= V * D // 2]
    assert len(big) == 1  # the codes are stored once
    ids = rng.integers(0, V, (2, 5))
    h, logits = _run(qproto, ids)
    np.testing.assert_array_equal(h, table[ids])
    np.testing.assert_allclose(logits, table[ids] @ table.T, rtol=1e-5, atol=1e-4)


def test_tied_4bit_when_not_sensitive():
    rng = np.random.default_rng(3)
    table = rng.standard_normal((V, D)).astype(np.float32)
    qproto, report = _quantize(
        _model(table, tied=True), WeightOnlyConfig(auto_int8_sensitive=False, accuracy_level=None)
    )
    (entry,) = report["nodes"]
    assert entry["bits"] == 4 and entry["tied_gathers"] == ["embed"]
    ids = rng.integers(0, V, (2, 5))
    h, logits = _run(qproto, ids)
    deq = _gbq_reference(qproto)
    np.testing.assert_array_equal(h, deq[ids])
    np.testing.assert_allclose(logits, deq[ids] @ deq.T, rtol=1e-4, atol=1e-4)


def test_embeddings_pass_replaces_the_table_and_reports():
    from ortq.calibrators.base import TensorRange
    from ortq.config import QuantizationConfig
    from ortq.passes.embeddings import EmbeddingsPass
    from ortq.passes.plan import make_plan

    rng = np.random.default_rng(5)
    table = rng.normal(size=(1024, 64)).astype(np.float32)
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[B, S] ids) => (float[B, S, 64] y) {
            y = Gather(table, ids)
        }
        """
    )
    proto.graph.initializer.append(numpy_helper.from_array(table, "table"))
    model = ir.from_proto(proto)
    plan = make_plan(model, QuantizationConfig(), {"x": TensorRange(-1.0, 1.0, 1, 0)})
    embed = EmbeddingsPass(plan, bits=8)
    assert embed(model).modified
    assert embed.report == {"gathers": 1, "bits": 8, "block_size": 32}
    assert [n.op_type for n in model.graph] == ["GatherBlockQuantized"] and "table" not in model.graph.initializers
    ids = rng.integers(0, 1024, size=(2, 5))
    out = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(out.run(None, {"ids": ids})[0], table[ids], atol=0.05)


def test_tied_4bit_lm_head_uses_gptq_and_the_gather_reads_its_codes():
    rng = np.random.default_rng(4)
    table = rng.standard_normal((V, D)).astype(np.float32)
    x = rng.standard_normal((512, D)) * np.exp(rng.normal(0, 1.0, D))  # uneven channel energies
    hessians = {"h": (x.T @ x).astype(np.float64)}
    config = WeightOnlyConfig(auto_int8_sensitive=False, accuracy_level=None, sensitive_budget=0.0)
    model, report = quantize_weight_only(ir.from_proto(_model(table, tied=True)), config, hessians=hessians)
    (entry,) = report["nodes"]
    assert entry["algorithm"] == "gptq" and entry["tied_gathers"] == ["embed"] and entry["bits"] == 4
    _, rtn = quantize_weight_only(ir.from_proto(_model(table, tied=True)),
                                  WeightOnlyConfig(auto_int8_sensitive=False, accuracy_level=None,
                                                   sensitive_budget=0.0, algorithm="rtn"), hessians=hessians)
    assert entry["output_rel_rmse"] < rtn["nodes"][0]["output_rel_rmse"]
    qproto = ir.to_proto(model)
    onnx.checker.check_model(qproto)
    ids = rng.integers(0, V, (2, 5))
    h, logits = _run(qproto, ids)
    deq = _gbq_reference(qproto)
    np.testing.assert_array_equal(h, deq[ids])
    np.testing.assert_allclose(logits, deq[ids] @ deq.T, rtol=1e-4, atol=1e-4)
