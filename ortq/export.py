"""Export PyTorch / Hugging Face models to an ONNX folder: ``model.onnx`` plus tokenizer and config files.

Sources:
  * a Hugging Face model folder, a ``.gguf`` file (dequantized to float32 on load), or a hub name already in
    the local cache (nothing is ever downloaded);
  * a ``torch.nn.Module`` with ``example_inputs``.

Every export is checked against PyTorch with ONNX Runtime on inputs of two shapes other than the traced one
(so the dynamic axes are exercised) and the output folder is written atomically.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ortq.errors import ConfigError, ExportError, OrtqError, require
from ortq.io import MODEL_FILENAME, atomic_output_dir, check_output_dir, save_model
from ortq.tasks import TASK_SPECS, normalize_task, task_from_config

logger = logging.getLogger(__name__)

# Max |onnx - torch| / max |torch| above which an export is called broken. Float32 exports land near 1e-6.
PARITY_RTOL = 1e-2
_PARITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime executes the exported graph on CPUs and GPUs; quantization makes it smaller and faster, "
    "provided the accuracy stays where it was.",
    "Hello!",
    "A model is exported once and deployed many times, so the export has to be right.",
)


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
    exporter: str = "auto",
) -> ExportResult:
    """Export ``model`` to ``output_dir/model.onnx`` (plus tokenizer and config files) and check parity.

    Args:
        model: a Hugging Face model folder, a ``.gguf`` file, a hub name in the local cache, a transformers
            ``PreTrainedModel`` or any ``torch.nn.Module``.
        output_dir: the folder to write; must not exist or be empty unless ``overwrite``.
        task: ``feature-extraction``, ``text-classification`` or ``causal-lm``; inferred from
            ``config.architectures`` when not given. Ignored for a plain ``nn.Module``.
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
        spec = _module_spec(model, example_inputs, input_names, output_names, dynamic_axes)
        hf_model, tokenizer, config = None, None, None
    else:
        if isinstance(model, torch.nn.Module):
            hf_model, tokenizer, config = model, None, model.config
        else:
            hf_model, tokenizer, config, task = _load_transformers(model, task)
        task = task or task_from_config(config)
        spec = _transformers_spec(
            hf_model, tokenizer, task, example_inputs, input_names, output_names, dynamic_axes, max_length
        )

    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model_path = tmp / MODEL_FILENAME
        t0 = time.perf_counter()
        used = _convert(spec, model_path, opset, exporter)
        export_seconds = time.perf_counter() - t0
        proto = onnx.load(str(model_path), load_external_data=True)
        _drop_weight_identities(proto)
        tied = _tag_tied_weights(proto, hf_model) if hf_model is not None else {}
        _set_metadata(proto, spec.task, max_length, used, tied)
        for f in list(tmp.iterdir()):  # exporters may write external data files; save_model rewrites them
            f.unlink()
        save_model(proto, model_path)
        external = (tmp / (MODEL_FILENAME + ".data")).exists()
        try:
            onnx.checker.check_model(str(model_path) if external else proto)
        except Exception as exc:
            raise ExportError(f"the exported graph fails onnx.checker: {_first_line(exc)}") from exc
        del proto
        max_abs = max_rel = None
        shapes: tuple[tuple[int, ...], ...] = ()
        if check_parity:
            max_abs, max_rel, shapes = _check_parity(spec, model_path)
        if config is not None:
            _save_side_files(config, tokenizer, hf_model, tmp)
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
        input_names=tuple(spec.input_names),
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
    )


# --------------------------------------------------------------------------------------------- loading


def _is_transformers_model(module: Any) -> bool:
    try:
        transformers = require("transformers", "export")
    except OrtqError:
        return False
    return isinstance(module, transformers.PreTrainedModel)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid hub downloads while loading (``HF_HUB_OFFLINE`` is also read per call by huggingface_hub)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5")


def _is_onnx_export(path: Path) -> bool:
    """A ``.onnx`` file, or a folder with ``.onnx`` files and no PyTorch / GGUF weights (an export of ours)."""
    if path.is_file():
        return path.suffix == ".onnx"
    if not path.is_dir() or not any(path.glob("*.onnx")):
        return False
    return not any(next(path.glob(pattern), None) for pattern in _WEIGHT_FILES)


