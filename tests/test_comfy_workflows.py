"""The shipped example workflows fit the nodes as they are: ComfyUI's UI format stores a node's widget
values by position, so a widget added or moved in INPUT_TYPES shifts every later value of an old file
(a node's guidance widget did exactly that once). API-format files name their inputs."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SOCKETS = {"MODEL", "CLIP", "VAE", "IMAGE", "LATENT", "MASK", "CONDITIONING"}


@pytest.fixture
def nodes(monkeypatch):
    """layout_retouch_comfy.nodes with the few ComfyUI modules its glue imports stubbed."""
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = types.SimpleNamespace(
        SAMPLERS=["euler", "ddim"], SCHEDULERS=["simple", "ddim_uniform"]
    )
    stubs = {
        "comfy": types.ModuleType("comfy"),
        "comfy.samplers": samplers,
        "comfy.model_management": types.ModuleType("comfy.model_management"),
        "comfy.sample": types.ModuleType("comfy.sample"),
        "comfy.utils": types.ModuleType("comfy.utils"),
        "latent_preview": types.ModuleType("latent_preview"),
    }
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("comfy."):  # `import comfy.samplers` then reads comfy.samplers
            setattr(stubs["comfy"], name.split(".", 1)[1], module)
    for name in ("layout_retouch_comfy.nodes", "layout_retouch_comfy.glue"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield importlib.import_module("layout_retouch_comfy.nodes")
    for name in ("layout_retouch_comfy.nodes", "layout_retouch_comfy.glue"):
        sys.modules.pop(name, None)


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


@pytest.mark.parametrize(
    "path", sorted(p for p in WORKFLOWS.glob("*.json") if "_api" not in p.name)
)
def test_ui_workflow_widget_values_fit_the_nodes(nodes, path):
    graph = json.loads(path.read_text(encoding="utf-8"))
    ours = [n for n in graph["nodes"] if n["type"] in nodes.NODE_CLASS_MAPPINGS]
    assert ours, f"{path.name} has none of our nodes"
    api = json.loads((WORKFLOWS / path.name.replace(".json", "_api.json")).read_text("utf-8"))
    api_ours = {k: v for k, v in api.items() if v["class_type"] in nodes.NODE_CLASS_MAPPINGS}
    for node in ours:
        names = widget_names(nodes.NODE_CLASS_MAPPINGS[node["type"]])
        values = node["widgets_values"]
        assert len(values) == len(names), (path.name, node["type"], names, values)
        # each value is the API file's value of the same name (the UI file was made from it)
        same = [a for a in api_ours.values() if a["class_type"] == node["type"]]
        for name, value in zip(names, values):
            if name != "control_after_generate" and same and name in same[0]["inputs"]:
                assert same[0]["inputs"][name] == value, (path.name, name, value)
