"""The shipped example workflows, as ComfyUI offers them: its Templates menu lists every .json of a
custom node's workflows/ folder (`app/custom_node_manager.py`, not recursive) and shows
`<name>.jpg` on its card, so that folder holds the UI-format files only, each with its thumbnail; the
API-format twins (for scripts) are in workflows/api/ and describe the same graphs. A UI file stores a
node's widget values by position, so a widget added or moved in INPUT_TYPES shifts every later value
of an old file (a node's guidance widget did exactly that once). Seeds are fixed, and no two node
boxes overlap (the browser tier checks the same after a run, when image nodes have grown)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests import comfy_stubs

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
API = WORKFLOWS / "api"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
# The folder names ComfyUI v0.3.64 reads templates from (custom_node_manager.py)
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
SOCKETS = {
    "MODEL",
    "CLIP",
    "VAE",
    "IMAGE",
    "LATENT",
    "MASK",
    "CONDITIONING",
    "LAYOUT_RETOUCH_SAM",
    "LAYOUT_RETOUCH_SUBJECTS",
}
TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar is above a node's pos


@pytest.fixture
def nodes(monkeypatch, tmp_path):
    """layout_retouch_comfy.nodes with ComfyUI's modules stubbed (models_dir: tmp_path/models)."""
    yield from comfy_stubs.stubbed_nodes(monkeypatch, tmp_path)


def api_twin(path: Path) -> dict:
    return json.loads((API / path.name.replace(".json", "_api.json")).read_text("utf-8"))


def widget_names(node_class) -> list[str]:
    """The widgets in the order the UI format stores them: required then optional inputs that are
    not sockets; a seed widget is followed by its 'control after generate' value."""
    spec = node_class.INPUT_TYPES()
    names = []
    for group in ("required", "optional"):
        for name, (kind, *_) in spec.get(group, {}).items():
            if isinstance(kind, str) and kind in SOCKETS:
                continue
            names.append(name)
            if name == "seed":
                names.append("control_after_generate")
    return names


def test_the_templates_folder_holds_the_ui_workflows_each_with_a_thumbnail():
    assert [p.stem for p in UI_FILES] == [
        "layout_retouch_dreambooth",
        "layout_retouch_lora",
        "layout_retouch_split_stages",
        "layout_retouch_two_subjects",
    ]
    for path in UI_FILES:
        graph = json.loads(path.read_text("utf-8"))
        assert "nodes" in graph and "links" in graph, f"{path.name} is not in the UI format"
        thumb = path.with_suffix(".jpg")
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.size == (400, 400), (thumb.name, img.size)
        assert thumb.stat().st_size < 60_000, thumb.name
    # the API twins, and nothing else, in api/; no other folder ComfyUI would list
    assert sorted(p.name for p in API.iterdir()) == [
        p.name.replace(".json", "_api.json") for p in UI_FILES
    ]
    for folder in TEMPLATE_FOLDERS:
        if folder != "workflows":
            assert not (ROOT / folder).exists(), folder


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_widget_values_fit_the_nodes(nodes, path):
    graph = json.loads(path.read_text(encoding="utf-8"))
    ours = [n for n in graph["nodes"] if n["type"] in nodes.NODE_CLASS_MAPPINGS]
    assert ours, f"{path.name} has none of our nodes"
    api_ours = {
        k: v for k, v in api_twin(path).items() if v["class_type"] in nodes.NODE_CLASS_MAPPINGS
    }
    for node in ours:
        names = widget_names(nodes.NODE_CLASS_MAPPINGS[node["type"]])
        values = node["widgets_values"]
        assert len(values) == len(names), (path.name, node["type"], names, values)
        # each value is the API file's value of the same name (the UI file was made from it)
        api_inputs = api_ours[str(node["id"])]["inputs"]
        for name, value in zip(names, values):
            if name != "control_after_generate" and name in api_inputs:
                assert api_inputs[name] == value, (path.name, name, value)
        # and every widget value of the API file is in the UI file
        assert {k for k, v in api_inputs.items() if not isinstance(v, list)} <= set(names)


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_ui_and_api_files_are_the_same_graph(nodes, path):
    graph, api = json.loads(path.read_text(encoding="utf-8")), api_twin(path)
    nodes = {str(n["id"]): n for n in graph["nodes"]}
    assert {k: n["type"] for k, n in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    links = set()
    for link_id, source, source_slot, target, target_slot, _ in graph["links"]:
        target_input = nodes[str(target)]["inputs"][target_slot]
        assert target_input["link"] == link_id
        links.add((str(target), target_input["name"], str(source), source_slot))
    api_links = {
        (k, name, value[0], value[1])
        for k, v in api.items()
        for name, value in v["inputs"].items()
        if isinstance(value, list)
    }
    assert links == api_links
    for k, n in nodes.items():  # the titles the API file gives (the UI file omits a default one)
        if "title" in n:
            assert n["title"] == api[k]["_meta"]["title"]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_seeds_are_fixed(nodes, path):
    """A shipped example gives the same image on each run (ComfyUI's default would randomize)."""
    seeded = 0
    for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["type"])
        names = widget_names(cls) if cls is not None else []
        if "seed" in names:
            values = dict(zip(names, node["widgets_values"]))
            assert values["control_after_generate"] == "fixed", node["type"]
            seeded += 1
    assert seeded >= 1


def boxes(graph: dict) -> list[tuple]:
    """(title, x, y, w, h) of each node with its title bar."""
    return [
        (
            n.get("title", n["type"]),
            n["pos"][0],
            n["pos"][1] - TITLE,
            n["size"][0],
            n["size"][1] + TITLE,
        )
        for n in graph["nodes"]
    ]


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_no_node_covers_another(path):
    nodes = boxes(json.loads(path.read_text(encoding="utf-8")))
    for i, (a, ax, ay, aw, ah) in enumerate(nodes):
        for b, bx, by, bw, bh in nodes[i + 1 :]:
            assert not (ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah), (a, b)
        assert ax >= 0 and ay >= 0, a


def test_the_box_check_finds_an_overlap():
    """The check above can fail: main's split-stages workflow put VAE Decode inside the Retouch node."""
    graph = {
        "nodes": [
            {"type": "LayoutRetouchRetouch", "pos": [974, 130], "size": [400, 734]},
            {"type": "VAEDecode", "pos": [974, 790], "size": [140, 46]},
        ]
    }
    (a, ax, ay, aw, ah), (b, bx, by, bw, bh) = boxes(graph)
    assert ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
