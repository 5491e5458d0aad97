"""Import layering of the validation package, read with ``ast`` (function-level imports included).

``ortq.validate`` sits beside passes, calibrators, export and recipes: it may use the runtime and data
layers, the leaf modules and the quantization grid of ``ortq.passes``, never the layers above it; and nothing
below it may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ortq"

VALIDATE_MAY_IMPORT = (
    "ortq.validate",
    "ortq.runtime",
    "ortq.data",
    "ortq.config",
    "ortq.io",
    "ortq.tasks",
    "ortq.progress",
    "ortq.hostinfo",
    "ortq.errors",
    "ortq.passes.plan",
    "ortq.passes.grid",
)
BELOW_VALIDATE = ("runtime", "data", "config", "io", "tasks", "progress", "hostinfo", "errors")


def _ortq_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``ortq`` import in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ortq"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            mod = node.module or ""
            if mod == "ortq":
                out += [(node.lineno, f"ortq.{a.name}") for a in node.names]
            elif mod.startswith("ortq."):
                out.append((node.lineno, mod))
    return out


def _allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", sorted((ROOT / "validate").glob("*.py")) + [ROOT / "passes" / "grid.py"],
                         ids=lambda p: p.name)
def test_validate_imports_only_lower_layers(path):
    allowed = VALIDATE_MAY_IMPORT if path.parent.name == "validate" else ("ortq.passes.plan", "ortq.errors")
    bad = [f"{path.name}:{line} imports {mod}" for line, mod in _ortq_imports(path) if not _allowed(mod, allowed)]
    assert not bad, bad


@pytest.mark.parametrize("name", BELOW_VALIDATE)
def test_lower_layers_do_not_import_validate(name):
    path = ROOT / f"{name}.py"
    bad = [f"{name}.py:{line} imports {mod}" for line, mod in _ortq_imports(path) if _allowed(mod, ("ortq.validate",))]
    assert not bad, bad


def test_old_modules_are_gone():
    assert not (ROOT / "analysis.py").exists() and not (ROOT / "report.py").exists()
    assert not (ROOT / "validate.py").exists()
