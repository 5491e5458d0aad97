"""GPTQ's Hessians gathered group by group within a byte budget: the same quantized model, bit for bit, as
one calibration pass holding all of them."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

import ortq.quantize_steps as qs
from ortq.calibrators.activations import GroupedHessians, hessian_groups
from ortq.config import WeightOnlyConfig
from ortq.data import real_text
from ortq.io import resolve_model_path


def _weights(done) -> dict[str, np.ndarray]:
    return {n: np.asarray(v.const_value.numpy()).copy() for n, v in done.model.graph.initializers.items()}


def test_hessian_groups_fit_the_budget():
    widths = {"a": 4, "b": 4, "c": 8, "d": 2}  # 128, 128, 512, 32 bytes
    assert hessian_groups(widths, 256) == [["a", "b"], ["c"], ["d"]]
    assert hessian_groups(widths, 1 << 20) == [["a", "b", "c", "d"]]
    assert hessian_groups(widths, 1) == [["a"], ["b"], ["c"], ["d"]]


def test_grouped_hessians_are_bit_identical_to_one_pass(tiny_llama_dir, monkeypatch):
    config = WeightOnlyConfig(bits=4, algorithm="gptq", accuracy_level=None)
    steps = qs.QuantizeSteps(resolve_model_path(tiny_llama_dir))
    feeds = list(steps.batches(real_text("calibration", 8), batch_size=4, max_length=16))
    whole = steps.weight_only(config, feeds)
    assert "hessian_groups" not in whole.report["calibration"]

    passes = []
    real = GroupedHessians.__getitem__

    def counted(self, name):
        before = self.passes
        out = real(self, name)
        if self.passes != before:
            passes.append(list(self._current))
        return out

    monkeypatch.setattr(GroupedHessians, "__getitem__", counted)
    widths = qs._activation_widths(steps.model, qs.weight_only_activations(steps.model, config))
    smallest = min(c * c * 8 for c in widths.values())
    monkeypatch.setattr(qs, "HESSIAN_BUDGET_BYTES", smallest)  # one activation per group
    grouped = steps.weight_only(config, feeds)
    assert grouped.report["calibration"]["hessian_groups"] == len(widths) > 1
    # each group gathered alone, once: the layers the sensitivity budget upgrades to 8 bits (rounded to
    # nearest) do not read their group again
    assert len(passes) == len(widths) and all(len(p) == 1 for p in passes)
    assert {p[0] for p in passes} == set(widths)
    upgraded = {e["node"] for e in whole.report["nodes"]
                if str(e.get("bits_reason", "")).startswith("sensitive")}
    assert upgraded
    a, b = _weights(whole), _weights(grouped)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    def entries(report):  # an upgraded layer's output error is measured only with the Hessians at hand
        strip = ("seconds", "calibration")
        return [{k: v for k, v in e.items() if k not in strip and not (k == "output_rel_rmse" and e["node"] in
                                                                       upgraded)} for e in report["nodes"]]

    assert entries(whole.report) == entries(grouped.report)
    assert {e["algorithm"] for e in grouped.report["nodes"] if e["op"] == "MatMulNBits"} >= {"gptq"}


def test_statistics_sessions_run_only_what_computes_their_activations(tiny_llama_dir):
    """A group's pass runs the layers up to its activations, not the rest of the decoder nor its logits: the
    pruned model computes the same values, has those activations as its only outputs and drops the rest."""
    import onnx
    import onnxruntime as ort

    from ortq.calibrators.graph import pruned_to
    from ortq.passes.matmul_nbits import weight_only_activations
    from ortq.quantize_steps import QuantizeSteps

    steps = QuantizeSteps(tiny_llama_dir / "model.onnx")
    names = weight_only_activations(steps.model, WeightOnlyConfig())
    first = names[:2]
    pruned = pruned_to(steps.model, first)
    assert [v.name for v in pruned.graph.outputs] == first
    assert len(pruned.graph) < len(steps.model.graph)
    assert not any("layers.1" in (n.name or "") or "lm_head" in (n.name or "") for n in pruned.graph)
    assert len(pruned.graph.initializers) < len(steps.model.graph.initializers)
    assert len(steps.model.graph.outputs) and steps.model.graph.outputs[0].name not in first  # the source is kept
    proto = ir.to_proto(pruned)
    feeds = next(iter(steps.batches(real_text("calibration", 2), batch_size=2)))
    full = ir.to_proto(steps.model.clone())
    full.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in first)
    want = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"]).run(first, feeds)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(first, feeds)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    assert pruned_to(steps.model, ["not-a-value"]) is steps.model
