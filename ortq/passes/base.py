"""The one interface of ortq's graph rewrites: an ``onnx_ir`` in-place pass that reports what it did.

    passes = [InsertQDQPass(plan), CpuKernelsPass()]
    reports = run_passes(model, passes)     # {"insert_qdq": {...}, "cpu_kernels": {...}}

Every rewrite is configured in ``__init__`` (plan, config, statistics gathered by :mod:`ortq.calibrators`),
never opens an ONNX Runtime session, edits the ``onnx_ir.Model`` it is given in place, and leaves in
``self.report`` a JSON-able dict describing its changes (reset at each call). ``report_key`` names the
section of ``quantization_report.json`` the report goes to.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult, Sequential


class ReportingPass(InPlacePass):
    """An in-place rewrite with a report; subclasses implement :meth:`rewrite`."""

    report_key: str = "pass"

    def __init__(self) -> None:
        super().__init__()
        self.report: dict[str, Any] = {}

    def call(self, model: ir.Model) -> PassResult:
        self.report = {}
        modified = self.rewrite(model)
        return PassResult(model, modified=bool(modified))

    @abc.abstractmethod
    def rewrite(self, model: ir.Model) -> bool:
        """Edit ``model`` in place, fill ``self.report``; return whether anything changed."""


def run_passes(model: ir.Model, passes: Sequence[ReportingPass]) -> dict[str, dict[str, Any]]:
    """Run ``passes`` in order on ``model`` (in place); return their reports by ``report_key``."""
    if passes:
        Sequential(*passes)(model)
    return {p.report_key: p.report for p in passes}
