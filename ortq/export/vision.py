"""Vision models (ViT, DeiT, ConvNeXt, CLIP's vision tower, DETR, ...): ``pixel_values`` in, features or logits out.

The image size is fixed by the model (its position embeddings or the resize of its preprocessor); the batch axis
is dynamic. The parity inputs are seeded normal images of batch sizes other than the traced one. The export
folder gets the model's ``preprocessor_config.json`` (from the source folder, or one written from the config:
resize to ``image_size``, rescale to [0, 1], normalise with the config's mean / std), which calibration from a
folder of images (:mod:`ortq.images`) reads.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

from ortq.errors import ConfigError, ExportError, require
from ortq.export.spec import ExportSpec, _as_tuple, _keyword_wrapper, task_io
from ortq.tasks import TASK_SPECS

logger = logging.getLogger(__name__)

PREPROCESSOR_FILE = "preprocessor_config.json"
# Used when neither the source folder nor the config says how images are normalised (ViT's defaults).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_SIZE = 224


def _takes(model: Any) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def vision_task(model: Any, task: str) -> str:
    """``image-feature-extraction`` for a bare model that takes ``pixel_values`` and no ``input_ids``."""
    params = _takes(model)
    if task == "feature-extraction" and "pixel_values" in params and "input_ids" not in params:
        return "image-feature-extraction"
    if TASK_SPECS[task].vision and "pixel_values" not in params:
        raise ExportError(f"{type(model).__name__} does not take pixel_values; task {task} needs a vision model")
    return task


def image_geometry(config: Any) -> tuple[int, int, int]:
    """(channels, height, width) the model expects, from its config (a vision sub-config included)."""
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) or DEFAULT_IMAGE_SIZE
    height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
    channels = int(getattr(vision, "num_channels", 3) or 3)
    return channels, int(height), int(width)


def _images(config: Any, batch: int, seed: int):
    torch = require("torch", "export")
    channels, height, width = image_geometry(config)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, channels, height, width), generator=gen)


def vision_spec(model, task, example_inputs, input_names, output_names, dynamic_axes) -> ExportSpec:
    """What to trace for ``image-feature-extraction`` / ``image-classification``: ``pixel_values`` -> output."""
    torch = require("torch", "export")
    names, output_name, outputs = task_io(model, task, input_names, output_names, required="pixel_values")
    module = _keyword_wrapper(model, names, output_name, {})
    if example_inputs is not None:
        example = _as_tuple(example_inputs, names)
        if len(example) != 1:
            raise ConfigError(f"a vision model is exported with pixel_values only; got {len(example)} inputs")
        x = example[0]
        parity = [(x[:1],), (torch.cat([x, x.flip(0) * 0.5, x], 0),)]  # batch sizes other than the traced one
    else:
        example = (_images(model.config, 2, 0),)
        parity = [(_images(model.config, 3, 1),), (_images(model.config, 1, 2),)]
    axes = {n: {0: "batch_size"} for n in names}
    axes[outputs[0]] = {0: "batch_size"}
    if dynamic_axes is not None:
        axes = {k: dict(v) for k, v in dynamic_axes.items()}
    return ExportSpec(
        module=module,
        task=task,
        input_names=names,
        output_names=outputs,
        dynamic_axes=axes,
        example=example,
        parity=parity,
        masks=[None] * len(parity),
    )


def fallback_preprocessor(config: Any) -> dict[str, Any]:
    """A ``ViTImageProcessor`` config from the model config: resize, rescale to [0, 1], normalise."""
    _, height, width = image_geometry(config)
    vision = getattr(config, "vision_config", None) or config
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": height, "width": width},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(getattr(vision, "image_mean", None) or DEFAULT_MEAN),
        "image_std": list(getattr(vision, "image_std", None) or DEFAULT_STD),
    }


def save_preprocessor(source: Any, config: Any, folder: Path) -> None:
    """Copy the source's image processor to ``folder``, or write :func:`fallback_preprocessor`'s."""
    if source is not None and Path(source).is_dir() and (Path(source) / PREPROCESSOR_FILE).is_file():
        transformers = require("transformers", "export")
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(source), local_files_only=True)
            processor.save_pretrained(folder)
            return
        except Exception as exc:  # a processor class this transformers lacks: keep the file as it is
            logger.warning("%s: cannot load the image processor (%s); copying its config", source, exc)
            (folder / PREPROCESSOR_FILE).write_text((Path(source) / PREPROCESSOR_FILE).read_text())
            return
    logger.info("no %s beside the model: writing resize + normalise from its config", PREPROCESSOR_FILE)
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(fallback_preprocessor(config), indent=2) + "\n")
