"""No import circle in pool/ (issue 16 found two: daemon <-> reload, and operations ->
upgrade -> supervisor -> operations through a lazy import).

The graph counts every import, the ones inside functions too (a lazy import hides a
circle, it does not remove one), and skips ``if TYPE_CHECKING:`` blocks (types only:
nothing runs them).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pool")


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pool"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pool"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
            module = rel.removesuffix(".__init__")
            with open(path, encoding="utf-8") as f:
                out[module] = _imports(ast.parse(f.read(), path))
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The modules caught in circles: each strongly connected component of more than
    one module (Tarjan), sorted; every one of them holds at least one circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return comps


def test_no_import_circle_in_pool() -> None:
    g = graph()
    assert "pool.supervisor" in g and "pool.upgrade" in g and "pool.ctl.cli" in g
    assert cycles(g) == []


def test_the_check_finds_a_circle_hidden_in_a_function() -> None:
    g = {
        "pool.a": _imports(ast.parse("from pool.b import x")),
        "pool.b": _imports(ast.parse("def f():\n    from pool.a import y\n")),
        "pool.c": _imports(ast.parse("if TYPE_CHECKING:\n    from pool.a import z\n")),
    }
    assert cycles(g) == [["pool.a", "pool.b"]] and g["pool.c"] == set()