def _load_transformers(source: Any, task: str | None):
    """Load (model, tokenizer or None, config) from a folder, a ``.gguf`` file or a cached hub name."""
    torch = require("torch", "export")
    transformers = require("transformers", "export")
    path = Path(source)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if _is_onnx_export(path):
        raise ExportError(
            f"{path}: already an ONNX model, not a PyTorch / Hugging Face one; quantize it with "
            f"`ortq quantize {path} -o OUT` (or `ortq validate`), or export the original model folder"
        )
    if path.is_file() and path.suffix == ".gguf":
        location, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{path}: not a Hugging Face model folder (no config.json)")
        location = str(path)
    elif path.exists():
        raise ExportError(f"{path}: expected a model folder or a .gguf file")
    elif isinstance(source, str) and source.count("/") <= 1 and not source.startswith((".", "/", "~")):
        location = source  # a hub name: only the local cache is used
    else:
        raise ExportError(f"{source}: no such model folder or file")

    with _offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = transformers.AutoConfig.from_pretrained(location, **kwargs)
        except Exception as exc:
            if not path.exists():
                raise ExportError(
                    f"{source}: not a local folder and not in the Hugging Face cache (ortq never downloads; "
                    f"download it first, e.g. `hf download {source}`, or pass a folder)"
                ) from exc
            raise ExportError(f"{source}: cannot read the model config ({_first_line(exc)})") from exc
        if task is None:
            # GGUF files hold decoder LLMs; their converted configs carry no architectures.
            task = "causal-lm" if "gguf_file" in kwargs and not config.architectures else task_from_config(config)
        auto_cls = getattr(transformers, TASK_SPECS[task].auto_class)
        try:
            # Eager attention: the TorchScript exporter turns sdpa (transformers >= 5) into
            # MatMul-Softmax-MatMul wrapped in IsNaN/Where guards per layer; eager gives the plain
            # MatMul -> Add(mask) -> Softmax -> MatMul chain, which QDQ insertion and ORT's attention
            # fusions recognise. Both are numerically identical here (max abs diff ~3e-6 on MiniLM).
            model = auto_cls.from_pretrained(
                location, config=config, attn_implementation="eager", dtype=torch.float32, **kwargs
            )
        except Exception as exc:
            raise ExportError(
                f"{source}: cannot load as {TASK_SPECS[task].auto_class} for task {task} ({_first_line(exc)})"
            ) from exc
        tokenizer = None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
        except Exception as exc:
            logger.warning("%s: no tokenizer (%s); exporting without one", source, _first_line(exc))
    model.eval()
    return model, tokenizer, model.config, task


# --------------------------------------------------------------------------------------------- specs


@dataclass
class _Spec:
    """What to trace: a module taking positional tensors named ``input_names``, and sample inputs."""

    module: Any
    task: str | None
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    example: tuple[Any, ...]
    parity: list[tuple[Any, ...]]  # input tuples for the parity check
    masks: list[Any]  # attention masks of the parity inputs (None: compare every position)


def _keyword_wrapper(model: Any, input_names: Sequence[str], output_name: str, extra: Mapping[str, Any]):
    """A module taking positional tensors that calls a transformers model by keyword and returns one output.

    transformers >= 5 models must be called with keyword arguments; the exporters pass positional ones.
    """
    torch = require("torch", "export")

    class KeywordWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            out = self.model(**dict(zip(input_names, args, strict=True)), **extra)
            return out[output_name]

    return KeywordWrapper().eval()


def _transformers_spec(
    model, tokenizer, task, example_inputs, input_names, output_names, dynamic_axes, max_length
) -> _Spec:
    params = inspect.signature(model.forward).parameters
    names = [n for n in (input_names or TASK_SPECS[task].inputs) if n in params]
    if "input_ids" not in names:
        raise ExportError(f"{type(model).__name__} does not take input_ids; pass a torch module instead")
    output_name = TASK_SPECS[task].output
    outputs = list(output_names or [output_name])
    if len(outputs) != 1:
        raise ConfigError(f"task {task} has one output ({output_name}); got output_names={outputs}")
    extra = {"use_cache": False} if task == "causal-lm" else {}
    if task == "causal-lm":
        model.config.use_cache = False
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
        dynamic_axes[outputs[0]] = {0: "batch_size", 1: "sequence_length"}
    module = _keyword_wrapper(model, names, output_name, extra)

    limit = _max_positions(model.config, max_length)
    if example_inputs is not None:
        example = _as_tuple(example_inputs, names)
    else:
        example = _text_inputs(tokenizer, model.config, names, list(_PARITY_TEXTS[:2]), limit, pad_to=16)[0]
    parity = [
        _text_inputs(
            tokenizer, model.config, names, [_PARITY_TEXTS[1], _PARITY_TEXTS[2], _PARITY_TEXTS[3]], limit
        ),
        _text_inputs(tokenizer, model.config, names, [_PARITY_TEXTS[0]], limit),
    ]
    return _Spec(
        module=module,
        task=task,
        input_names=names,
        output_names=outputs,
        dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
        example=example,
        parity=[p[0] for p in parity],
        masks=[p[1] for p in parity],
    )


