"""No import cycle between the package's modules: read from the source (every import statement, also those inside
functions), so a lazy import that runs back up a layer counts too.

An edge goes to the module named (`from .heads import X` -> hf.heads; `from . import patching` -> hf.patching); an
import of a package's own name (`from .. import x` where x is not a module) goes to its `__init__`. A submodule's
import of its parent packages is Python's machinery, not a dependency, so `__init__` files that re-export are not
counted as cycles through their children.
"""
from __future__ import annotations

import ast
from pathlib import Path

import hf_fusedce

ROOT = Path(hf_fusedce.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ("hf_fusedce", *path.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _targets(name: str, path: Path, node, mods) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    base = f"{package}.{node.module}" if node.level and node.module else (package if node.level else node.module)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(t for t in _targets(name, path, node, mods) if t in mods and t != name
                             and not name.startswith(t + "."))  # a submodule -> its parent package: machinery
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "hf_fusedce.hf.patching" in graph["hf_fusedce.hf.proof"]  # `from . import patching` in a function
    assert "hf_fusedce.hf.recorded" in graph["hf_fusedce.hf.patching"]


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []
