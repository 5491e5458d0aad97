"""Export PyTorch / Hugging Face models to an ONNX folder: ``model.onnx`` plus tokenizer and config files.

Sources:
  * a Hugging Face model folder, a ``.gguf`` file (dequantized to float32 on load), or a hub name already in
    the local cache (nothing is ever downloaded);
  * a ``torch.nn.Module`` with ``example_inputs``.

Every export is checked against PyTorch with ONNX Runtime on inputs of two shapes other than the traced one
(so the dynamic axes are exercised) and the output folder is written atomically. The stages, in order:
:mod:`~ortq.export.sources` (load) -> :mod:`~ortq.export.spec` (inputs, outputs, axes) ->
:mod:`~ortq.export.convert` (torch -> ONNX, graph clean-up) -> :mod:`~ortq.export.parity` (check).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ortq.errors import ConfigError, ExportError, OrtqError, require
from ortq.export.attention import OP_TYPE as FUSED_OP
from ortq.export.convert import (
    convert,
    drop_weight_identities,
    save_checked_model,
    set_metadata,
    tag_tied_weights,
)
from ortq.export.decoder import INPUTS as DECODER_INPUTS
from ortq.export.decoder import decoder_spec
from ortq.export.genai import genai_config, write_genai_config
from ortq.export.parity import compare_with_torch
from ortq.export.seq2seq import ENCODER_FILE, seq2seq_specs, write_graphs
from ortq.export.simplify import simplify_decoder_model
from ortq.export.sources import load_transformers, save_side_files
from ortq.export.spec import max_positions, module_spec, transformers_spec
from ortq.export.vision import save_preprocessor, vision_spec, vision_task
from ortq.io import MODEL_FILENAME, atomic_output_dir, check_output_dir
from ortq.runtime import LARGE_MODEL_BYTES, bound_heap_growth
from ortq.tasks import TASK_SPECS, normalize_task, task_from_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how close the ONNX model is to PyTorch.

    Attributes:
        output_dir: the folder written.
        model_path: ``output_dir / "model.onnx"``.
        task: the task exported (``None`` for a plain ``nn.Module``).
        opset: the default-domain opset of the graph.
        input_names / output_names: the graph's inputs and outputs.
        exporter: ``"torchscript"`` or ``"dynamo"``.
        max_abs_diff: max |onnx - torch| over the parity inputs (real tokens only); ``None`` if not checked.
        max_rel_diff: ``max_abs_diff / max |torch|``.
        parity_shapes: the input shapes the parity check ran (batch, sequence).
        export_seconds: wall time of the torch -> ONNX conversion.
        num_parameters: parameters of the torch model.
        external_data: whether the weights live in ``model.onnx.data``.
        tied_weights: graph initializer -> the initializer it duplicates (transposed), e.g. the lm_head
            MatMul weight of a model with tied input/output embeddings.
        files: the file names in ``output_dir``.
        attention: ``GroupQueryAttention`` when the decoder's attention is fused, else ``standard``.
        graphs: for an encoder-decoder (several ``.onnx`` files), each file's exporter, inputs, outputs and
            parity figures; ``model_path`` is then the encoder and the top-level figures the worst file's.
    """

    output_dir: Path
    model_path: Path
    task: str | None
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    exporter: str
    max_abs_diff: float | None
    max_rel_diff: float | None
    parity_shapes: tuple[tuple[int, ...], ...]
    export_seconds: float
    num_parameters: int
    external_data: bool
    tied_weights: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    attention: str = "standard"
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The exported folder (same as ``output_dir``)."""
        return self.output_dir


def export(
    model: Any,
    output_dir: str | os.PathLike,
    *,
    task: str | None = None,
    opset: int = 17,
    example_inputs: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    overwrite: bool = False,
    check_parity: bool = True,
    max_length: int | None = None,
    fused_attention: bool = True,
    exporter: str = "auto",
) -> ExportResult:
    """Export ``model`` to ``output_dir/model.onnx`` (plus tokenizer and config files) and check parity.

    Args:
        model: a Hugging Face model folder, a ``.gguf`` file, a hub name in the local cache, a transformers
            ``PreTrainedModel`` or any ``torch.nn.Module``.
        output_dir: the folder to write; must not exist or be empty unless ``overwrite``.
        task: ``feature-extraction``, ``text-classification``, ``causal-lm`` (with the KV cache as inputs and
            outputs) or ``causal-lm-no-past`` (logits only); inferred from ``config.architectures`` when not
            given. Ignored for a plain ``nn.Module``.
        opset: the ONNX opset.
        example_inputs: inputs to trace with: a tensor, a tuple of tensors or a dict name -> tensor. Required
            for a plain ``nn.Module``; optional for transformers models (tokenized sample text by default).
        input_names: graph input names (a transformers model keeps only the ones its forward takes).
        output_names: graph output names.
        dynamic_axes: ``{name: {axis: dim_name}}``. Transformers models default to dynamic batch and
            sequence axes; a plain module to a dynamic axis 0 (``batch``) on every input and output.
        overwrite: replace a non-empty ``output_dir``.
        check_parity: compare ONNX Runtime with PyTorch after export (raise :class:`ExportError` when off by
            more than 1% of the output's range).
        max_length: longest sequence the parity inputs use and recorded in the model's metadata.
        exporter: ``"auto"`` (TorchScript, then dynamo on failure), ``"torchscript"`` or ``"dynamo"``.
        fused_attention: ``causal-lm`` only: export each self-attention as one ONNX Runtime
            ``GroupQueryAttention`` (CPU and CUDA EPs), as onnxruntime-genai does; a model whose attention it
            cannot express falls back to standard ops with a warning (``ExportResult.attention`` says which).

    Raises:
        ExportError: the model cannot be loaded, exported, or its ONNX outputs differ from PyTorch.
        OutputError: ``output_dir`` exists and is not empty (without ``overwrite``) or is not writable.
    """
    if task is not None:
        task = normalize_task(task)
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ConfigError(f"unknown exporter {exporter!r}; choose auto, torchscript or dynamo")
    if not isinstance(opset, int) or not 11 <= opset <= 23:
        raise ConfigError(f"opset must be an integer between 11 and 23, got {opset!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    inputs_to_protect = (
        (Path(model),) if isinstance(model, (str, os.PathLike)) and Path(model).exists() else ()
    )
    out = check_output_dir(output_dir, inputs=inputs_to_protect, overwrite=overwrite)

    torch = require("torch", "export")
    if isinstance(model, torch.nn.Module) and not _is_transformers_model(model):
        spec = module_spec(model, example_inputs, input_names, output_names, dynamic_axes)
        hf_model, tokenizer, config = None, None, None
    else:
        if isinstance(model, torch.nn.Module):
            hf_model, tokenizer, config = model, None, model.config
        else:
            hf_model, tokenizer, config, task = load_transformers(model, task)
        task = vision_task(hf_model, task or task_from_config(config))
        if TASK_SPECS[task].seq2seq:
            return _export_seq2seq(hf_model, tokenizer, config, task, out, opset, exporter, overwrite,
                                   check_parity, max_length)
        with_past = TASK_SPECS[task].with_past and example_inputs is None
        if TASK_SPECS[task].vision:
            spec = vision_spec(hf_model, task, example_inputs, input_names, output_names, dynamic_axes)
        elif with_past and tuple(input_names or DECODER_INPUTS) == DECODER_INPUTS:
            spec = decoder_spec(
                hf_model, tokenizer, max_positions(config, max_length), fused_attention=fused_attention
            )
        else:
            spec = transformers_spec(
                hf_model, tokenizer, task, example_inputs, input_names, output_names, dynamic_axes, max_length
            )

    if sum(p.numel() * p.element_size() for p in spec.module.parameters()) > LARGE_MODEL_BYTES:
        bound_heap_growth()  # the exporter's copies of large weights are released when freed
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model_path = tmp / MODEL_FILENAME
        try:
            written = _write_graph(spec, model_path, opset, exporter, hf_model, max_length, check_parity)
        except ExportError as exc:
            if not spec.custom_opsets:
                raise
            logger.warning("fused attention not exported (%s); exporting standard attention ops", exc)
            for f in list(tmp.iterdir()):
                f.unlink()
            spec = decoder_spec(hf_model, tokenizer, max_positions(config, max_length), fused_attention=False)
            written = _write_graph(spec, model_path, opset, exporter, hf_model, max_length, check_parity)
        used, export_seconds, graph_inputs, tied, external, attention, max_abs, max_rel, shapes = written
        if config is not None:
            save_side_files(config, tokenizer, hf_model, tmp)
            if spec.task is not None and TASK_SPECS[spec.task].vision:
                save_preprocessor(model if isinstance(model, (str, os.PathLike)) else None, config, tmp)
        if spec.kv_cache is not None:
            layers, heads, head_dim = spec.kv_cache
            write_genai_config(
                tmp,
                genai_config(
                    config,
                    getattr(hf_model, "generation_config", None),
                    num_layers=layers,
                    kv_heads=heads,
                    head_dim=head_dim,
                    context_length=spec.context_length or max_positions(config, max_length),
                ),
            )
        files = tuple(sorted(p.name for p in tmp.iterdir()))
        num_params = sum(p.numel() for p in spec.module.parameters())

    logger.info(
        "exported %s to %s in %.1f s (%s exporter, opset %d%s)",
        spec.task or type(model).__name__,
        out,
        export_seconds,
        used,
        opset,
        f", parity max abs diff {max_abs:.3g}" if max_abs is not None else "",
    )
    return ExportResult(
        output_dir=out,
        model_path=out / MODEL_FILENAME,
        task=spec.task,
        opset=opset,
        input_names=graph_inputs,
        output_names=tuple(spec.output_names),
        exporter=used,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        parity_shapes=shapes,
        export_seconds=export_seconds,
        num_parameters=num_params,
        external_data=external,
        tied_weights=tied,
        files=files,
        attention=attention,
    )


def _write_graph(spec, model_path: Path, opset: int, exporter: str, hf_model, max_length, check_parity: bool):
    """Convert ``spec`` to ``model_path``, clean the graph, save, check it and compare it with PyTorch."""
    t0 = time.perf_counter()
    used = convert(spec, model_path, opset, exporter)
    export_seconds = time.perf_counter() - t0
    # The traced graph moves aside and its weights stay in their file: the clean-up maps what it reads, and
    # the save streams the rest into the output's data file (one copy of the weights on disk, none in memory).
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".traced-") as traced:
        for f in list(model_path.parent.iterdir()):
            if f.name != Path(traced).name:
                f.rename(Path(traced) / f.name)
        proto = onnx.load(str(Path(traced) / model_path.name), load_external_data=False)
        initializers = {t.name for t in proto.graph.initializer}
        graph_inputs = tuple(i.name for i in proto.graph.input if i.name not in initializers)
        unused = [n for n in spec.input_names if n not in graph_inputs]
        if unused:
            logger.info("%s: not read by the model, not a graph input", ", ".join(unused))
        drop_weight_identities(proto)
        # Vision models have no input embedding table to tie (some raise on get_input_embeddings).
        vision = spec.task is not None and TASK_SPECS[spec.task].vision
        tied = tag_tied_weights(proto, hf_model, traced) if hf_model is not None and not vision else {}
        set_metadata(proto, spec.task, max_length, used, tied)
        model = simplify_decoder_model(proto, traced)
        del proto
        attention = FUSED_OP if any(n.op_type == FUSED_OP for n in model.graph) else "standard"
        external = save_checked_model(model, model_path)
        del model
    max_abs = max_rel = None
    shapes: tuple[tuple[int, ...], ...] = ()
    if check_parity:
        max_abs, max_rel, shapes = compare_with_torch(spec, model_path)
    return used, export_seconds, graph_inputs, tied, external, attention, max_abs, max_rel, shapes


def _export_seq2seq(hf_model, tokenizer, config, task, out, opset, exporter, overwrite, check_parity, max_length):
    """Encoder, decoder and decoder-with-past files (see :mod:`ortq.export.seq2seq`) in one atomic folder."""
    specs = seq2seq_specs(hf_model, tokenizer, task, max_positions(config, max_length))
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        graphs = write_graphs(specs, tmp, opset, exporter, check_parity=check_parity, max_length=max_length)
        save_side_files(config, tokenizer, hf_model, tmp)
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    diffs = [g for g in graphs.values() if g["max_abs_diff"] is not None]
    worst = max(diffs, key=lambda g: g["max_rel_diff"]) if diffs else None
    encoder = graphs[ENCODER_FILE]
    logger.info("exported %s to %s (%s)", task, out, ", ".join(graphs))
    return ExportResult(
        output_dir=out,
        model_path=out / ENCODER_FILE,
        task=task,
        opset=opset,
        input_names=encoder["inputs"],
        output_names=encoder["outputs"],
        exporter=encoder["exporter"],
        max_abs_diff=worst["max_abs_diff"] if worst else None,
        max_rel_diff=worst["max_rel_diff"] if worst else None,
        parity_shapes=tuple(s for g in graphs.values() for s in g["parity_shapes"]),
        export_seconds=sum(g["export_seconds"] for g in graphs.values()),
        num_parameters=sum(p.numel() for p in hf_model.parameters()),
        external_data=any(g["external_data"] for g in graphs.values()),
        files=files,
        graphs=graphs,
    )


def _is_transformers_model(module: Any) -> bool:
    try:
        transformers = require("transformers", "export")
    except OrtqError:
        return False
    return isinstance(module, transformers.PreTrainedModel)
