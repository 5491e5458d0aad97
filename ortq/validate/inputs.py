"""What validation compares: the two models, the held-out batches they both see, and a summary of each model
for the report."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ortq.data import graph_inputs, load_batches, real_text
from ortq.errors import CalibrationDataError, ModelError
from ortq.io import has_tokenizer, load_graph, resolve_model_path

logger = logging.getLogger(__name__)

__all__ = ["ModelFile", "load_model_file", "model_summary", "pick_batches", "synthetic_batches"]


@dataclass
class ModelFile:
    """A model as validation sees it.

    Attributes:
        path: the ``.onnx`` file.
        folder: the folder holding its tokenizer (the exported folder given, or the file's folder when a
            tokenizer sits there), else None.
        proto: the graph, without external data loaded (sessions read the file itself).
    """

    path: Path
    folder: Path | None
    proto: onnx.ModelProto


def load_model_file(model: str | os.PathLike) -> ModelFile:
    """Resolve ``model`` (an ``.onnx`` file or an exported folder) and read its graph.

    Raises:
        ModelError: no model there, or not a readable ONNX file.
    """
    p = Path(model)
    path = resolve_model_path(p)
    try:
        proto = load_graph(path)
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    folder = p if p.is_dir() else None
    if folder is None and has_tokenizer(path.parent):
        folder = path.parent
    return ModelFile(path, folder, proto)


def model_summary(m: ModelFile) -> dict[str, Any]:
    """``path``, ``size_bytes`` (external data included), ``nodes``, ``opset`` and ``op_types`` of a model."""
    ops: dict[str, int] = {}
    for n in m.proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    size = m.path.stat().st_size
    locations = {
        e.value
        for t in m.proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    for loc in locations:
        f = m.path.parent / loc
        if f.is_file():
            size += f.stat().st_size
    return {
        "path": str(m.path),
        "size_bytes": size,
        "nodes": len(m.proto.graph.node),
        "opset": next((i.version for i in m.proto.opset_import if i.domain in ("", "ai.onnx")), None),
        "op_types": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def _vocab_size(model: onnx.ModelProto, input_name: str) -> int | None:
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in ("Gather", "GatherBlockQuantized") and len(n.input) > 1 and n.input[1] == input_name:
            dims = inits.get(n.input[0])
            if dims:
                return int(dims[0])
    return None


def synthetic_batches(
    model: onnx.ModelProto, *, batch_size: int, num_samples: int, seq_len: int = 32, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Seeded random feeds that fit ``model``'s inputs: token ids below the embedding size, a padding mask
    with varied lengths, zeros for ``token_type_ids``, standard normal floats elsewhere."""

    rng = np.random.default_rng(seed)
    specs = graph_inputs(model)
    shapes = {}
    for vi in model.graph.input:
        if vi.name in specs:
            dims = vi.type.tensor_type.shape.dim
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    batches = []
    left = num_samples
    while left > 0:
        b = min(batch_size, left)
        lengths = rng.integers(max(1, seq_len // 2), seq_len + 1, size=b)
        lengths[0] = seq_len
        mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        feed = {}
        for name, spec in specs.items():
            shape = []
            for i, d in enumerate(shapes.get(name, [])):
                shape.append(d if d else (b if i == 0 else seq_len))
            lname = name.lower()
            if np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_:
                if "mask" in lname:
                    arr = mask if list(mask.shape) == shape else np.ones(shape, dtype=np.int64)
                elif "type" in lname or "position" in lname:
                    arr = (
                        np.broadcast_to(np.arange(shape[-1]), shape).copy()
                        if "position" in lname
                        else np.zeros(shape, dtype=np.int64)
                    )
                else:
                    vocab = _vocab_size(model, name) or 1000
                    arr = rng.integers(0, vocab, size=shape)
                    if list(mask.shape) == shape:
                        arr = np.where(mask.astype(bool), arr, 0)
                feed[name] = arr.astype(spec.dtype)
            else:
                feed[name] = rng.standard_normal(shape).astype(spec.dtype)
        batches.append(feed)
        left -= b
    return batches


def pick_batches(
    data: Any, reference: ModelFile, *, batch_size: int, num_samples: int
) -> tuple[list[dict[str, np.ndarray]], str]:
    """The held-out batches and a one-line description of where they come from.

    ``data`` None: real held-out text when a tokenizer sits beside the reference, else seeded random inputs
    (with a warning). Otherwise anything :func:`ortq.data.load_batches` takes.

    Raises:
        CalibrationDataError: the data yields no batch.
    """
    if data is None:
        if reference.folder is not None and has_tokenizer(reference.folder):
            texts = real_text("heldout", num_samples)
            batches = list(
                load_batches(
                    texts, model=reference.proto, tokenizer=reference.folder, batch_size=batch_size,
                    num_samples=num_samples,
                )
            )
            source = f"real held-out text ({len(texts)} sentences, ortq.data.real_text('heldout'))"
        else:
            logger.warning(
                "no validation data and no tokenizer beside %s: using seeded random inputs; pass data= for a "
                "meaningful fidelity figure",
                reference.path,
            )
            batches = synthetic_batches(reference.proto, batch_size=batch_size, num_samples=num_samples)
            source = "synthetic (seeded random inputs; pass --data for a meaningful figure)"
    else:
        if isinstance(data, (str, os.PathLike)):
            source = f"file {data}"
        elif isinstance(data, Mapping):
            source = "arrays"
        else:
            source = "user-supplied batches"
        batches = list(
            load_batches(
                data, model=reference.proto, tokenizer=reference.folder, batch_size=batch_size,
                num_samples=num_samples,
            )
        )
    if not batches:
        raise CalibrationDataError("validation data is empty")
    return batches, source
