"""Every listed architecture through export -> int8 -> int4 -> validate, on a tiny seeded model.

The fast suite runs a representative subset (an encoder, an encoder-decoder, speech, two vision families); the
slow suite runs them all (``benchmarks/coverage.py`` prints the README table from the same run). No stage may end
in an internal error; a stage failing for a reason owned elsewhere is an xfail naming it.
"""

from __future__ import annotations

import shutil

import pytest
from conftest import _tokenizer
from tiny_models import ARCHITECTURES, KNOWN_FAILURES, run_pipeline

from ortq.images import sample_images

pytest.importorskip("torch")
pytest.importorskip("transformers")

FAST = ("distilbert", "bart", "whisper", "deit", "clip-vision")
STAGES = ("export", "int8", "int4", "validate_int8", "validate_int4")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    found = sample_images()
    if not found:
        pytest.skip("scikit-image is not installed (pip install 'ortq[vision]'): no sample photographs")
    folder = tmp_path_factory.mktemp("coverage-images")
    for p in found[:4]:
        shutil.copy(p, folder / p.name)
    return folder


def _params():
    for name in ARCHITECTURES:
        marks = [] if name in FAST else [pytest.mark.slow]
        if name in KNOWN_FAILURES:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=False))
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_architecture_end_to_end(name, tmp_path, images):
    results = run_pipeline(name, tmp_path / name, _tokenizer(), images)
    internal = {s: v for s, v in results.items() if str(v).startswith("internal error")}
    assert not internal, internal
    assert {s: results.get(s) for s in STAGES} == dict.fromkeys(STAGES, "ok")
    if results.get("parity_max_abs_diff") is not None:
        assert results["parity_max_abs_diff"] < 1e-3
