"""Model loading and atomic output: nothing partial is ever left at the destination, inputs are never touched."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx

from ortq.errors import ModelError, OutputError, first_line

logger = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
# Protobuf cannot serialize a single message over 2 GiB; above this, weights go to an external data file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Older opsets are upgraded to ``ortq.passes.prepare.TARGET_OPSET`` with onnx.version_converter (model-zoo graphs
# are opset 7-9); a model must import some default-domain opset.
MIN_OPSET = 1


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Return the ``.onnx`` file for ``path``: the file itself, or ``model.onnx`` inside an exported folder."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / MODEL_FILENAME] + sorted(p.glob("*.onnx"))
        for c in candidates:
            if c.is_file():
                return c
        raise ModelError(f"{p}: folder holds no model.onnx (export one with `ortq export`)")
    if not p.exists():
        raise ModelError(f"{p}: no such file or folder")
    if not p.is_file():
        raise ModelError(f"{p}: not a regular file")
    return p


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX model, turning every failure into a one-line :class:`ModelError`."""
    p = resolve_model_path(path)
    try:
        model = onnx.load(str(p), load_external_data=load_external_data)
    except FileNotFoundError as exc:
        raise ModelError(f"{p}: external data file missing ({exc.filename or exc})") from exc
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning, ValueError, ...
        missing = _missing_external_data(p) if load_external_data else None
        if missing:
            raise ModelError(
                f"{p}: external data file {missing!r} is missing; keep it next to the model it belongs to"
            ) from exc
        raise ModelError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})") from exc
    if not model.graph.node:
        raise ModelError(f"{p}: the ONNX graph has no nodes")
    external = not load_external_data and _has_external_data(model)
    if external and (missing := _missing_external_data(p)):
        raise ModelError(f"{p}: external data file {missing!r} is missing; keep it next to the model it belongs to")
    try:  # by path when weights are (or must be) external: the checker then reads them from their file
        onnx.checker.check_model(str(p) if external or needs_external_data(model) else model)
    except Exception as exc:
        raise ModelError(f"{p}: invalid ONNX model ({first_line(exc)})") from exc
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ModelError(f"{p}: the model imports no default-domain (ai.onnx) opset")
    return model


def _missing_external_data(path: Path) -> str | None:
    """The first external data file ``path`` refers to that does not exist, if any."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

        for tensor in _get_all_tensors(model):
            if uses_external_data(tensor):
                location = ExternalDataInfo(tensor).location
                if not (path.parent / location).is_file():
                    return location
    except Exception:
        return None
    return None


def _has_external_data(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return any(uses_external_data(t) for t in _get_all_tensors(model))


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0




def tensor_bytes(model: onnx.ModelProto | Any) -> int:
    """Bytes of a model's initializers held in memory (``onnx.ModelProto`` or ``onnx_ir.Model``), without
    serializing it: a cheap lower bound of its protobuf size. Tensors already stored externally count 0."""
    if isinstance(model, onnx.ModelProto):
        total = 0
        for t in model.graph.initializer:
            total += (
                len(t.raw_data)
                + 4 * (len(t.float_data) + len(t.int32_data))
                + 8 * (len(t.int64_data) + len(t.double_data))
            )
        return total
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def weight_bytes(model: Any) -> int:
    """Bytes of an ``onnx_ir.Model``'s initializers, in memory or in external data files (nothing is read)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def needs_external_data(model: onnx.ModelProto | Any) -> bool:
    """Whether ``model`` is too large to pass through one protobuf message (save or hand over as bytes)."""
    return tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


def has_external_tensors(model: Any) -> bool:
    """Whether an ``onnx_ir.Model`` still reads some initializer from an external data file (its source's):
    saved or serialized as it is, the copy would point at a data file that is not beside it."""
    import onnx_ir as ir

    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def load_graph(path: str | os.PathLike) -> onnx.ModelProto:
    """The model at ``path`` with its initializers' values left out (names, types, shapes and external-data
    references stay): for reading the graph while sessions read the file. A model under 2 GB holds its weights
    inline; not keeping a copy of them spares their size while a session holds its own."""
    proto = onnx.load(str(path), load_external_data=False)
    stubs = []
    for t in proto.graph.initializer:
        stub = onnx.TensorProto(name=t.name, dims=t.dims, data_type=t.data_type, data_location=t.data_location)
        stub.external_data.extend(t.external_data)
        stubs.append(stub)
    del proto.graph.initializer[:]
    light = onnx.ModelProto()
    light.CopyFrom(proto)  # the graph without initializers: the message holding the weights is dropped whole
    light.graph.initializer.extend(stubs)
    return light


