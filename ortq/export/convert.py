"""torch -> ONNX (TorchScript, or dynamo on failure), then the graph clean-up and metadata."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ortq.errors import ExportError, first_line, require
from ortq.export.spec import ExportSpec
from ortq.io import needs_external_data, save_model

logger = logging.getLogger(__name__)


def convert(spec: ExportSpec, path: Path, opset: int, exporter: str) -> str:
    """Run the torch exporter(s); return the name of the one that worked."""
    torch = require("torch", "export")
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[
        exporter
    ]
    if spec.custom_opsets:  # contrib ops come from TorchScript symbolics only
        order = ("torchscript",)
    errors = []
    for name in order:
        try:
            with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers():
                warnings.simplefilter("ignore")
                if name == "torchscript":
                    # One self-contained file, stable node names; the tracer constant-folds weight transposes
                    # so every Linear becomes MatMul(x, W^T initializer), which is what int8/int4 passes want.
                    torch.onnx.export(
                        spec.module,
                        spec.example,
                        str(path),
                        input_names=spec.input_names,
                        output_names=spec.output_names,
                        dynamic_axes=spec.dynamic_axes,
                        opset_version=opset,
                        do_constant_folding=True,
                        dynamo=False,
                        custom_opsets=spec.custom_opsets or {},
                    )
                else:
                    program = torch.onnx.export(
                        spec.module,
                        spec.example,
                        input_names=spec.input_names,
                        output_names=spec.output_names,
                        dynamic_shapes=_dynamic_shapes(spec),
                        opset_version=opset,
                        dynamo=True,
                        optimize=True,
                        verbose=False,
                    )
                    program.save(str(path), external_data=True)
            return name
        except Exception as exc:
            errors.append(f"{name}: {first_line(exc)}")
            logger.warning(
                "%s exporter failed (%s)%s",
                name,
                first_line(exc),
                "; trying the next" if name != order[-1] else "",
            )
            for f in path.parent.iterdir():
                f.unlink()
    raise ExportError("torch.onnx.export failed: " + " | ".join(errors))


def _dynamic_shapes(spec: ExportSpec) -> tuple:
    """``dynamic_axes`` as torch.export ``dynamic_shapes`` for the wrapper's ``forward(*args)``."""
    torch = require("torch", "export")
    dims: dict[str, Any] = {}
    shapes = []
    for name in spec.input_names:
        axes = spec.dynamic_axes.get(name, {})
        shapes.append({int(a): dims.setdefault(d, torch.export.Dim.DYNAMIC) for a, d in axes.items()} or None)
    return (tuple(shapes),)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """The exporters log every decomposition at INFO; keep them at WARNING while converting."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def drop_weight_identities(proto: onnx.ModelProto) -> int:
    """Remove ``Identity(initializer)`` nodes: consumers read the initializer directly.

    The TorchScript exporter deduplicates equal weights (LayerNorm ones, zero biases) and routes the copies
    through Identity nodes; a quantizer that looks for a constant weight input must not have to see through them.
    """
    graph = proto.graph
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    if not alias:
        return 0

    def rename(nodes) -> None:
        for node in nodes:
            for i, name in enumerate(node.input):
                if name in alias:
                    node.input[i] = alias[name]
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    rename(sub.node)

    del graph.node[:]
    graph.node.extend(keep)
    rename(graph.node)
    vi = [v for v in graph.value_info if v.name not in alias]
    del graph.value_info[:]
    graph.value_info.extend(vi)
    return len(alias)


def tag_tied_weights(proto: onnx.ModelProto, hf_model: Any, base_dir: str = "") -> dict[str, str]:
    """Find initializers that copy the input embedding transposed (a tied lm_head) -> {copy: embedding}.

    The TorchScript exporter folds ``lm_head.weight.T`` into its own ``[hidden, vocab]`` initializer feeding
    the final MatMul; the ``[vocab, hidden]`` embedding feeds the Gather. The two are not shared in the graph.
    Weights stored externally are read from ``base_dir``.
    """
    get_in = getattr(hf_model, "get_input_embeddings", None)
    get_out = getattr(hf_model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return {}
    emb, head = get_in(), get_out()
    if emb is None or head is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return {}
    vocab, hidden = emb.weight.shape
    from onnx import numpy_helper

    by_shape = {}
    for init in proto.graph.initializer:
        dims = tuple(init.dims)
        if dims in ((vocab, hidden), (hidden, vocab)):
            by_shape.setdefault(dims, []).append(init)
    tied = {}
    for src in by_shape.get((vocab, hidden), []):
        src_arr = numpy_helper.to_array(src, base_dir)
        for cand in by_shape.get((hidden, vocab), []):
            if np.array_equal(numpy_helper.to_array(cand, base_dir), src_arr.T):
                tied[cand.name] = src.name
    return tied


def set_metadata(proto, task, max_length, exporter, tied) -> None:
    meta = {"ortq.exporter": exporter}
    if task:
        meta["ortq.task"] = task
    if max_length:
        meta["ortq.max_length"] = str(max_length)
    if tied:
        meta["ortq.tied_weights"] = json.dumps(tied, sort_keys=True)
    torch = require("torch", "export")
    meta["ortq.torch_version"] = torch.__version__
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = proto.producer_name or "pytorch"


def save_checked(proto: onnx.ModelProto, path: Path) -> bool:
    """Save ``proto`` to ``path`` (external data when too large) and run ``onnx.checker`` on what was written;
    return whether the weights went to an external data file."""
    save_model(proto, path)
    external = path.with_name(path.name + ".data").exists()
    try:
        onnx.checker.check_model(str(path) if external else proto)
    except Exception as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {first_line(exc)}") from exc
    return external


def save_checked_model(model: Any, path: Path) -> bool:
    """:func:`save_checked` for an ``onnx_ir.Model``: tensors still mapped from another file are streamed into
    ``path``'s data file (or, small enough for one file, read in), never all in memory at once."""
    import onnx_ir as ir

    external = needs_external_data(model)
    if external:
        ir.save(model, path, external_data=path.name + ".data")
    else:
        ir.external_data.load_to_model(model)
        ir.save(model, path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"{path.name} fails onnx.checker: {first_line(exc)}") from exc
    return external
