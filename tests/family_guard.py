"""Where a host's glue tells a model family by name (tests/test_forge_host_families.py,
tests/test_comfy_host_families.py): the glue asks its family adapter instead."""

from __future__ import annotations

import ast
from typing import Collection, Sequence

# Words that name a family in a comparison (`type(model).__name__ == 'Flux'`).
FAMILY_WORDS = ("flux", "sdxl", "sd1", "sd15", "stablediffusion", "chroma")


def family_branches(source: str, modules: Sequence[str], names: Collection[str]) -> list[str]:
    """Where `source` tells a family by name: imports of `modules` (prefixes), `names` as
    identifiers, attributes or strings, comparisons with a family's word."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found_modules, found_names = [node.module or ""], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            found_modules, found_names = [a.name for a in node.names], []
        elif isinstance(node, ast.Name):
            found_modules, found_names = [], [node.id]
        elif isinstance(node, ast.Attribute):
            found_modules, found_names = [], [node.attr]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found_modules, found_names = [], [node.value]  # getattr(engine, "is_sdxl")
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            words = [
                o.value.lower()
                for o in operands
                if isinstance(o, ast.Constant) and isinstance(o.value, str)
            ]
            found += [w for w in words if any(f in w for f in FAMILY_WORDS)]
            continue
        else:
            continue
        found += [m for m in found_modules if m.startswith(tuple(modules))]
        found += [n for n in found_names if n in names]
    return found
