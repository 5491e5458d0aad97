"""ortq.validate.placement: integer kernels, fused and unfused QDQ groups and FLOP shares, read from ONNX
Runtime's optimized graph and profile."""

from __future__ import annotations

import json

import onnx
import pytest

from ortq.errors import ValidationFailed
from ortq.validate.placement import has_qdq, inspect_placement
from tests.validate_models import BATCH, make_mlp_models, weight_only_dq


@pytest.fixture(scope="module")
def mlp_models(tmp_path_factory):
    return make_mlp_models(tmp_path_factory.mktemp("mlp"))


def test_placement_detects_integer_kernels(mlp_models):
    fp32, q, held = mlp_models
    pq = inspect_placement(q, "cpu", held[0])
    assert pq.integer_kernels.get("QLinearMatMul") == 2
    assert pq.integer_node_names >= {"mm1", "mm2"}
    assert sorted(pq.fused_qdq_groups) == ["mm1", "mm2"] and pq.unfused_qdq_groups == []
    assert pq.nodes_per_provider == {"CPUExecutionProvider": len(pq.nodes)}
    expected = 2 * BATCH * (32 * 64 + 64 * 16)
    assert pq.flops["total"] == expected and pq.flops["int8"] == expected
    assert pq.flops["int8_fraction"] == 1.0
    assert pq.optimized_model_saved
    pf = inspect_placement(fp32, "cpu", held[0])
    assert pf.integer_kernels == {} and pf.flops["int8_fraction"] == 0.0
    assert pf.flops["total"] == expected
    d = pq.to_dict()
    assert d["qdq_groups"] == {"total": 2, "fused": 2, "unfused": []}
    json.dumps(d)


def test_placement_reports_unfused_qdq_group(mlp_models, tmp_path):
    fp32, _, held = mlp_models
    wq = weight_only_dq(fp32, tmp_path / "wdq.onnx")
    p = inspect_placement(wq, "cpu", held[0])
    assert p.qdq_groups == ["mm1"]
    assert p.unfused_qdq_groups == ["mm1"]
    assert p.integer_kernels == {}
    assert p.flops["int8_fraction"] == 0.0


def test_placement_without_feeds_describes_the_graph_only(mlp_models):
    fp32, q, _ = mlp_models
    p = inspect_placement(q, "cpu")
    assert any("no sample feeds" in n for n in p.notes)
    assert p.nodes and all(n.provider is None and n.flops is None for n in p.nodes)
    assert has_qdq(onnx.load(str(q))) and not has_qdq(onnx.load(str(fp32)))


def test_placement_on_a_missing_provider_fails(mlp_models, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ValidationFailed, match="cannot inspect placement on cuda"):
        inspect_placement(mlp_models[1], "cuda")
