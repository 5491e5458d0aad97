"""Progress bars: drawn on a terminal only (never as carriage-return frames in a log file), and silenced
altogether by :func:`set_enabled` (``ortq --quiet``)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn every progress bar of ortq on or off."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether bars are on and stderr is a terminal to draw them on."""
    return _enabled and sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             leave: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one), drawn only when :func:`enabled`."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not enabled(), **kwargs)
