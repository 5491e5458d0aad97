"""Mixed precision by measured sensitivity: the layers whose error at 4 bits is largest per extra byte get
more bits within the byte budget, to their exact source grid when they lie on one."""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import TensorProto, numpy_helper

from ortq.config import WeightOnlyConfig
from ortq.errors import ConfigError
from ortq.passes.weight_budget import Upgrade, choose_upgrades
from tests.test_matmul_nbits import _mlp_model, _quantize, _run
from tests.test_source_grid import q4_1


def test_choose_upgrades_by_error_removed_per_byte_within_budget():
    cands = [
        Upgrade("big", error=0.2, remaining=0.0, extra_bytes=1000),  # 4e-5 per byte
        Upgrade("small", error=0.1, remaining=0.0, extra_bytes=100),  # 1e-4 per byte
        Upgrade("tiny-error", error=0.001, remaining=0.0, extra_bytes=10),  # 1e-7 per byte
        Upgrade("nothing-gained", error=0.1, remaining=0.1, extra_bytes=1),
    ]
    assert choose_upgrades(cands, 0) == []
    assert choose_upgrades(cands, 150) == ["small", "tiny-error"]  # "big" does not fit, a cheaper one still does
    assert choose_upgrades(cands, 1100) == ["small", "big"]
    assert choose_upgrades(cands, 10_000) == ["small", "big", "tiny-error"]


def _outlier_batches(rng, k=64, channel=5):
    """Activations with one channel 30x larger: the layer reading them is the sensitive one."""
    batches = []
    for _ in range(4):
        a = rng.standard_normal((4, 16, k)).astype(np.float32)
        a[..., channel] *= 30.0
        batches.append({"A": a})
    return batches


def test_budget_upgrades_the_layer_fed_by_outlier_activations_to_8_bits():
    rng = np.random.default_rng(0)
    proto, _ = _mlp_model(rng, k=64, hidden=64, bias=False)
    batches = _outlier_batches(rng)
    base = WeightOnlyConfig(accuracy_level=None, auto_int8_sensitive=False, symmetric=True)
    _, plain = _quantize(proto, base, batches)
    assert {e["bits"] for e in plain["nodes"]} == {4}
    # fc1 (fed by the outlier channel) has the larger output error at 4 bits.
    err = {e["node"]: e["output_rel_rmse"] for e in plain["nodes"]}
    assert err["fc1"] > err["fc2"]
    # Room for one more 8-bit layer (8.5 vs 5 bits per weight: 40 % of the 4-bit bytes each): fc1's.
    one = dataclasses.replace(base, sensitive_budget=0.5)
    _, report = _quantize(proto, one, batches)
    bits = {e["node"]: e["bits"] for e in report["nodes"]}
    assert bits == {"fc1": 8, "fc2": 4}
    by_node = {e["node"]: e for e in report["nodes"]}
    assert by_node["fc1"]["bits_reason"].startswith("sensitive")
    assert report["bytes_after"] > plain["bytes_after"]
    assert report["bytes_after"] <= plain["bytes_after"] * 1.5
    both = dataclasses.replace(base, sensitive_budget=2.0)
    _, report = _quantize(proto, both, batches)
    assert {e["bits"] for e in report["nodes"]} == {8}


def _mlp_with_q4_1_fc1(rng):
    """The two-layer MLP with fc1's weight on a GGUF Q4_1 grid (float block minimums)."""
    proto, _ = _mlp_model(rng, k=64, hidden=64, bias=False)
    w1 = q4_1(rng, 64, 64).T.copy()
    for t in proto.graph.initializer:
        if t.name == "W1":
            t.CopyFrom(numpy_helper.from_array(w1, "W1"))
    return proto


def test_budget_carries_a_source_grid_exactly_instead_of_8_bits():
    rng = np.random.default_rng(1)
    proto = _mlp_with_q4_1_fc1(rng)
    batches = _outlier_batches(rng)
    config = WeightOnlyConfig(accuracy_level=None, auto_int8_sensitive=False, symmetric=True,
                              keep_source_grid=False, sensitive_budget=0.3, fold_block_offsets=False)
    _, report = _quantize(proto, config, batches)
    by_node = {e["node"]: e for e in report["nodes"]}
    assert report["source_grid"]["carried"] == ["fc1"]
    assert by_node["fc1"]["weight_rel_rmse"] == 0.0 and by_node["fc1"]["bits"] == 4
    assert by_node["fc2"]["grid"] == "requantized" and by_node["fc2"]["symmetric"]
    # Without block offsets (a Q4_1 grid needs them), the same upgrade is 8 bits: no extra ops at run time.
    _, report = _quantize(proto, dataclasses.replace(config, block_offsets=False, sensitive_budget=0.6), batches)
    by_node = {e["node"]: e for e in report["nodes"]}
    assert report["source_grid"]["carried"] == []
    assert by_node["fc1"]["bits"] == 8 and by_node["fc1"]["grid"] == "requantized"
    assert "block_offsets" not in by_node["fc1"]
    # With no offset layer allowed (max_offset_layers=0), the same: the budget's next choice is 8 bits.
    capped = dataclasses.replace(config, max_offset_layers=0, sensitive_budget=0.6)
    _, report = _quantize(proto, capped, batches)
    by_node = {e["node"]: e for e in report["nodes"]}
    assert report["source_grid"]["carried"] == [] and by_node["fc1"]["bits"] == 8
    _, report = _quantize(proto, dataclasses.replace(capped, max_offset_layers=1), batches)
    assert report["source_grid"]["carried"] == ["fc1"]


