"""No import cycles between the project's modules: the graph of every `import` in
lib_layout_retouch and layout_retouch_webui — at module level AND inside functions (a deferred
import hides a cycle, it does not remove it) — read with `ast`, must have no cycle."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("lib_layout_retouch", "layout_retouch_webui")


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _nearest_module(name: str, modules: set[str]) -> str:
    """`a.b.c` → the longest prefix that is a project module ("" if none)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imported_modules(path: pathlib.Path, root: pathlib.Path, modules: set[str]) -> set[str]:
    """The project modules that `path` imports anywhere in its body (relative imports resolved;
    `from package import name` counts `package.name` when that is a module, else `package`)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        found.update(_nearest_module(t, modules) for t in targets)
    return found - {"", name}


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    paths = [p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))]
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imported_modules(p, root, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, …, a] of a directed graph, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "lib_layout_retouch.retouch.loop" in graph  # the walk found the code
    assert "lib_layout_retouch.retouch.editor" in graph["lib_layout_retouch.retouch.loop"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_function_level_imports_count():
    """`hosts.current()` imports the Forge adapter inside the function: that edge is in the graph."""
    graph = import_graph()
    assert "layout_retouch_webui.hosts.forge" in graph["layout_retouch_webui.hosts"]


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),  # a diamond is no cycle
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
        ({"x": set(), "a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ],
)
def test_find_cycle_on_small_graphs(graph, cycle):
    assert find_cycle(graph) == cycle


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    pkg = tmp_path / "lib_layout_retouch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import thing\n    return thing\n")
    (tmp_path / "layout_retouch_webui").mkdir()
    graph = import_graph(tmp_path)
    assert graph["lib_layout_retouch.b"] == {"lib_layout_retouch.a"}
    assert find_cycle(graph) == [
        "lib_layout_retouch.a",
        "lib_layout_retouch.b",
        "lib_layout_retouch.a",
    ]
