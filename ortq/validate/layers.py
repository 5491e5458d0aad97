"""Per-layer error of a static int8 model: where the quantization error comes from.

For every node the plan quantized, :func:`layer_report` measures on the same batches

* **local** error: the node alone, fed the fp32 values of its inputs. Its activations are quantized and
  dequantized with the plan's parameters, its weights are replaced by their int8 grid values, and the node is
  run again (a one-node ONNX Runtime session, so the op's exact semantics apply); the output is compared with
  the fp32 one. This is the error the node *adds*.
* **cumulative** error: the node's output in the full quantized model against the same output in the fp32
  model (both run with the output exposed). This is the error that has *reached* the node.
* **clip rate**: the share of the fp32 values of each quantized activation that saturate: they fall outside
  the range the plan can represent by more than half a step, so QuantizeLinear clips them.

Errors are SQNR in dB (``10 log10(signal / noise)``, higher is better) and cosine, accumulated over all
batches; positions of padding tokens are left out when the attention mask lines up with a tensor's
``[batch, seq]`` axes. The report is written as JSON, Markdown and, when matplotlib is installed, a PNG.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ortq.errors import CalibrationDataError, MissingDependencyError, ModelError
from ortq.io import load_model, write_text_atomic
from ortq.passes.grid import dequantized_weight, fake_quantize, saturated_count
from ortq.passes.plan import QParams, QuantPlan, ensure_node_names
from ortq.runtime import SessionSettings, attention_mask_of, batch_size_of, create_session, run_batches
from ortq.validate.metrics import ErrorStats, masked, sample_cosines

logger = logging.getLogger(__name__)

__all__ = ["LayerReport", "LayerStats", "layer_report"]

REPORT_JSON = "layer_report.json"
REPORT_MD = "layer_report.md"
REPORT_PNG = "layer_report.png"


def _session(model: onnx.ModelProto, threads: int):
    """A CPU session for the report (in-memory models over the protobuf limit are handled by the runtime)."""
    return create_session(model, settings=SessionSettings(threads=threads), what="the model for the layer report")


def _with_outputs(model: ir.Model, names: Iterable[str]) -> onnx.ModelProto:
    """``model`` as a proto with the values called ``names`` added as typed graph outputs (graph inputs and
    names no node produces are skipped)."""
    values = {v.name: v for n in model.graph for v in n.outputs if v is not None}
    present = {v.name for v in model.graph.outputs}
    proto = ir.to_proto(model)
    for name in names:
        v = values.get(name)
        if v is None or name in present:
            continue
        elem = v.dtype.value if v.dtype is not None else onnx.TensorProto.FLOAT
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
        present.add(name)
    return proto


def _as_ir(model: onnx.ModelProto | ir.Model | str | os.PathLike) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    return ir.from_proto(load_model(model))


# ------------------------------------------------------------------------------------------------ report


@dataclass
class LayerStats:
    """Errors of one quantized node. ``clip_rate`` is the largest clip rate of its activations."""

    name: str
    op_type: str
    position: int
    output: str
    local_sqnr_db: float
    local_cosine: float
    cumulative_sqnr_db: float
    cumulative_cosine: float
    clip_rate: float
    activations: dict[str, float] = field(default_factory=dict)

    @property
    def local_noise(self) -> float:
        """Noise-to-signal power ratio of the local error (``10^(-SQNR/10)``), 0 when exact."""
        return 0.0 if math.isinf(self.local_sqnr_db) and self.local_sqnr_db > 0 else 10 ** (-self.local_sqnr_db / 10)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "position": self.position,
            "output": self.output,
            "local_sqnr_db": _num(self.local_sqnr_db),
            "local_cosine": self.local_cosine,
            "cumulative_sqnr_db": _num(self.cumulative_sqnr_db),
            "cumulative_cosine": self.cumulative_cosine,
            "clip_rate": self.clip_rate,
            "activations_clip_rate": dict(self.activations),
        }


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass
class LayerReport:
    """The per-layer error of a quantized model (see :func:`layer_report`)."""

    layers: list[LayerStats]
    outputs: dict[str, dict[str, Any]]
    num_samples: int
    data: str = "batches"
    notes: list[str] = field(default_factory=list)

    def most_sensitive(self, k: int = 5) -> list[LayerStats]:
        """The ``k`` nodes that add the most error themselves (lowest local SQNR)."""
        return sorted(self.layers, key=lambda s: s.local_sqnr_db)[:k]

    def worst_output_cosine(self) -> float:
        return min((o["cosine_mean"] for o in self.outputs.values()), default=1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "data": self.data,
            "num_quantized_nodes": len(self.layers),
            "outputs": self.outputs,
            "most_sensitive": [s.name for s in self.most_sensitive()],
            "layers": [s.to_dict() for s in self.layers],
            "notes": list(self.notes),
        }

    def to_markdown(self) -> str:
        lines = [
            "# Per-layer quantization error",
            "",
            f"{len(self.layers)} quantized nodes, {self.num_samples} samples ({self.data}). Local: the node alone "
            "on fp32 inputs; cumulative: the node's output in the quantized model; clip: share of fp32 input "
            "values that saturate (outside the quantized range).",
            "",
            "## Model outputs",
            "",
            "| output | cosine mean | cosine min | SQNR dB |",
            "|---|---|---|---|",
        ]
        for name, o in self.outputs.items():
            lines.append(f"| {name} | {o['cosine_mean']:.5f} | {o['cosine_min']:.5f} | {_fmt_db(o['sqnr_db'])} |")
        lines += ["", "## Most sensitive (lowest local SQNR)", ""]
        for s in self.most_sensitive():
            lines.append(
                f"- `{s.name}` ({s.op_type}): local {_fmt_db(s.local_sqnr_db)} dB, cumulative "
                f"{_fmt_db(s.cumulative_sqnr_db)} dB, clip {100 * s.clip_rate:.3f}%"
            )
        lines += [
            "",
            "## All quantized nodes (graph order)",
            "",
            "| # | node | op | local SQNR dB | local cos | cumulative SQNR dB | cumulative cos | clip % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in self.layers:
            lines.append(
                f"| {s.position} | `{s.name}` | {s.op_type} | {_fmt_db(s.local_sqnr_db)} | {s.local_cosine:.5f} | "
                f"{_fmt_db(s.cumulative_sqnr_db)} | {s.cumulative_cosine:.5f} | {100 * s.clip_rate:.3f} |"
            )
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | os.PathLike) -> None:
        """Draw local and cumulative SQNR per node and the clip rate to a PNG (needs matplotlib)."""
        from ortq.errors import require

        matplotlib = require("matplotlib", "plot")
        matplotlib.use("Agg", force=False)
        plt = require("matplotlib.pyplot", "plot")
        x = [s.position for s in self.layers]
        fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(x) + 3), 4.5))
        try:
            ax.plot(x, [_finite(s.local_sqnr_db) for s in self.layers], "o-", label="local SQNR (dB)")
            ax.plot(x, [_finite(s.cumulative_sqnr_db) for s in self.layers], "s-", label="cumulative SQNR (dB)")
            ax.set_xlabel("quantized node (graph order)")
            ax.set_ylabel("SQNR (dB)")
            ax.grid(alpha=0.3)
            ax2 = ax.twinx()
            ax2.bar(x, [100 * s.clip_rate for s in self.layers], alpha=0.25, color="tab:red", label="clip rate (%)")
            ax2.set_ylabel("clip rate (%)")
            for s in self.most_sensitive(3):
                ax.annotate(s.name, (s.position, _finite(s.local_sqnr_db)), fontsize=7, rotation=20)
            handles = ax.get_legend_handles_labels()
            handles2 = ax2.get_legend_handles_labels()
            ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="lower left", fontsize=8)
            ax.set_title(f"Per-layer int8 error ({self.num_samples} samples)")
            fig.tight_layout()
            p = Path(path)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".png", dir=p.parent)
            os.close(fd)
            try:
                fig.savefig(tmp, dpi=110)
                os.chmod(tmp, 0o644)
                os.replace(tmp, p)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        finally:
            plt.close(fig)

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``layer_report.json``, ``.md`` and ``.png`` (the PNG only with matplotlib) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        written = {}
        try:
            self.plot(d / REPORT_PNG)
            written["png"] = d / REPORT_PNG
        except MissingDependencyError:
            note = "matplotlib is not installed: no PNG chart (pip install 'ortq[plot]')"
            if note not in self.notes:
                self.notes.append(note)
            logger.info(note)
        write_text_atomic(d / REPORT_JSON, json.dumps(self.to_dict(), indent=2) + "\n")
        write_text_atomic(d / REPORT_MD, self.to_markdown())
        written["json"], written["md"] = d / REPORT_JSON, d / REPORT_MD
        return written


def _fmt_db(x: float | str) -> str:
    if isinstance(x, str):
        return x
    return f"{x:.2f}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _finite(x: float) -> float:
    return x if math.isfinite(x) else (200.0 if x > 0 else -50.0)


# --------------------------------------------------------------------------------------------- one node


class _LocalNode:
    """One quantized node as a one-node model: non-constant inputs are fed, constants are initializers (weights
    on their int8 grid)."""

    def __init__(self, model: ir.Model, node: ir.Node, plan: QuantPlan, threads: int):
        self.node = node
        self.output = node.outputs[0].name
        quantized_inputs = set(plan.node_inputs.get(node.name, ()))
        self.fed: list[tuple[str, QParams | None]] = []
        inits, inputs = [], []
        for i, v in enumerate(node.inputs):
            if v is None or v.name in {x.name for x in inputs} or v.name in {t.name for t in inits}:
                continue
            if v.const_value is not None:
                arr = v.const_value.numpy()
                if i in quantized_inputs and v.name in plan.weights:
                    arr = dequantized_weight(arr, plan.weights[v.name])
                inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(arr), v.name))
            else:
                elem = v.dtype.value if v.dtype is not None else onnx.TensorProto.FLOAT
                inputs.append(onnx.helper.make_tensor_value_info(v.name, elem, None))
                qp = plan.activations.get(v.name) if i in quantized_inputs else None
                self.fed.append((v.name, qp))
        node_proto = ir.serde.serialize_node(node)
        elem = node.outputs[0].dtype.value if node.outputs[0].dtype is not None else onnx.TensorProto.FLOAT
        graph = onnx.helper.make_graph(
            [node_proto], "one_node", inputs, [onnx.helper.make_tensor_value_info(self.output, elem, None)], inits
        )
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
        proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
        self.session = _session(proto, threads)

    def run(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {}
        for name, qp in self.fed:
            x = values[name]
            feed[name] = fake_quantize(x, qp) if qp is not None else x
        return self.session.run([self.output], feed)[0]


# ------------------------------------------------------------------------------------------------ driver


def layer_report(
    fp32_model: onnx.ModelProto | ir.Model | str | os.PathLike,
    quantized_model: onnx.ModelProto | ir.Model | str | os.PathLike,
    plan: QuantPlan,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    max_batches: int | None = None,
    threads: int = 2,
    data: str = "batches",
) -> LayerReport:
    """Measure the local and cumulative error and the clip rate of every node ``plan`` quantized.

    Args:
        fp32_model: the float model the plan was made on (path, proto or ``onnx_ir`` model).
        quantized_model: the model :func:`ortq.passes.insert_qdq.insert_qdq` made from it with ``plan``.
        plan: the quantization plan (node names, activation and weight parameters).
        batches: feeds for the models; held-out data gives an honest picture.
        max_batches: use at most this many batches.
        threads: ONNX Runtime intra-op threads.
        data: a short description of the batches, recorded in the report.
    """
    fp32 = _as_ir(fp32_model)
    ensure_node_names(fp32.graph)  # the names the plan uses
    quant = _as_ir(quantized_model)
    wanted = [n for n in plan.quantized_nodes]
    by_name = {n.name: n for n in fp32.graph}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ModelError(f"the plan names node(s) the fp32 model lacks: {', '.join(missing[:5])}")
    quant_values = {v.name for n in quant.graph for v in n.outputs if v is not None}
    nodes = [by_name[n] for n in wanted]
    for node in nodes:
        if node.outputs[0].name not in quant_values:
            raise ModelError(f"node {node.name}: output {node.outputs[0].name!r} is not in the quantized model")

    fp32_fetch: dict[str, None] = {}
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.const_value is None and not v.is_graph_input():
                fp32_fetch[v.name] = None
        fp32_fetch[node.outputs[0].name] = None
    out_names = [v.name for v in fp32.graph.outputs]
    q_out_names = {v.name for v in quant.graph.outputs}
    compare_outputs = [n for n in out_names if n in q_out_names]
    node_outputs = [n.outputs[0].name for n in nodes]

    fp32_sess = _session(_with_outputs(fp32, fp32_fetch), threads)
    quant_sess = _session(_with_outputs(quant, node_outputs), threads)
    locals_ = [_LocalNode(fp32, n, plan, threads) for n in nodes]
    fp32_fetch_names = [o.name for o in fp32_sess.get_outputs()]
    q_fetch_names = [o.name for o in quant_sess.get_outputs()]

    local_stats = [ErrorStats() for _ in nodes]
    cumulative = [ErrorStats() for _ in nodes]
    act_names = sorted({name for ln in locals_ for name, qp in ln.fed if qp is not None})
    clipped = dict.fromkeys(act_names, 0)
    seen = dict.fromkeys(act_names, 0)
    output_stats = {n: ErrorStats() for n in compare_outputs}
    output_cos: dict[str, list[float]] = {n: [] for n in compare_outputs}
    num_samples = 0
    # Both models walk the same batches in step; tee keeps at most one batch between the two.
    fp32_batches, quant_batches = itertools.tee(itertools.islice(batches, max_batches))
    runs = zip(
        run_batches(fp32_sess, fp32_batches, fp32_fetch_names, what="the fp32 model"),
        run_batches(quant_sess, quant_batches, q_fetch_names, what="the quantized model"),
        strict=True,
    )
    for (feed, ref), (_, tst) in runs:
        mask = attention_mask_of(feed)
        values = {**feed, **ref}
        num_samples += batch_size_of(feed) if feed else 0
        for i, (node, ln) in enumerate(zip(nodes, locals_, strict=True)):
            out = node.outputs[0].name
            local_stats[i].update(masked(ref[out], mask), masked(ln.run(values), mask))
            cumulative[i].update(masked(ref[out], mask), masked(tst[out], mask))
        for name in act_names:
            x = masked(values[name], mask)
            clipped[name] += saturated_count(x, plan.activations[name])
            seen[name] += int(x.size)
        for name in compare_outputs:
            output_stats[name].update(masked(ref[name], mask), masked(tst[name], mask))
            output_cos[name].extend(sample_cosines(ref[name], tst[name], mask))
    if num_samples == 0:
        raise CalibrationDataError("layer_report got no batches")

    clip_rate = {n: clipped[n] / seen[n] if seen[n] else 0.0 for n in act_names}
    layers = []
    for i, (node, ln) in enumerate(zip(nodes, locals_, strict=True)):
        acts = {name: clip_rate[name] for name, qp in ln.fed if qp is not None}
        layers.append(
            LayerStats(
                name=node.name,
                op_type=node.op_type,
                position=i,
                output=node.outputs[0].name,
                local_sqnr_db=local_stats[i].sqnr_db,
                local_cosine=local_stats[i].cosine,
                cumulative_sqnr_db=cumulative[i].sqnr_db,
                cumulative_cosine=cumulative[i].cosine,
                clip_rate=max(acts.values(), default=0.0),
                activations=acts,
            )
        )
    outputs = {}
    for name in compare_outputs:
        c = output_cos[name] or [float("nan")]
        outputs[name] = {
            "cosine_mean": float(np.mean(c)),
            "cosine_min": float(np.min(c)),
            "sqnr_db": _num(output_stats[name].sqnr_db),
        }
    return LayerReport(layers=layers, outputs=outputs, num_samples=num_samples, data=data)
