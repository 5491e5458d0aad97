"""Calibration and validation data: files, datasets and iterables turned into batches of ONNX feeds.

Accepted sources:
  * a text file (``.txt``): one sample per line;
  * ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``: a ``text`` column, or columns named after graph inputs;
  * ``.npz``: arrays keyed by graph input name, first axis = samples;
  * a folder of images, for a graph taking ``pixel_values`` (:mod:`ortq.images`);
  * a ``datasets.Dataset``, a list of strings, or any iterable of feed dicts (``{input_name: array}``).

Text is tokenized with the exported folder's tokenizer and padded per batch to its longest sample; the
attention mask is kept so calibration can ignore padded positions.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ortq.errors import CalibrationDataError, require
from ortq.tasks import is_past_input

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
TEXT_COLUMNS = ("text", "sentence", "content", "question")


@dataclass(frozen=True)
class InputSpec:
    """A graph input: numpy dtype, rank (None when unknown) and its fixed dimensions (None where dynamic)."""

    name: str
    dtype: np.dtype
    rank: int | None
    dims: tuple[int | None, ...] = ()
    dim_names: tuple[str | None, ...] = ()  # symbolic names of the dynamic dimensions

    def empty_past(self, batch_size: int) -> np.ndarray:
        """A KV-cache input of past length 0 (``[batch, heads, 0, head_dim]``): what a prefill feeds."""
        shape = [batch_size] + [d if d is not None else 0 for d in self.dims[1:]]
        return np.zeros(shape, dtype=self.dtype)


def graph_inputs(model: onnx.ModelProto | str | os.PathLike) -> dict[str, InputSpec]:
    """The graph's real inputs (initializers that double as inputs are left out)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype("float32")
        rank = len(tt.shape.dim) if tt.HasField("shape") else None
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim) if rank else ()
        names = tuple(d.dim_param or None for d in tt.shape.dim) if rank else ()
        specs[vi.name] = InputSpec(vi.name, dtype, rank, dims, names)
    return specs


def sample_axes(specs: Mapping[str, InputSpec]) -> dict[str, int | None]:
    """Per input, the axis that runs over samples: the one carrying the batch dimension's symbolic name (the
    name most inputs give their first axis, e.g. a recurrent state ``[2, batch, 128]`` has it second), else
    0; None for a scalar input, which every batch gets whole (a sample rate)."""
    firsts = [s.dim_names[0] for s in specs.values() if s.dim_names and s.dim_names[0]]
    batch = max(set(firsts), key=firsts.count) if firsts else None
    axes: dict[str, int | None] = {}
    for name, spec in specs.items():
        if spec.rank == 0:
            axes[name] = None
        elif batch is not None and batch in spec.dim_names:
            axes[name] = spec.dim_names.index(batch)
        else:
            axes[name] = 0
    return axes


# --------------------------------------------------------------------------------------------- real text


def _sentences(text: str) -> Iterator[str]:
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in para.splitlines()]
        # Code samples and tables are indented or full of symbols; keep prose.
        if any(ln.startswith((">>>", "...", "|", "+--", "=")) for ln in lines):
            continue
        flat = " ".join(lines)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            s = s.strip()
            words = s.split()
            if not 5 <= len(words) <= 80:
                continue
            letters = sum(c.isalpha() or c.isspace() for c in s)
            if letters / len(s) < 0.8:
                continue
            yield s


_DOC_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "io", "itertools", "json",
    "logging", "os", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
    "uuid", "zipfile",
)


def _documents() -> Iterator[str]:
    """Python's reference topics, then the docstrings of common standard-library modules."""
    import importlib
    import inspect
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        yield inspect.getdoc(mod) or ""
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            with warnings.catch_warnings():  # typing.io / typing.re warn on access
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = getattr(mod, attr)
                if getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                doc = inspect.getdoc(obj) or ""
            yield doc


def real_text(split: str = "calibration", num_samples: int | None = None) -> list[str]:
    """Real English sentences from Python's own documentation (``pydoc_data`` and standard-library
    docstrings), available offline on any Python installation.

    ``split`` is ``"calibration"`` or ``"heldout"``; the two are disjoint (a stable hash of each sentence
    decides, one in five goes to heldout) and each is in a fixed order.
    """
    if split not in ("calibration", "heldout"):
        raise CalibrationDataError(f"unknown split {split!r}; use 'calibration' or 'heldout'")
    seen = set()
    out = []
    for doc in _documents():
        for s in _sentences(doc):
            if s in seen:
                continue
            seen.add(s)
            held = zlib.crc32(s.encode()) % 5 == 0
            if held == (split == "heldout"):
                out.append(s)
    # Interleave topics deterministically so that a prefix covers many subjects.
    rng = np.random.default_rng(1234)
    order = rng.permutation(len(out))
    out = [out[i] for i in order]
    if num_samples is not None:
        if num_samples > len(out):
            logger.warning("only %d %s sentences are available (asked for %d)", len(out), split, num_samples)
        out = out[:num_samples]
    return out


