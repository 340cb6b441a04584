"""The nodes in ComfyUI's own page (Debian Chromium driven by Playwright): they are registered in the
node library, an example workflow loads (API format → the graph) and runs from the page.

LR_COMFY_EXPORT=<folder>: also write each example as ComfyUI's UI-format workflow
(`app.graph.serialize()`, the format *Load* reads) and screenshots of the graph and of the result
there — how workflows/*.json and docs/comfyui-*.png were made."""

from __future__ import annotations

import json
import os
import time

import comfy_http as A
import host_server as S
import pytest
from test_comfy_nodes import WORKFLOWS, for_test, photo

EXPORT = os.environ.get("LR_COMFY_EXPORT")
MISSING = S.browser_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def page(comfy):
    for browser in S.chromium():
        p = browser.new_page(viewport={"width": 1600, "height": 1000})
        p.goto(comfy.url + "/", wait_until="domcontentloaded")
        p.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        time.sleep(2)  # the first-run dialogs and the default graph settle
        p.keyboard.press("Escape")  # the first-run template dialog
        yield p
        p.close()


def test_nodes_are_in_the_node_library(page):
    names = page.evaluate("Object.keys(LiteGraph.registered_node_types)")
    for node in ("LayoutRetouchSampler", "LayoutRetouchLayout", "LayoutRetouchRetouch"):
        assert node in names
    category = page.evaluate("LiteGraph.registered_node_types['LayoutRetouchSampler'].category")
    assert category == "Layout-and-Retouch"


@pytest.mark.parametrize(
    "name", ["layout_retouch_dreambooth", "layout_retouch_lora", "layout_retouch_split_stages"]
)
def test_example_workflow_loads_and_runs_from_the_page(comfy, page, name):
    reference = A.upload(comfy.url, photo(0, 512), "my-dog.png")
    with open(os.path.join(WORKFLOWS, name + "_api.json"), encoding="utf-8") as f:
        example = json.load(f)
    if EXPORT:  # the UI format of the example as shipped (names and sizes of a real run)
        page.evaluate("g => app.loadApiJson(g, 'example.json')", example)
        time.sleep(1)
        ui = page.evaluate("JSON.stringify(app.graph.serialize())")
        os.makedirs(EXPORT, exist_ok=True)
        with open(os.path.join(EXPORT, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(json.loads(ui), f, indent=1)
    graph = for_test(example, reference)
    page.evaluate("g => app.loadApiJson(g, 'test.json')", graph)
    time.sleep(1)
    types = page.evaluate("app.graph._nodes.map(n => n.type)")
    assert sorted(types) == sorted(node["class_type"] for node in graph.values())
    before = set(A.get(comfy.url, "/history"))
    page.evaluate("app.queuePrompt(0, 1)")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 900:
        new = set(A.get(comfy.url, "/history")) - before
        if new:
            break
        time.sleep(1)
    (pid,) = new
    r = A.wait(comfy.url, pid)
    assert r.ok, r.describe()
    if EXPORT:
        time.sleep(2)
        page.keyboard.press("Escape")  # a dialog the run may have opened
        page.screenshot(path=os.path.join(EXPORT, name + ".png"))
