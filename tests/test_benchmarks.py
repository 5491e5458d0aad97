"""Every benchmark script still imports and parses ``--help`` against the library as it is now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_script_help(script: Path) -> None:
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                         cwd=script.parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    if '__name__ == "__main__"' in script.read_text():  # a script, not a module the others import
        assert "usage" in run.stdout.lower()