def _max_positions(config, max_length: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None) or 512
    return min(limit, max_length) if max_length else min(limit, 128)


def _text_inputs(tokenizer, config, names, texts, max_length, pad_to=None):
    """Tokenized ``texts`` as a tuple ordered like ``names``, and the attention mask (numpy)."""
    torch = require("torch", "export")
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        enc = tokenizer(
            texts,
            padding="max_length" if pad_to else "longest",
            max_length=min(pad_to or max_length, max_length),
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    else:  # random tokens of lengths that follow the texts', right-padded
        gen = torch.Generator().manual_seed(0)
        lengths = [min(max(2, len(t.split()) * 2), max_length) for t in texts]
        seq = pad_to or max(lengths)
        vocab = int(getattr(config, "vocab_size", 1000))
        ids = torch.randint(1, vocab, (len(texts), seq), generator=gen)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, : min(n, seq)] = 1
        ids = ids * mask + (getattr(config, "pad_token_id", None) or 0) * (1 - mask)
    values = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    return tuple(values[n] for n in names), mask.numpy().astype(bool)


def _as_tuple(example_inputs, names) -> tuple:
    torch = require("torch", "export")
    if isinstance(example_inputs, Mapping):
        missing = [n for n in names if n not in example_inputs]
        if missing:
            raise ConfigError(f"example_inputs lack {', '.join(missing)}")
        return tuple(example_inputs[n] for n in names)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _module_spec(module, example_inputs, input_names, output_names, dynamic_axes) -> _Spec:
    torch = require("torch", "export")
    if example_inputs is None:
        raise ConfigError("exporting a torch.nn.Module needs example_inputs (a tensor, tuple or dict)")
    if isinstance(example_inputs, Mapping):
        names = list(input_names or example_inputs)
        example = tuple(example_inputs[n] for n in names)
        keyword_names = list(example_inputs)
        inner = module

        class KeywordModule(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.module = inner

            def forward(self, *args):
                return self.module(**dict(zip(keyword_names, args, strict=True)))

        module = KeywordModule()
        example = tuple(example_inputs[n] for n in keyword_names)
    else:
        example = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        names = list(
            input_names or [f"input_{i}" if len(example) > 1 else "input" for i in range(len(example))]
        )
    if len(names) != len(example):
        raise ConfigError(f"{len(names)} input_names for {len(example)} example inputs")
    module.eval()
    with torch.no_grad():
        out = module(*example)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    outputs = list(output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]))
    if dynamic_axes is None:
        dynamic_axes = {}
        for n, x in zip(names, example, strict=True):
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                dynamic_axes[n] = {0: "batch_size"}
        for n in outputs:
            dynamic_axes[n] = {0: "batch_size"}
    return _Spec(
        module=module,
        task=None,
        input_names=names,
        output_names=outputs,
        dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()},
        example=example,
        parity=[example],
        masks=[None],
    )


# --------------------------------------------------------------------------------------------- convert


def _convert(spec: _Spec, path: Path, opset: int, exporter: str) -> str:
    """Run the torch exporter(s); return the name of the one that worked."""
    torch = require("torch", "export")
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[
        exporter
    ]
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
            errors.append(f"{name}: {_first_line(exc)}")
            logger.warning(
                "%s exporter failed (%s)%s",
                name,
                _first_line(exc),
                "; trying the next" if name != order[-1] else "",
            )
            for f in path.parent.iterdir():
                f.unlink()
    raise ExportError("torch.onnx.export failed: " + " | ".join(errors))


