"""Sessions on a model with observation outputs added, for the calibration step.

The model (an ``onnx_ir.Model``) is serialized once, for ONNX Runtime only: written to a temporary folder
with its weights as external data (tensor by tensor, never a second in-memory copy of all of them); the
additions (extra nodes and outputs, a ``ModelProto`` holding only them) are then merged into the small graph
file, each added node placed right after the producers of its inputs. The folder is removed once the
session is created (on POSIX a data file ONNX Runtime mapped stays valid once unlinked; elsewhere the folder
lives as long as the session).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_ir as ir

from ortq.errors import ModelError
from ortq.io import unmap_all
from ortq.runtime import SessionSettings, create_session, normalize_provider

_DATA_FILE = "model.onnx.data"


def as_ir_model(model: ir.Model | onnx.ModelProto | str | os.PathLike) -> ir.Model:
    """An ``onnx_ir.Model`` view of ``model`` (a proto is wrapped, its tensors are not copied)."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    try:
        return ir.load(str(model))
    except Exception as exc:
        raise ModelError(f"{model}: cannot load ({exc})") from exc


def observed_session(
    model: ir.Model,
    additions: onnx.ModelProto | None = None,
    *,
    settings: SessionSettings | None = None,
    providers: Sequence[str] | None = None,
    what: str = "the model for calibration",
):
    """A session on ``model`` merged with ``additions`` (nodes, outputs, initializers appended to its graph).

    Args:
        model: the model; left unchanged.
        additions: a ``ModelProto`` whose graph holds only what to append, or None.
        settings: session settings (default: :class:`~ortq.runtime.SessionSettings`).
        providers: ONNX Runtime provider names; the first one is used (default CPU).
        what: how error messages name the model.
    """
    tmp = tempfile.TemporaryDirectory(prefix="ortq-observe-", ignore_cleanup_errors=True)
    try:
        path = Path(tmp.name) / "model.onnx"
        ir.save(model, path, external_data=_DATA_FILE)
        if additions is not None:
            merged = onnx.load(str(path), load_external_data=False)  # the graph; the weights stay in the file
            merge_additions(merged.graph, additions.graph)
            path.write_bytes(merged.SerializeToString())
        unmap_all(model)  # the session reads the weights from the copy: this process lets go of its pages
        provider = normalize_provider(providers[0]) if providers else "cpu"
        # The added nodes run where merge_additions put them: each observed activation is freed as usual.
        settings = dataclasses.replace(settings or SessionSettings(), node_order=True)
        session = create_session(str(path), provider=provider, settings=settings, what=what)
    except BaseException:
        tmp.cleanup()
        raise
    if os.name == "posix":
        tmp.cleanup()  # the session has read the files; a mapped data file stays valid once unlinked
    else:
        session._ortq_tmp = tmp  # a mapped file cannot be removed here: the folder lives with the session
    return session


def merge_additions(graph: onnx.GraphProto, additions: onnx.GraphProto) -> None:
    """Append ``additions``' outputs and initializers to ``graph`` and insert its nodes (in topological order
    among themselves) each right after the last node producing one of its inputs.

    Run in node-list order (``SessionSettings.node_order``), observation nodes appended at the end would run
    after the whole model, keeping every observed activation alive until then (GBs on a large model); placed
    after their producers, each activation is freed as usual.
    """
    position = {name: i for i, node in enumerate(graph.node) for name in node.output}
    slots: dict[int, list[onnx.NodeProto]] = {}
    for node in additions.node:
        at = max((position.get(name, -1) for name in node.input if name), default=-1)
        slots.setdefault(at, []).append(node)
        position.update((name, at) for name in node.output)
    nodes = list(slots.pop(-1, []))
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(slots.pop(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.output.extend(additions.output)
    graph.initializer.extend(additions.initializer)


def light_proto(model: ir.Model, max_init_bytes: int = 4096) -> onnx.ModelProto:
    """``model`` without its large initializers (declared as graph inputs instead): enough for shape
    inference, without copying the weights. Small initializers (shape constants) keep their values."""
    light = model.clone()
    graph = light.graph
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes > max_init_bytes or isinstance(tensor, ir.ExternalTensor):
            graph.initializers.pop(name)
            value.const_value = None
            if not value.is_graph_input():
                graph.inputs.append(value)
    return ir.to_proto(light)


def pruned_to(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of ``model`` (sharing its weights) whose outputs are the values ``names`` and that holds only the
    nodes they depend on, and their initializers: on a decoder, the layers after the last of them and the
    logits are left out. Every graph input stays. ``model`` itself when a name is not a node's output in the
    main graph."""
    if not names or not set(names) <= {v.name for node in model.graph for v in node.outputs}:
        return model
    clone = model.clone()
    produced = {v.name: v for node in clone.graph for v in node.outputs}
    needed: set[int] = set()
    stack = [produced[n].producer() for n in names]
    while stack:
        node = stack.pop()
        if node is None or id(node) in needed or node.graph is not clone.graph:
            continue
        needed.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None)
        for attr in node.attributes.values():  # outer values read inside a subgraph (an If / Loop body)
            subgraphs = attr.value if attr.type == ir.AttributeType.GRAPHS else (
                [attr.value] if attr.type == ir.AttributeType.GRAPH else [])
            for sub in subgraphs:
                stack.extend(v.producer() for inner in ir.traversal.RecursiveGraphIterator(sub)
                             for v in inner.inputs if v is not None)
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(produced[n] for n in dict.fromkeys(names))
    clone.graph.remove([node for node in clone.graph if id(node) not in needed], safe=True)
    for name, value in list(clone.graph.initializers.items()):
        if not value.uses():
            del clone.graph.initializers[name]
    return clone