def test_sensitive_budget_is_validated():
    for bad in (-0.1, "0.2", True, 5.0):
        try:
            WeightOnlyConfig(sensitive_budget=bad)
        except ConfigError:
            continue
        raise AssertionError(f"{bad!r} accepted")


def test_float16_scales_halve_the_scale_bytes_and_keep_the_answer():
    rng = np.random.default_rng(4)
    proto, _ = _mlp_model(rng, k=64, hidden=64, bias=True)
    f32 = WeightOnlyConfig(accuracy_level=None, auto_int8_sensitive=False, float16_scales=False)
    q32, r32 = _quantize(proto, f32)
    q16, r16 = _quantize(proto, dataclasses.replace(f32, float16_scales=True))
    assert {e["scales"] for e in r16["nodes"]} == {"float16"} and {e["scales"] for e in r32["nodes"]} == {"float32"}
    scale_bytes = 4 * (64 * 2 + 48 * 2)  # [N, K/32] float32 scales of fc1 and fc2
    assert r32["bytes_after"] - r16["bytes_after"] == scale_bytes // 2
    assert sum(t.data_type == TensorProto.FLOAT16 for t in q16.graph.initializer) == 2
    a = rng.standard_normal((2, 5, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(q16, {"A": a}), _run(q32, {"A": a}), rtol=2e-3, atol=2e-3)


def test_scales_outside_float16_stay_float32():
    rng = np.random.default_rng(5)
    proto, _ = _mlp_model(rng, k=64, hidden=64, bias=False)
    for t in proto.graph.initializer:
        if t.name == "W1":  # |w| ~ 1e-9: scales below float16's normal range
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1e-8), "W1"))
    _, report = _quantize(proto, WeightOnlyConfig(accuracy_level=None, auto_int8_sensitive=False))
    scales = {e["node"]: e["scales"] for e in report["nodes"]}
    assert scales == {"fc1": "float32", "fc2": "float16"}


def test_carried_q4_1_with_float16_offsets_matches_the_float_model():
    rng = np.random.default_rng(6)
    proto = _mlp_with_q4_1_fc1(rng)
    carry = WeightOnlyConfig(accuracy_level=None, auto_int8_sensitive=False, keep_source_grid=True,
                             fold_block_offsets=False)
    qproto, report = _quantize(proto, carry)
    fc1 = next(e for e in report["nodes"] if e["node"] == "fc1")
    assert fc1["grid"] == "carried" and fc1["block_offsets"] == "float16" and fc1["scales"] == "float16"
    a = rng.standard_normal((2, 5, 64)).astype(np.float32)
    ref = _run(proto, {"A": a})
    assert np.abs(_run(qproto, {"A": a}) - ref).max() < 0.1 * np.abs(ref).max()  # fc2 is requantized
    # fc1 alone (fc2 left in float) gives the float answer up to float16 offsets.
    q1, _ = _quantize(proto, dataclasses.replace(carry, nodes_to_exclude=("fc2",)))
    np.testing.assert_allclose(_run(q1, {"A": a}), ref, rtol=1e-3, atol=1e-3)


def test_weights_that_carry_their_grid_need_no_statistics():
    import onnx_ir as ir

    from ortq.passes.matmul_nbits import weight_only_activations

    rng = np.random.default_rng(7)
    proto, _ = _mlp_model(rng, k=64, hidden=64, bias=False)
    for t in proto.graph.initializer:
        if t.name == "W1":
            t.CopyFrom(numpy_helper.from_array(q4_1(rng, 64, 64).T.copy(), "W1"))
    model = ir.from_proto(proto)
    carry = WeightOnlyConfig(keep_source_grid=True, sensitive_budget=0.0)
    assert weight_only_activations(model, carry) == ["r"]  # fc2's input: fc1 carries its grid
    assert weight_only_activations(model, WeightOnlyConfig()) == ["A", "r"]  # the budget measures every layer
    assert weight_only_activations(model, dataclasses.replace(carry, keep_source_grid=False)) == ["A", "r"]


def test_bias_correction_removes_the_mean_output_error():
    """Activations far from zero mean (as after a norm with large gains): with ``bias_correction`` the mean
    error of each re-quantized layer's output goes back as its ``MatMulNBits`` bias (fc1's on top of its
    own), so held-out outputs lose their systematic error and their mean squared error drops."""
    rng = np.random.default_rng(3)
    proto, _ = _mlp_model(rng, k=64, hidden=64, bias=True, out_proj=True)
    offset = rng.uniform(2.0, 4.0, 64).astype(np.float32)

    def batches(n):
        return [{"A": (rng.standard_normal((4, 16, 64)) + offset).astype(np.float32)} for _ in range(n)]

    calib, held = batches(8), batches(4)
    base = WeightOnlyConfig(accuracy_level=None, auto_int8_sensitive=False, sensitive_budget=0.0, block_size=32)
    ref = np.concatenate([_run(proto, b) for b in held]).reshape(-1, 48)
    errors = {}
    for on in (False, True):
        q, report = _quantize(proto, dataclasses.replace(base, bias_correction=on), calib)
        nodes = {n.name: n for n in q.graph.node if n.op_type == "MatMulNBits"}
        assert all(len(n.input) == (6 if on else (6 if name.startswith("fc1") else 3)) for name, n in nodes.items())
        assert all(e.get("bias_correction", False) == on for e in report["nodes"])
        out = np.concatenate([_run(q, b) for b in held]).reshape(-1, 48)
        errors[on] = (np.abs((out - ref).mean(axis=0)).mean(), float(((out - ref) ** 2).mean()))
    assert errors[True][0] < errors[False][0] / 3
    assert errors[True][1] < errors[False][1]