def _dynamic_shapes(spec: _Spec) -> tuple:
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


def _drop_weight_identities(proto: onnx.ModelProto) -> int:
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


def _tag_tied_weights(proto: onnx.ModelProto, hf_model: Any) -> dict[str, str]:
    """Find initializers that copy the input embedding transposed (a tied lm_head) -> {copy: embedding}.

    The TorchScript exporter folds ``lm_head.weight.T`` into its own ``[hidden, vocab]`` initializer feeding
    the final MatMul; the ``[vocab, hidden]`` embedding feeds the Gather. The two are not shared in the graph.
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
        src_arr = numpy_helper.to_array(src)
        for cand in by_shape.get((hidden, vocab), []):
            if np.array_equal(numpy_helper.to_array(cand), src_arr.T):
                tied[cand.name] = src.name
    return tied


def _set_metadata(proto, task, max_length, exporter, tied) -> None:
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


# --------------------------------------------------------------------------------------------- parity


def _check_parity(spec: _Spec, model_path: Path):
    """Run torch and ORT on the parity inputs; return (max_abs, max_rel, shapes); raise when grossly off."""
    torch = require("torch", "export")
    import onnxruntime as ort

    # Torch first, then ORT: idle ORT worker threads spin and would slow torch down on a small machine.
    all_refs = []
    with torch.no_grad():
        for inputs in spec.parity:
            ref = spec.module(*inputs)
            all_refs.append(
                [r.detach().float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else [ref])]
            )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(4, os.cpu_count() or 1)
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load the exported model: {_first_line(exc)}") from exc
    max_abs, ref_max, shapes = 0.0, 0.0, []
    for inputs, mask, refs in zip(spec.parity, spec.masks, all_refs, strict=True):
        feeds = {
            n: x.numpy() for n, x in zip(spec.input_names, inputs, strict=True) if isinstance(x, torch.Tensor)
        }
        try:
            got = sess.run(spec.output_names, feeds)
        except Exception as exc:
            raise ExportError(
                f"ONNX Runtime fails on inputs of shape {_shapes(inputs)}: {_first_line(exc)}"
            ) from exc
        for r, g in zip(refs, got, strict=True):
            if r.shape != g.shape:
                raise ExportError(
                    f"ONNX output shape {g.shape} differs from torch {r.shape} on {_shapes(inputs)}"
                )
            diff = np.abs(g.astype(np.float64) - r)
            if mask is not None and r.ndim >= 2 and r.shape[:2] == mask.shape:
                diff, r = diff[mask], r[mask]  # padded positions are don't-care
            if not np.isfinite(diff).all():
                raise ExportError(f"ONNX output holds NaN/inf where torch does not, on {_shapes(inputs)}")
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            ref_max = max(ref_max, float(np.abs(r).max(initial=0.0)))
        shapes.append(tuple(inputs[0].shape))
    max_rel = max_abs / max(ref_max, 1e-12)
    logger.info("parity vs torch on shapes %s: max abs diff %.3g (relative %.3g)", shapes, max_abs, max_rel)
    if max_rel > PARITY_RTOL:
        raise ExportError(
            f"ONNX output differs from torch by {max_abs:.3g} (max abs; {max_rel:.2%} of the output range); "
            "try exporter='dynamo' or another opset"
        )
    return max_abs, max_rel, tuple(shapes)


def _shapes(inputs) -> str:
    return ", ".join(str(tuple(x.shape)) for x in inputs if hasattr(x, "shape"))


# --------------------------------------------------------------------------------------------- side files


def _save_side_files(config, tokenizer, hf_model, folder: Path) -> None:
    """config.json (+ generation_config.json) and the tokenizer files, like an Optimum export."""
    config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's config is not touched
    # A GGUF source leaves quantization_config={quant_method: gguf}; the ONNX weights are float32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hf_model is not None and not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    config.save_pretrained(folder)
    gen = getattr(hf_model, "generation_config", None)
    if gen is not None and getattr(hf_model, "can_generate", lambda: False)():
        with contextlib.suppress(Exception):
            gen.save_pretrained(folder)
    if tokenizer is not None:
        try:
            tokenizer.save_pretrained(folder)
        except Exception as exc:
            raise ExportError(f"cannot save the tokenizer: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
