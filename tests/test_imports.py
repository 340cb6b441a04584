"""Who imports whom, read with `ast` (tests/import_graph.py; function-level imports count):
- no import cycle between the production modules (the library, both hosts' glue, the WebUI script,
  the benchmarks and the tools) and the tiny models they share;
- the tiny models (tests/fixtures/), the benchmarks and the tools import no test module, and the
  fixtures nothing of the benchmarks (the benchmarks and the tests share the fixtures, not each
  other);
- the A1111 tier's tiny checkpoints are cached by a hash of the files they are built from
  (tests/host/tiny_checkpoints.py `SOURCES`): every module of tests/ they import is among them.
The host-import rules (the library and ComfyUI's host-free modules import no host) are in
tests/test_glue_library.py."""

from __future__ import annotations

import pathlib

import pytest

from tests.import_graph import ROOT, Imports, find_cycle
from tools.longest_units import PRODUCTION  # every folder of production code

SHARED = ("tests/fixtures",)  # the tiny models: used by the tests, the benchmarks and the tools


def test_the_project_has_no_import_cycle():
    graph = Imports(PRODUCTION + SHARED).graph
    for module in (
        "lib_layout_retouch.retouch.loop",
        "layout_retouch_comfy.run",
        "scripts.layout_retouch",
        "benchmarks.bench_retouch",
        "tools.longest_units",
        "tests.fixtures.sdxl",
    ):
        assert module in graph, module  # the walk found every folder's code
    assert "lib_layout_retouch.retouch.editor" in graph["lib_layout_retouch.retouch.loop"]
    assert "tests.fixtures.sd1" in graph["benchmarks.bench_retouch"]
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


def test_production_is_every_folder_of_code_but_the_tests_and_longest_units_reads_it(capsys):
    from tools import longest_units

    folders = {
        d.name
        for d in ROOT.iterdir()
        if d.is_dir() and not d.name.startswith((".", "__")) and any(d.rglob("*.py"))
    }  # (not .venv, .git)
    assert folders - {"tests"} == set(PRODUCTION)
    longest_units.main(["--top", "100000"])  # by default: every production folder
    out = capsys.readouterr().out.splitlines()
    listed = {line.split()[1].split("/")[0] for line in out if line.startswith("  ")}
    assert set(PRODUCTION) <= listed


def test_function_level_imports_count():
    """`hosts.current()` imports the Forge adapter inside the function: that edge is in the graph."""
    graph = Imports(PRODUCTION).graph
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


