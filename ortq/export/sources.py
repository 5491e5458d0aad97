"""Where an export starts: a Hugging Face folder, a ``.gguf`` file or a cached hub name, loaded offline."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ortq import progress
from ortq.errors import ExportError, first_line, require
from ortq.tasks import TASK_SPECS, task_from_config

logger = logging.getLogger(__name__)


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


def load_transformers(source: Any, task: str | None):
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

    if not progress.enabled():  # transformers' own bars follow ortq's: a terminal only, never with --quiet
        transformers.utils.logging.disable_progress_bar()
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
            raise ExportError(f"{source}: cannot read the model config ({first_line(exc)})") from exc
        if task is None:
            # GGUF files hold decoder LLMs; their converted configs carry no architectures.
            task = "causal-lm" if "gguf_file" in kwargs and not config.architectures else task_from_config(config)
        auto_cls = getattr(transformers, TASK_SPECS[task].auto_class)
        try:
            # Eager attention: the TorchScript exporter turns sdpa (transformers >= 5) into
            # MatMul-Softmax-MatMul wrapped in IsNaN/Where guards per layer; eager gives the plain
            # MatMul -> Add(mask) -> Softmax -> MatMul chain, which QDQ insertion and ORT's attention
            # fusions recognise. Both are numerically identical here (max abs diff ~3e-6 on MiniLM).
            model, info = auto_cls.from_pretrained(
                location,
                config=config,
                attn_implementation="eager",
                dtype=torch.float32,
                output_loading_info=True,
                **kwargs,
            )
        except Exception as exc:
            raise ExportError(
                f"{source}: cannot load as {TASK_SPECS[task].auto_class} for task {task} ({first_line(exc)})"
            ) from exc
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            # A head the checkpoint has no weights for is initialised at random: the export would be noise.
            raise ExportError(
                f"{source}: the checkpoint has no weights for {len(missing)} tensor(s) of task {task} "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): they would be random; "
                f"choose the task the model was trained for (its config says {task_from_config(config)})"
            )
        tokenizer = None
        try:
            if not TASK_SPECS[task].vision:  # images go through preprocessor_config.json, not a tokenizer
                tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
        except Exception as exc:
            logger.warning("%s: no tokenizer (%s); exporting without one", source, first_line(exc))
    model.eval()
    return model, tokenizer, model.config, task


def save_side_files(config, tokenizer, hf_model, folder: Path) -> None:
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
            raise ExportError(f"cannot save the tokenizer: {first_line(exc)}") from exc
