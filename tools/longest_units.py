"""The longest functions and classes of the production code, in lines (decorators left out,
docstrings and signatures counted), longest first.

    .venv/bin/python tools/longest_units.py [PATH …] [-EXCLUDE …] [--top N]

PATHs default to every production folder (`PRODUCTION`); -EXCLUDE leaves out files whose path
contains EXCLUDE (e.g. -evaluation)."""

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Every folder of production code: the library, both hosts' glue, the WebUI script, the benchmarks
# and these tools (tests/test_imports.py checks the same folders for import cycles).
PRODUCTION = (
    "lib_layout_retouch",
    "layout_retouch_webui",
    "layout_retouch_comfy",
    "scripts",
    "benchmarks",
    "tools",
)


def _shown(path: pathlib.Path) -> str:
    """`path` from the repository root when it lies under it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def units(paths, excludes):
    funcs, classes = [], []
    for root in paths:
        root = pathlib.Path(root)
        for p in [root] if root.suffix == ".py" else sorted(root.rglob("*.py")):
            if any(x in _shown(p) for x in excludes):
                continue
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    size = node.end_lineno - node.lineno + 1
                    where = f"{_shown(p)}:{node.lineno} {node.name}"
                    (classes if isinstance(node, ast.ClassDef) else funcs).append((size, where))
    return sorted(funcs, reverse=True), sorted(classes, reverse=True)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--top", type=int, default=8)
    known, rest = parser.parse_known_args(argv)
    paths = [a for a in rest if not a.startswith("-")] or [ROOT / p for p in PRODUCTION]
    excludes = [a[1:] for a in rest if a.startswith("-")]
    funcs, classes = units(paths, excludes)
    for title, found in (("functions", funcs), ("classes", classes)):
        print(title)
        for size, where in found[: known.top]:
            print(f"  {size:4d}  {where}")


if __name__ == "__main__":
    main(sys.argv[1:])