def computed_on_read(sources: Sequence[Any], compute: Callable[..., Any], shape: Sequence[int]) -> Any:
    """An ``onnx_ir.LazyTensor`` of ``compute(*arrays of sources)``, evaluated each time it is read (when the
    model is written), the ``sources`` (tensors mapped from an external data file) unmapped after: a model
    holding such tensors holds no copy of a large model's weights."""
    import numpy as np
    import onnx_ir as ir

    def evaluate() -> Any:
        out = np.asarray(compute(*(t.numpy() for t in sources)))
        for t in sources:
            try:
                t.release()
            except BufferError:  # a view of the source is alive elsewhere: it stays mapped
                pass
        return ir.tensor(out)

    return ir.LazyTensor(evaluate, dtype=sources[0].dtype, shape=ir.Shape(list(shape)))


def unmap(values: Iterable[Any]) -> None:
    """Close the file mapping of ``onnx_ir`` initializers read from an external data file: their pages leave
    the process (read again, they map again). One with a view of it still alive stays mapped."""
    import onnx_ir as ir

    for v in values:
        tensor = v.const_value if v is not None else None
        if isinstance(tensor, ir.ExternalTensor):
            try:
                tensor.release()
            except BufferError:
                pass


def unmap_all(model: Any) -> None:
    """:func:`unmap` every initializer of an ``onnx_ir.Model``'s main graph: before a session maps (or copies)
    the same weights, this process lets go of its own pages of them."""
    unmap(model.graph.initializers.values())


def save_ir_model(model: Any, path: str | os.PathLike) -> None:
    """Write an ``onnx_ir.Model`` to ``path``; weights go to ``<name>.data`` when the model is too big for one
    protobuf or still maps some of them from another file."""
    import onnx_ir as ir

    p = Path(path)
    external = needs_external_data(model) or has_external_tensors(model)
    ir.save(model, p, external_data=p.name + ".data" if external else None)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path``; weights go to ``<name>.data`` when the model is too big for one protobuf."""
    p = Path(path)
    if needs_external_data(model):
        onnx.save_model(
            model, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location=p.name + ".data"
        )
    else:
        onnx.save_model(model, str(p))


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output_dir(output: str | os.PathLike, *, inputs: tuple[Path, ...] = (), overwrite: bool = False) -> Path:
    """Refuse an output that equals or contains an input, or that exists without ``overwrite``."""
    out = Path(output)
    for inp in inputs:
        inp = Path(inp)
        if _same_path(out, inp) or _same_path(out, inp.parent if inp.is_file() else inp):
            raise OutputError(f"{out}: output equals the input; choose another --output")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    parent = out.absolute().parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{out}: cannot create parent folder ({exc.strerror})") from exc
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: parent folder {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; on success it replaces ``output`` in one rename.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and ``output`` is left as
    it was. Disk-full and permission errors become :class:`OutputError`.
    """
    out = Path(output).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write here ({exc.strerror})") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        old = None
        if out.exists():
            if not overwrite and any(out.iterdir()):
                raise OutputError(f"{out}: exists and is not empty; pass --overwrite to replace it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"{out}: no space left on device; nothing was written") from exc
        raise OutputError(f"{out}: cannot write output ({exc.strerror or exc}); nothing was written") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "config.json",
    "generation_config.json",
    "genai_config.json",
    "preprocessor_config.json",
)


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy tokenizer and config files of an exported folder (not the model) to ``dst_dir``."""
    copied = []
    for name in TOKENIZER_FILES:
        f = src_dir / name
        if f.is_file():
            shutil.copy2(f, dst_dir / name)
            copied.append(name)
    return copied


# Files any of which lets transformers' AutoTokenizer load a tokenizer from a folder.
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def has_tokenizer(path: str | os.PathLike) -> bool:
    """Whether the folder of ``path`` (a folder, or a file inside one) holds tokenizer files."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    return any((folder / name).is_file() for name in _TOKENIZER_MARKERS)
