"""Real English passages for language-model calibration and evaluation, all available offline.

* ``python-docs``: Python's own documentation (``pydoc_data`` topics and standard-library docstrings), the
  sentences of :func:`ortq.data.real_text` joined into passages; the ``calibration`` and ``heldout`` splits
  are disjoint.
* ``news``: the Lee news corpus (300 Australian Broadcasting Corporation news articles, 2000-2001) that the
  ``gensim`` wheel ships as test data (``gensim/test/test_data/lee_background.cor``; install ``ortq[datasets]``).
  A domain far from Python documentation: what an int4 recipe calibrated on documentation must still hold on.
  Articles with an even index (crc32 of the text) are ``calibration``, the others ``heldout``.
* ``mixed``: documentation and news interleaved (the default calibration text of the weight-only recipes when
  the news corpus is installed; documentation alone otherwise).

The file is located with ``importlib.util.find_spec``: ``gensim`` itself is never imported.
"""

from __future__ import annotations

import importlib.util
import logging
import zlib
from pathlib import Path

from ortq.data import real_text
from ortq.errors import CalibrationDataError

logger = logging.getLogger(__name__)

DOMAINS = ("python-docs", "news", "mixed")
_NEWS_FILE = ("test", "test_data", "lee_background.cor")


def news_path() -> Path | None:
    """Where the Lee news corpus is installed, or None."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_NEWS_FILE)
    return path if path.is_file() else None


def news_articles(split: str = "heldout") -> list[str]:
    """The news articles of ``split`` (see the module docstring)."""
    _check_split(split)
    path = news_path()
    if path is None:
        raise CalibrationDataError(
            "the news corpus is not installed: pip install 'ortq[datasets]' (it ships in the gensim wheel)"
        )
    articles = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [a for a in articles if (zlib.crc32(a.encode()) % 2 == 1) == (split == "heldout")]


def doc_passages(split: str = "heldout", num_chars: int = 1200) -> list[str]:
    """Sentences of Python's documentation (:func:`ortq.data.real_text`) joined into passages of about
    ``num_chars`` characters."""
    _check_split(split)
    passages, current = [], ""
    for sentence in real_text(split):
        current = f"{current} {sentence}" if current else sentence
        if len(current) >= num_chars:
            passages.append(current)
            current = ""
    return passages


def passages(domain: str, split: str = "heldout", num_samples: int | None = None) -> list[str]:
    """``num_samples`` passages of ``domain`` (``python-docs``, ``news`` or ``mixed``) from ``split``."""
    if domain not in DOMAINS:
        raise CalibrationDataError(f"unknown text domain {domain!r}; use one of {', '.join(DOMAINS)}")
    if domain == "python-docs":
        out = doc_passages(split)
    elif domain == "news":
        out = news_articles(split)
    else:
        docs = doc_passages(split)
        news = news_articles(split) if news_path() is not None else []
        if not news:
            logger.warning("news corpus not installed: 'mixed' text is Python documentation only")
        out = [p for pair in zip(docs, news) for p in pair] + docs[len(news):] if news else docs
    return out if num_samples is None else out[:num_samples]


def _check_split(split: str) -> None:
    if split not in ("calibration", "heldout"):
        raise CalibrationDataError(f"unknown split {split!r}; use 'calibration' or 'heldout'")
