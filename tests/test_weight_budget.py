"""Mixed precision by measured sensitivity: the layers whose error at 4 bits is largest per extra byte get
more bits within the byte budget, to their exact source grid when they lie on one."""

from __future__ import annotations

import dataclasses

import numpy as np
from onnx import numpy_helper

from ortq.config import WeightOnlyConfig
from ortq.errors import ConfigError
from ortq.passes.weight_budget import Upgrade, choose_upgrades
from tests.test_matmul_nbits import _mlp_model, _quantize
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


def test_budget_carries_a_source_grid_exactly_instead_of_8_bits():
    rng = np.random.default_rng(1)
    proto, _ = _mlp_model(rng, k=64, hidden=64, bias=False)
    w1 = q4_1(rng, 64, 64).T.copy()
    for t in proto.graph.initializer:
        if t.name == "W1":
            t.CopyFrom(numpy_helper.from_array(w1, "W1"))
    batches = _outlier_batches(rng)
    config = WeightOnlyConfig(accuracy_level=None, auto_int8_sensitive=False, symmetric=True,
                              keep_source_grid=False, sensitive_budget=0.3)
    _, report = _quantize(proto, config, batches)
    by_node = {e["node"]: e for e in report["nodes"]}
    assert report["source_grid"]["carried"] == ["fc1"]
    assert by_node["fc1"]["weight_rel_rmse"] == 0.0 and by_node["fc1"]["bits"] == 4
    assert by_node["fc2"]["grid"] == "requantized" and by_node["fc2"]["symmetric"]


def test_sensitive_budget_is_validated():
    for bad in (-0.1, "0.2", True, 5.0):
        try:
            WeightOnlyConfig(sensitive_budget=bad)
        except ConfigError:
            continue
        raise AssertionError(f"{bad!r} accepted")
