"""Images as calibration / validation data: a folder of pictures -> batches of ``pixel_values``.

Each image is preprocessed the way the model expects it: with the exported folder's image processor
(``preprocessor_config.json``, loaded with transformers) when there is one, otherwise resized (bilinear) to the
graph's height and width, scaled to [0, 1] and normalised with the mean / std of ``preprocessor_config.json`` or
``config.json`` (0.5 / 0.5 when neither says). Files that are not images are skipped; the order is sorted by
name so calibration is reproducible.

:func:`sample_images` lists real photographs that ship with scikit-image (the ``vision`` extra), for tests and
demos that must run offline.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ortq.errors import CalibrationDataError, require

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PREPROCESSOR_FILE = "preprocessor_config.json"
# Colour photographs in scikit-image's package data (read as files: skimage itself is never imported).
SAMPLE_IMAGES = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg",
                 "hubble_deep_field.jpg", "color.png", "logo.png", "ihc.png")


def sample_images() -> list[Path]:
    """Real colour photographs shipped with scikit-image, or ``[]`` when it is not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [folder / n for n in SAMPLE_IMAGES if (folder / n).is_file()]


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationDataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class ImagePreprocessor:
    """The model's image processor, or resize + rescale + normalise from its config files.

    Args:
        model_dir: the exported folder (``preprocessor_config.json`` / ``config.json``), or None.
        height / width: the graph's fixed image size, when the graph says.
    """

    def __init__(self, model_dir: Path | None, height: int | None = None, width: int | None = None):
        self.processor = None
        pre = _read_json(model_dir / PREPROCESSOR_FILE) if model_dir else {}
        config = _read_json(model_dir / "config.json") if model_dir else {}
        if pre and importlib.util.find_spec("transformers") is not None:
            transformers = require("transformers", "export")
            try:
                self.processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
            except Exception as exc:
                logger.warning("%s: cannot load the image processor (%s); resizing and normalising", model_dir, exc)
        size = pre.get("size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        fallback = config.get("image_size") or 224
        fallback = (fallback, fallback) if isinstance(fallback, int) else tuple(fallback)
        self.height = int(height or size.get("height") or size.get("shortest_edge") or fallback[0])
        self.width = int(width or size.get("width") or size.get("shortest_edge") or fallback[1])
        self.mean = np.asarray(pre.get("image_mean") or config.get("image_mean") or (0.5, 0.5, 0.5), np.float32)
        self.std = np.asarray(pre.get("image_std") or config.get("image_std") or (0.5, 0.5, 0.5), np.float32)

    def __call__(self, paths: list[Path]) -> np.ndarray:
        """``[len(paths), 3, height, width]`` float32 pixel values."""
        pil = require("PIL.Image", "vision")
        images = []
        for p in paths:
            try:
                with pil.open(p) as im:
                    images.append(im.convert("RGB"))
            except Exception as exc:
                raise CalibrationDataError(f"{p}: not a readable image ({type(exc).__name__})") from exc
        if self.processor is not None:
            out = np.asarray(self.processor(images=images, return_tensors="np")["pixel_values"], np.float32)
            if out.shape[-2:] == (self.height, self.width):
                return out
            logger.warning("the image processor gives %s, the graph wants %dx%d: resizing instead",
                           out.shape[-2:], self.height, self.width)
        rows = []
        for im in images:
            arr = np.asarray(im.resize((self.width, self.height), pil.BILINEAR), np.float32) / 255.0
            rows.append(((arr - self.mean) / self.std).transpose(2, 0, 1))
        return np.stack(rows).astype(np.float32)


def image_feeds(folder: Path, specs: Mapping[str, Any], model_dir: Path | None, batch_size: int,
                num_samples: int | None) -> tuple[Iterator[dict[str, np.ndarray]], int]:
    """(iterator factory over ``{"pixel_values": batch}`` feeds, number of images) for the images in ``folder``."""
    if set(specs) != {"pixel_values"}:
        raise CalibrationDataError(
            f"{folder}: a folder of images feeds a graph with one input, pixel_values; this one takes "
            f"{', '.join(specs)}"
        )
    spec = specs["pixel_values"]
    dims = tuple(spec.dims) if spec.dims else ()
    height, width = (dims[2], dims[3]) if len(dims) == 4 else (None, None)
    files = image_files(folder)[: num_samples or None]
    prep = ImagePreprocessor(model_dir, height, width)

    def it() -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(files), batch_size):
            yield {"pixel_values": prep(files[i : i + batch_size]).astype(spec.dtype)}

    return it, len(files)