def _tree(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    """Write `files` ({relative path: source}) under `root`; every folder gets an __init__.py."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for folder in path.relative_to(root).parents:
            init = root / folder / "__init__.py"
            if folder != pathlib.Path(".") and not init.exists():
                init.write_text("")
        path.write_text(text)
    return root


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    _tree(
        tmp_path,
        {
            "lib_layout_retouch/a.py": "from . import b\n",
            "lib_layout_retouch/b.py": "def f():\n    from .a import thing\n    return thing\n",
        },
    )
    graph = Imports(("lib_layout_retouch",), tmp_path).graph
    assert graph["lib_layout_retouch.b"] == {"lib_layout_retouch.a"}
    assert find_cycle(graph) == [
        "lib_layout_retouch.a",
        "lib_layout_retouch.b",
        "lib_layout_retouch.a",
    ]


def test_a_cycle_between_the_comfy_glue_and_a_benchmark_is_found(tmp_path):
    """The cycle check covers every production folder, not only the library."""
    _tree(
        tmp_path,
        {
            "layout_retouch_comfy/run.py": "import benchmarks.bench\n",
            "benchmarks/bench.py": "def f():\n    from layout_retouch_comfy import run\n",
        },
    )
    graph = Imports(PRODUCTION, tmp_path).graph
    assert find_cycle(graph) == [
        "benchmarks.bench",
        "layout_retouch_comfy.run",
        "benchmarks.bench",
    ]


# -- the fixtures, the benchmarks, the tools: no test module ------------------------------------------
def is_test_module(name: str) -> bool:
    """`name` is (in) a test module: tests/**/test_*.py or a conftest.py."""
    parts = name.split(".")
    return parts[0] == "tests" and any(p.startswith("test_") or p == "conftest" for p in parts)


def _refused_for(module: str):
    """What `module` (of the fixtures, the benchmarks, the tools) must not import: a test module,
    and for a fixture also the benchmarks."""
    fixture = module.startswith("tests.fixtures")
    return lambda name: is_test_module(name) or (fixture and name.split(".")[0] == "benchmarks")


def shared_code_violations(imports: Imports) -> list[str]:
    """What the fixtures, the benchmarks and the tools import (directly or through one another)
    that they must not."""
    shared = [m for m in imports.paths if m.startswith(("tests.fixtures", "benchmarks", "tools"))]
    return sorted(v for m in shared for v in imports.violations([m], _refused_for(m)))


def test_fixtures_benchmarks_and_tools_import_no_test_module():
    imports = Imports(("tests", "benchmarks", "tools"))
    assert {
        "tests.fixtures.flux",
        "benchmarks.flux_decisions",
        "tools.retouch_fingerprints",
    } <= set(imports.paths)
    assert shared_code_violations(imports) == []


def test_a_fixture_or_benchmark_importing_a_test_module_is_found(tmp_path):
    _tree(
        tmp_path,
        {
            "tests/test_x.py": "",
            "tests/helper.py": "def f():\n    from tests.test_x import thing\n",
            "tests/fixtures/good.py": "import tests.helper\n",  # reaches a test module through it
            "tests/fixtures/bad.py": "import benchmarks.bench\n",
            "benchmarks/bench.py": "from tests import conftest\n",
            "tools/tool.py": "from tests.fixtures import good\n",
        },
    )
    found = shared_code_violations(Imports(("tests", "benchmarks", "tools"), tmp_path))
    assert found == [
        "benchmarks.bench imports tests.conftest",
        "tests.fixtures.bad imports benchmarks.bench",
        "tests.fixtures.bad → benchmarks.bench imports tests.conftest",
        "tests.fixtures.good → tests.helper imports tests.test_x.thing",
        "tools.tool → tests.fixtures.good → tests.helper imports tests.test_x.thing",
    ]


# -- the A1111 tier's model cache key ------------------------------------------------------------------
def _tiny_checkpoints_sources() -> tuple[str, ...]:
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "host"))
    try:
        import tiny_checkpoints
    finally:
        sys.path.pop(0)
    return tiny_checkpoints.SOURCES


def unlisted_sources(imports: Imports, module: str, sources) -> list[str]:
    """The files of tests/ that `module` is built from (its own and every module of tests/ it
    reaches; package __init__ files aside) which `sources` (paths from the root) leave out."""
    files = {
        imports.paths[m].relative_to(imports.root).as_posix()
        for m in imports.modules_reached(module) | {module}
        if m.startswith("tests.") and imports.paths[m].name != "__init__.py"
    }
    return sorted(files - set(sources))


def test_the_tiny_checkpoints_cache_key_covers_every_file_they_are_built_from():
    imports = Imports(("tests",))
    module = "tests.host.tiny_checkpoints"
    assert {"tests.fixtures.sd1", "tests.fixtures.sdxl"} <= imports.modules_reached(module)
    assert unlisted_sources(imports, module, _tiny_checkpoints_sources()) == []


def test_a_model_file_left_out_of_the_cache_key_is_found(tmp_path):
    _tree(
        tmp_path,
        {
            "tests/host/tiny_checkpoints.py": "def f():\n    from tests.fixtures.a import x\n",
            "tests/fixtures/a.py": "from tests.fixtures import b\n",
            "tests/fixtures/b.py": "",
        },
    )
    imports = Imports(("tests",), tmp_path)
    listed = ("tests/host/tiny_checkpoints.py", "tests/fixtures/a.py")
    assert unlisted_sources(imports, "tests.host.tiny_checkpoints", listed) == [
        "tests/fixtures/b.py"
    ]
