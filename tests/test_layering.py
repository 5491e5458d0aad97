"""The package's shape: no import cycle, no import from a lower layer up to a higher one, no module too long.

Layers, top to bottom (a module may import its own layer and the ones below it, never above):
cli -> pipeline -> quantizer -> quantize_steps (the orchestrator) -> fallback -> stages (passes, calibrators, validate, export, recipes, generate)
-> runtime, data -> base (config, io, tasks, progress, hostinfo) -> errors.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ortq"

LAYERS = [
    ["ortq.errors"],
    ["ortq.config", "ortq.io", "ortq.tasks", "ortq.progress", "ortq.hostinfo"],
    ["ortq.runtime", "ortq.data", "ortq.images", "ortq.corpus"],
    ["ortq.passes", "ortq.calibrators", "ortq.validate", "ortq.export", "ortq.recipes", "ortq.generate",
     "ortq.generate_seq2seq"],
    ["ortq.fallback", "ortq.fallback_sim"],
    ["ortq.quantize_steps"],
    ["ortq.quantizer", "ortq.seq2seq"],
    ["ortq.pipeline"],
    ["ortq.cli", "ortq"],
]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(("ortq",) + f.relative_to(PACKAGE).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _layer(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ortq module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        # A package's own __init__ is not an edge of its submodules.
        graph[name] = {m for m in _imports(path, modules) if m != name and not name.startswith(m + ".")}
    return graph


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_upward_import():
    upward = [
        f"{a} -> {b}"
        for a, targets in sorted(_graph().items())
        for b in sorted(targets)
        if a != "ortq" and _layer(b) > _layer(a)
    ]
    assert upward == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_size(module):
    lines = len(_modules()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines: split it by job"


def test_sessions_are_opened_in_one_place():
    """Every ONNX Runtime session comes from ``ortq.runtime.create_session`` (threads, spinning, providers and
    the >2 GB path decided once), and the 2 GB threshold is written once, in ``ortq.io``."""
    sessions, thresholds = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if "InferenceSession(" in text and name != "ortq.runtime":
            sessions.append(name)
        if "1_800_000_000" in text and name != "ortq.io":
            thresholds.append(name)
    assert sessions == [] and thresholds == []
