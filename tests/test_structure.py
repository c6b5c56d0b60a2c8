"""The package's shape: no import cycles (module-level or inside functions), modules and functions of a readable size."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lit_moral"


def _imports() -> dict[str, set[str]]:
    """module -> the lit_moral modules it imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    graph = {}
    for f in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lit_moral"):
                parts = node.module.split(".")
                deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lit_moral.")}
        graph[f.stem] = deps - {f.stem}
    return graph


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert "module" in graph and "cli" not in graph["module"] and "module" not in graph["learners"]


def test_functions_stay_readable():
    """House style (DESIGN.md): functions of at most ~60 lines (signatures with many documented settings excepted)."""
    long = []
    for f in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                if not body:  # a documented hook with no code (Protocol methods)
                    continue
                n = body[-1].end_lineno - body[0].lineno + 1
                if n > 60:
                    long.append(f"{f.name}:{node.name} ({n} lines)")
    assert not long, long
