import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ortq.calibrators.base import TensorRange
from ortq.config import QuantizationConfig
from ortq.passes._int4 import on_grid, quantize_rtn
from ortq.passes.insert_qdq import insert_qdq
from ortq.passes.plan import make_plan

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[M, 64] x) => (float[M, 48] y) {
    y = MatMul(x, w)
}
"""


def _session(proto, optimized=None):
    so = ort.SessionOptions()
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_int4_codes_unpack_to_the_int8_kernel(tmp_path):
    rng = np.random.default_rng(0)
    w_nk = on_grid(rng.normal(size=(48, 64)).astype(np.float32), 4, 32, False, rng)
    bq = quantize_rtn(w_nk, bits=4, block_size=32, search=False)
    np.testing.assert_array_equal(bq.dequantize(), w_nk)  # on the 4-bit grid: exact
    w = np.ascontiguousarray(w_nk.T)  # [K, N]
    proto = onnx.parser.parse_model(MLP)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    model = ir.from_proto(proto)
    plan = make_plan(model, QuantizationConfig(), {"x": TensorRange(-4.0, 4.0, 1, 0)})
    insert_qdq(model, plan, int4_weights={"w": bq})
    qproto = ir.to_proto(model)
    onnx.checker.check_model(qproto, full_check=True)
    assert any(t.name.endswith("_int4") and t.data_type == onnx.TensorProto.UINT8 for t in qproto.graph.initializer)
    assert not any(t.data_type == onnx.TensorProto.INT8 and t.dims == [64, 48] for t in qproto.graph.initializer)
    x = rng.uniform(-4, 4, size=(8, 64)).astype(np.float32)
    got = _session(qproto, tmp_path / "opt.onnx").run(None, {"x": x})[0]
    # ONNX Runtime folded the unpacking into a constant int8 weight of the fused integer MatMul.
    ops = {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node}
    assert "MatMulIntegerToFloat" in ops and "BitShift" not in ops
    # Reference: the same int8 QDQ model built from the 4-bit values directly.
    ref_model = ir.from_proto(proto)
    ref_plan = make_plan(ref_model, QuantizationConfig(), {"x": TensorRange(-4.0, 4.0, 1, 0)})
    insert_qdq(ref_model, ref_plan)
    ref = _session(ir.to_proto(ref_model)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)



def test_int4_storage_pass_replaces_weights_and_hands_codes_to_qdq():
    from ortq.passes.insert_qdq import InsertQDQPass
    from ortq.passes.int4_storage import Int4StoragePass, int4_targets

    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model(MLP)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(size=(64, 48)).astype(np.float32), "w"))
    model = ir.from_proto(proto)
    ranges = {"x": TensorRange(-4.0, 4.0, 1, 0)}
    plan = make_plan(model, QuantizationConfig(), ranges)
    assert int4_targets(model, plan) == {"w": "x"}
    x = rng.normal(size=(256, 64))
    int4 = Int4StoragePass(plan, block_size=32, hessians={"x": x.T @ x})
    int4(model)
    assert int4.report == {"weights": 1, "algorithm": "gptq", "block_size": 32} and set(int4.codes) == {"w"}
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), int4.codes["w"].dequantize().T)
    plan = make_plan(model, QuantizationConfig(), ranges)
    InsertQDQPass(plan, int4_weights=int4.codes)(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
