"""GPTQ's Hessians gathered group by group within a byte budget: the same quantized model, bit for bit, as
one calibration pass holding all of them."""

from __future__ import annotations

import numpy as np

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
    # each group gathered alone; the sensitivity budget reads again the groups of the layers it upgrades
    assert len(passes) >= len(widths) and all(len(p) == 1 for p in passes)
    assert {p[0] for p in passes} == set(widths)
    a, b = _weights(whole), _weights(grouped)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    strip = ("seconds", "calibration")
    assert [{k: v for k, v in e.items() if k not in strip} for e in whole.report["nodes"]] == \
        [{k: v for k, v in e.items() if k not in strip} for e in grouped.report["nodes"]]
    assert {e["algorithm"] for e in grouped.report["nodes"] if e["op"] == "MatMulNBits"} >= {"gptq"}
