"""The package's import graph (every import: at the top, under TYPE_CHECKING, inside functions):
the pipeline never imports a runner, the engine and the views no runner and no pipeline, and no
runner, view or the pipeline sits in an import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import meshaudit

ROOT = Path(meshaudit.__file__).parent


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        if "_proto" in rel.parts:
            continue
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            graph[m].update(n for n in names if n in mods and n != m)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
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
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_sees_the_imports_it_checks() -> None:
    g = _graph()
    assert "meshaudit.pipeline" in g["meshaudit.runtime.single"]
    assert "meshaudit.runtime.link" in g["meshaudit.runtime.coordinator"]
    assert "meshaudit.runtime" in g["meshaudit.cli"]  # inside a function
    assert "meshaudit.engine.rules" in g["meshaudit.engine.setup"]


def test_only_the_command_line_imports_a_runner() -> None:
    g = _graph()
    wrong = {
        (m, dep)
        for m, deps in g.items()
        if not _in(m, "meshaudit.runtime") and m != "meshaudit.cli"
        for dep in deps
        if _in(dep, "meshaudit.runtime")
    }
    assert wrong == set()


def test_the_engine_and_the_views_import_neither_the_pipeline_nor_a_runner() -> None:
    g = _graph()
    wrong = {
        (m, dep)
        for m, deps in g.items()
        if _in(m, "meshaudit.engine", "meshaudit.views", "meshaudit.receivers", "meshaudit.sinks")
        for dep in deps
        if _in(dep, "meshaudit.pipeline", "meshaudit.runtime", "meshaudit.cli")
    }
    assert wrong == set()


def test_no_runner_view_or_the_pipeline_is_in_an_import_cycle() -> None:
    mine = ("meshaudit.pipeline", "meshaudit.runtime", "meshaudit.views")
    knots = [sorted(c) for c in _cycles(_graph()) if any(_in(m, *mine) for m in c)]
    assert knots == []
