"""The project's imports read with `ast` (nothing is imported): every `import` anywhere in a module's
body — at module level AND inside functions (a deferred import hides a dependency, it does not remove
it) — relative imports resolved. Used by the import guards (tests/test_imports.py: no cycles, who
may import whom) and the host-import rule (tests/test_glue_library.py)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """The dotted names `source` (the text of `module`) imports: `import a.b` → `a.b`,
    `from a import b` → `a.b` (b may be a module or a name in `a`), `from . import b` resolved
    against `module`'s package (`is_package`: `module` is a package's __init__)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.update(base if a.name == "*" else f"{base}.{a.name}" for a in node.names)
    return found


def nearest_module(name: str, modules: set[str]) -> str:
    """`a.b.c` → the longest prefix that is a project module ("" if none)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


class Imports:
    """The modules of `folders` (paths under `root`), what each imports (`names`), and the graph of
    project modules between them (`graph`)."""

    def __init__(self, folders, root: pathlib.Path = ROOT):
        self.root = pathlib.Path(root)
        paths = [p for f in folders for p in sorted((self.root / f).rglob("*.py"))]
        self.paths = {module_name(p, self.root): p for p in paths}
        self.names = {
            m: imported_names(p.read_text(encoding="utf-8"), m, p.name == "__init__.py")
            for m, p in self.paths.items()
        }
        modules = set(self.paths)
        self.graph = {
            m: {nearest_module(n, modules) for n in names} - {"", m}
            for m, names in self.names.items()
        }

    def modules_reached(self, module: str) -> set[str]:
        """The project modules `module` imports, directly or through one another."""
        seen, todo = set(), [module]
        while todo:
            for nxt in self.graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    def reached(self, module: str) -> dict[str, list[str]]:
        """Every dotted name `module` imports directly or through other project modules, with the
        chain of modules that imports it ([module, …, importer])."""
        chains: dict[str, list[str]] = {}
        seen, todo = {module}, [[module]]
        while todo:
            chain = todo.pop(0)
            for name in sorted(self.names[chain[-1]]):
                chains.setdefault(name, chain)
            for nxt in sorted(self.graph[chain[-1]] - seen):
                seen.add(nxt)
                todo.append(chain + [nxt])
        return chains

    def violations(self, modules, forbidden) -> list[str]:
        """ "module → … → importer imports name" for each name that `forbidden(name)` refuses among
        what `modules` reach (directly or through project modules)."""
        return [
            f"{' → '.join(chain)} imports {name}"
            for m in sorted(modules)
            for name, chain in self.reached(m).items()
            if forbidden(name)
        ]


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
