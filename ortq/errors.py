"""The errors ortq raises on bad input. The CLI prints ``error: <message>`` and exits non-zero."""

from __future__ import annotations

import re


class OrtqError(Exception):
    """Base class of every error ortq raises on purpose. Messages are one line and say what to do."""

    exit_code = 2


class ConfigError(OrtqError, ValueError):
    """An invalid configuration value (a negative block size, an unknown preset, ...)."""


class ModelError(OrtqError):
    """The input model is missing, unreadable, invalid or unsupported."""


class CalibrationDataError(OrtqError):
    """Calibration or validation data is missing, empty, malformed or does not fit the graph."""


class ExportError(OrtqError):
    """A PyTorch / transformers model could not be exported to ONNX."""


class OutputError(OrtqError):
    """The output cannot be written (exists without overwrite, equals the input, not writable, disk full)."""


class ValidationFailed(OrtqError):
    """A validation threshold (``--min-cosine``, ``--max-latency-ratio``, ...) was violated."""

    exit_code = 1


class MissingDependencyError(OrtqError, ImportError):
    """An optional dependency (torch, transformers, datasets, matplotlib, ...) is not installed."""


class Interrupted(OrtqError):
    """The run was interrupted (SIGINT / SIGTERM); nothing was written."""

    exit_code = 130


_ORT_PREFIX = re.compile(
    r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*"  # [ONNXRuntimeError] : 1 : FAIL :
    r"(?:\S+\.(?:cc|h|cpp|cu):\d+\s+)?"  # /onnxruntime_src/.../model.cc:256
    r"(?:[\w:~<>]+\([^)]*\)\s+)?"  # onnxruntime::Model::Model(...)
)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, without ONNX Runtime's ``[ONNXRuntimeError] : N : FAIL :
    file.cc:123 signature`` prefix, cut to ``limit`` characters: what a one-line error can carry."""
    text = str(exc).strip() or type(exc).__name__
    line = _ORT_PREFIX.sub("", text.splitlines()[0]).strip() or text.splitlines()[0]
    return line[:limit]


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`MissingDependencyError` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is required for this feature: pip install 'ortq[{extra}]' ({exc})"
        ) from exc