# ---------------------------------------------------------------------------------------------- batches


class Batches:
    """A re-iterable sequence of feed dicts, with its sample count known up front (for progress bars)."""

    def __init__(self, make_iter: Callable[[], Iterator[Feeds]], num_samples: int | None, batch_size: int):
        self._make_iter = make_iter
        self.num_samples = num_samples
        self.batch_size = batch_size

    @property
    def num_batches(self) -> int | None:
        if self.num_samples is None:
            return None
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Feeds]:
        return self._make_iter()

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("number of batches unknown")
        return self.num_batches


def load_tokenizer(tokenizer: Any):
    """A tokenizer object, or the folder of one (loaded with transformers, offline)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        return None
    transformers = require("transformers", "export")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CalibrationDataError(f"{path}: cannot load tokenizer ({exc})") from exc


def _check_array(name: str, arr: np.ndarray, spec: InputSpec | None, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if spec is None:
        return arr
    if spec.rank is not None and arr.ndim != spec.rank:
        raise CalibrationDataError(f"{where}: input {name!r} has rank {arr.ndim}, the graph expects {spec.rank}")
    if arr.dtype != spec.dtype:
        same_kind = (np.issubdtype(arr.dtype, np.integer) and np.issubdtype(spec.dtype, np.integer)) or (
            np.issubdtype(arr.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating)
        )
        if not same_kind and not (arr.dtype == bool and np.issubdtype(spec.dtype, np.integer)):
            raise CalibrationDataError(
                f"{where}: input {name!r} has dtype {arr.dtype}, the graph expects {spec.dtype}"
            )
        arr = arr.astype(spec.dtype)
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise CalibrationDataError(f"{where}: input {name!r} holds NaN or infinite values")
    return arr


def _with_empty_past(feeds: Mapping[str, Any], specs: Mapping[str, InputSpec]) -> dict[str, Any]:
    """``feeds`` plus a KV cache of length 0 for every past input they lack (data describes prompts)."""
    missing = [n for n in specs if n not in feeds and is_past_input(n)]
    if not missing or not feeds:
        return dict(feeds)
    batch = len(next(iter(feeds.values())))
    return {**feeds, **{n: specs[n].empty_past(batch) for n in missing}}


def _check_feeds(feeds: Mapping[str, Any], specs: Mapping[str, InputSpec], where: str) -> Feeds:
    if not isinstance(feeds, Mapping):
        raise CalibrationDataError(f"{where}: expected a dict of input name -> array, got {type(feeds).__name__}")
    feeds = _with_empty_past(feeds, specs)
    unknown = sorted(set(feeds) - set(specs))
    missing = sorted(set(specs) - set(feeds))
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown input(s) {', '.join(unknown)}")
        raise CalibrationDataError(f"{where}: {'; '.join(parts)} (graph inputs: {', '.join(specs)})")
    return {k: _check_array(k, v, specs[k], where) for k, v in feeds.items()}


def _tokenize(texts: Sequence[str], tokenizer, specs: Mapping[str, InputSpec], max_length: int) -> Feeds:
    enc = tokenizer(
        list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="np"
    )
    feeds = {}
    for name, spec in specs.items():
        if name in enc:
            feeds[name] = np.asarray(enc[name]).astype(spec.dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(enc["input_ids"], dtype=spec.dtype)
        elif name == "position_ids":
            mask = np.asarray(enc["attention_mask"])
            feeds[name] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(spec.dtype)
        elif is_past_input(name):
            feeds[name] = spec.empty_past(len(enc["input_ids"]))
        else:
            raise CalibrationDataError(
                f"text data cannot feed graph input {name!r}; give .npz or .jsonl data with that column"
            )
    return feeds


def _pad_rows(rows: list[Any], dtype: np.dtype) -> np.ndarray:
    if all(np.ndim(r) == 0 for r in rows):
        return np.asarray(rows, dtype=dtype)
    arrays = [np.asarray(r) for r in rows]
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays).astype(dtype)
    if any(a.ndim != 1 for a in arrays):
        raise CalibrationDataError("rows of different shapes can only be padded when they are 1-D sequences")
    width = max(a.shape[0] for a in arrays)
    out = np.zeros((len(arrays), width), dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            records = []
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise CalibrationDataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            return records
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = data.get("data", data.get("samples", [data]))
            return list(data)
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh))
        if suffix == ".parquet":
            datasets = require("datasets", "datasets")
            return list(datasets.Dataset.from_parquet(str(path)))
    except CalibrationDataError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, ValueError) as exc:
        raise CalibrationDataError(f"{path}: cannot parse as {suffix[1:]} ({type(exc).__name__})") from exc
    raise CalibrationDataError(f"{path}: unsupported data format {suffix!r}")


def _text_of(record: Mapping[str, Any], where: str) -> str | None:
    for col in TEXT_COLUMNS:
        if col in record and isinstance(record[col], str):
            return record[col]
    return None


def load_batches(
    source: Any,
    *,
    model: onnx.ModelProto | str | os.PathLike | None = None,
    inputs: Mapping[str, InputSpec] | None = None,
    tokenizer: Any = None,
    batch_size: int = 16,
    num_samples: int | None = None,
    max_length: int = 128,
) -> Batches:
    """Turn ``source`` into :class:`Batches` of feeds for the graph of ``model`` (or the given ``inputs``).

    Args:
        source: a path, a ``datasets.Dataset``, a list of strings or an iterable of feed dicts.
        model: the ONNX model (path or proto) whose inputs the feeds must match.
        inputs: the graph inputs, when ``model`` is not given.
        tokenizer: a tokenizer or a folder holding one; needed for text. Defaults to the model's folder.
        batch_size: samples per batch.
        num_samples: use at most this many samples.
        max_length: text is truncated to this many tokens.
    """
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise CalibrationDataError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationDataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if inputs is None:
        if model is None:
            raise CalibrationDataError("load_batches needs the model or its inputs")
        inputs = graph_inputs(model)
        if tokenizer is None and isinstance(model, (str, os.PathLike)):
            p = Path(model)
            tokenizer = p if p.is_dir() else p.parent
    specs = dict(inputs)

    def text_batches(texts: list[str], where: str) -> Batches:
        texts = [t for t in texts if t and t.strip()]
        if num_samples is not None:
            texts = texts[:num_samples]
        if not texts:
            raise CalibrationDataError(f"{where}: no samples")
        tok = load_tokenizer(tokenizer)
        if tok is None:
            raise CalibrationDataError(
                f"{where}: text data needs a tokenizer; quantize an exported folder (with tokenizer files) "
                "or give .npz data keyed by graph input names"
            )

        def it() -> Iterator[Feeds]:
            for i in range(0, len(texts), batch_size):
                yield _tokenize(texts[i : i + batch_size], tok, specs, max_length)

        return Batches(it, len(texts), batch_size)

    def record_batches(records: list[Mapping[str, Any]], where: str) -> Batches:
        if num_samples is not None:
            records = records[:num_samples]
        if not records:
            raise CalibrationDataError(f"{where}: no samples")
        first = records[0]
        if not isinstance(first, Mapping):
            raise CalibrationDataError(f"{where}: each record must be an object, got {type(first).__name__}")
        if set(specs) <= set(first):
            def it() -> Iterator[Feeds]:
                for i in range(0, len(records), batch_size):
                    chunk = records[i : i + batch_size]
                    feeds = {k: _pad_rows([r[k] for r in chunk], specs[k].dtype) for k in specs}
                    yield _check_feeds(feeds, specs, where)

            return Batches(it, len(records), batch_size)
        texts = [_text_of(r, where) for r in records]
        if any(t is None for t in texts):
            raise CalibrationDataError(
                f"{where}: records need a 'text' column or columns named after the graph inputs "
                f"({', '.join(specs)}); found {', '.join(map(str, first))}"
            )
        return text_batches(texts, where)

    if isinstance(source, Batches):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise CalibrationDataError(f"{path}: no such file")
        if path.is_dir():
            if "pixel_values" in specs:  # a folder of images, preprocessed like the model expects
                from ortq.images import image_feeds

                processor_dir = Path(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
                make_iter, n = image_feeds(path, specs, processor_dir, batch_size, num_samples)
                return Batches(make_iter, n, batch_size)
            raise CalibrationDataError(
                f"{path}: is a folder; give a .txt, .jsonl, .csv, .parquet or .npz file (or, for a model "
                "taking pixel_values, a folder of images)"
            )
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return _npz_batches(path, specs, batch_size, num_samples)
        if suffix in (".txt", ".text", ""):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise CalibrationDataError(f"{path}: not UTF-8 text") from exc
            return text_batches(lines, where)
        return record_batches(_read_records(path), where)
    if hasattr(source, "column_names") and hasattr(source, "select"):  # datasets.Dataset
        if num_samples is not None:
            source = source.select(range(min(num_samples, len(source))))
        return record_batches(list(source), "dataset")
    if isinstance(source, np.ndarray):
        raise CalibrationDataError("give arrays as a dict keyed by graph input name, or as an .npz file")
    if isinstance(source, Mapping):
        return _array_batches(dict(source), specs, batch_size, num_samples, "data")
    if isinstance(source, Iterable):
        items = list(itertools.islice(iter(source), None))
        if not items:
            raise CalibrationDataError("calibration data is empty")
        if all(isinstance(x, str) for x in items):
            return text_batches(items, "data")
        if all(isinstance(x, Mapping) for x in items):
            as_feeds = all(x and all(isinstance(v, np.ndarray) for v in x.values()) for x in items)
            if as_feeds:
                feeds = [_check_feeds(x, specs, "data") for x in items]
                if num_samples is not None:
                    feeds = _limit_feeds(feeds, num_samples)
                n = sum(len(next(iter(f.values()))) if f else 0 for f in feeds)
                return Batches(lambda: iter(feeds), n, max(1, -(-n // max(1, len(feeds)))))
            return record_batches(items, "data")
        raise CalibrationDataError("data must be strings, records or feed dicts")
    raise CalibrationDataError(f"unsupported calibration data of type {type(source).__name__}")


def _limit_feeds(feeds: list[Feeds], num_samples: int) -> list[Feeds]:
    out, left = [], num_samples
    for f in feeds:
        if left <= 0:
            break
        n = len(next(iter(f.values())))
        out.append({k: v[:left] for k, v in f.items()} if n > left else f)
        left -= n
    return out


def _array_batches(
    arrays: dict[str, np.ndarray], specs: Mapping[str, InputSpec], batch_size: int, num_samples: int | None, where: str
) -> Batches:
    arrays = _check_feeds(arrays, specs, where)
    axes = {k: a for k, a in sample_axes(specs).items() if k in arrays}
    axes = {k: (None if arrays[k].ndim == 0 else a) for k, a in axes.items()}
    lengths = {arrays[k].shape[a] for k, a in axes.items() if a is not None}
    if len(lengths) != 1:
        where_axes = ", ".join(f"{k}: axis {a}" for k, a in axes.items() if a is not None and a != 0)
        raise CalibrationDataError(f"{where}: arrays disagree on the number of samples (first axis"
                                   f"{'; ' + where_axes if where_axes else ''}): {sorted(lengths)}")
    n = lengths.pop()
    if num_samples is not None:
        n = min(n, num_samples)
    if n == 0:
        raise CalibrationDataError(f"{where}: no samples")
    # A graph with a fixed batch dimension (model-zoo graphs: [1, 3, 224, 224]) gets batches of that size.
    fixed = {specs[k].dims[a] for k, a in axes.items()
             if a is not None and k in specs and a < len(specs[k].dims) and specs[k].dims[a] is not None}
    if len(fixed) == 1 and (size := fixed.pop()) != batch_size and size > 0:
        if n < size:
            raise CalibrationDataError(f"{where}: {n} samples, the graph's batch dimension is fixed at {size}")
        logger.info("%s: batches of %d samples, the graph's fixed batch dimension", where, size)
        batch_size, n = size, n - n % size

    def it() -> Iterator[Feeds]:
        for i in range(0, n, batch_size):
            rows = slice(i, min(i + batch_size, n))
            yield {k: v if axes.get(k) is None else np.take(v, np.arange(n)[rows], axis=axes[k])
                   for k, v in arrays.items()}

    return Batches(it, n, batch_size)


def _npz_batches(path: Path, specs: Mapping[str, InputSpec], batch_size: int, num_samples: int | None) -> Batches:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz file ({type(exc).__name__})") from exc
    if not arrays:
        raise CalibrationDataError(f"{path}: no arrays")
    return _array_batches(arrays, specs, batch_size, num_samples, str(path))
