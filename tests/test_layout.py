"""The package's parts import downward only: no cycle between modules or subpackages, counting
imports inside functions (those hide a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    found = {}
    for root, prefix in ((REPO / "mamba_ft", "mamba_ft"), (REPO / "kernels" / "triton", "mamba_ft.kernels")):
        for path in root.rglob("*.py"):
            parts = [part for part in path.relative_to(root).with_suffix("").parts if part != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def import_graph(depth: int) -> dict[str, set[str]]:
    """Edges between units named by the first `depth` dotted parts of each module."""
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from pkg import submodule` depends on the submodule; `from pkg import name`
                # on the module that defines it (owner() walks up to it).
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.startswith("mamba_ft") and (dep := owner(target)) and dep != name:
                    a, b = ".".join(name.split(".")[:depth]), ".".join(dep.split(".")[:depth])
                    if a != b:
                        graph.setdefault(a, set()).add(b)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_no_import_cycles(depth):
    assert cycles(import_graph(depth)) == []


def test_the_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
