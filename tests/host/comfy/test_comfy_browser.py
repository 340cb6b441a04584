"""The nodes in ComfyUI's own page (Debian Chromium driven by Playwright), as a user meets them: the
nodes are in the node library; the Templates menu offers the example workflows (UI format only, each
with its thumbnail, seeds fixed); each example, opened from that menu, runs from the page with the
test models and, after the run, no node's box intersects another's and our nodes show what λ1 / λ2 /
mask start became at the step count, the mask and the notes; bad input that needs no model is a
validation error on the node before anything runs (no traceback in the log).

LR_COMFY_EXPORT=<folder>: first write each example as ComfyUI's UI-format workflow, laid out by
`workflow_layout.py` from workflows/api/*_api.json, seeds fixed (`app.graph.serialize()`, the format
the Templates menu and *Open* read), its thumbnail `<name>.jpg` (a screenshot of it in the page,
400 × 400) and the docs' screenshots (the DreamBooth graph; its result after the run) — how
workflows/*.json, workflows/*.jpg and docs/comfyui-*.png were made."""

from __future__ import annotations

import io
import json
import os
import time

import comfy_http as A
import graphs as G
import host_server as S
import pytest
import workflow_layout as WL
from test_comfy_nodes import WORKFLOWS, photo

EXPORT = os.environ.get("LR_COMFY_EXPORT")
MISSING = S.browser_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
EXAMPLES = [
    "layout_retouch_dreambooth",
    "layout_retouch_lora",
    "layout_retouch_split_stages",
    "layout_retouch_two_subjects",
]
OURS = ("LayoutRetouchSampler", "LayoutRetouchLayout", "LayoutRetouchRetouch")
TEXT_WIDGET = "$$node-text-preview"  # ComfyUI's progress text on a node (send_progress_text)
NOTE = "Notes: reference was 512×512: resized to 64×64"
# What our nodes say after a run of the examples at 4 steps (their λ values are the paper's
# 5 / 10 / 31 for 50 steps, scaled), by node type: the first line, then the mask and notes lines
SAYS = {
    "LayoutRetouchSampler": [
        "At 4 steps: λ1=1, λ2=1, mask from step 3 of 4 (scaled from 5 / 10 / 31 for 50 steps)",
        "Mask: CA only",
        NOTE,
    ],
    "LayoutRetouchLayout": ["At 4 steps: λ1=1 (scaled from 5 for 50 steps)"],
    "LayoutRetouchRetouch": [
        "At 4 steps: λ2=1, mask from step 3 of 4 (scaled from 10 / 31 for 50 steps)",
        "Mask: CA only",
        NOTE,
    ],
}
# Where an example's node says more: two subjects, each photo noted with its subject
SAYS_IN = {
    "layout_retouch_two_subjects": {
        "LayoutRetouchSampler": [
            SAYS["LayoutRetouchSampler"][0],
            "Mask: CA only",
            "Notes: subject 1: reference was 512×512: resized to 64×64; "
            "subject 2: reference was 512×512: resized to 64×64",
        ]
    }
}


def says(example: str, node_type: str) -> list[str]:
    return SAYS_IN.get(example, {}).get(node_type) or SAYS[node_type]


# The test models and size in the examples' widgets (the λ values stay the examples')
TEST_VALUES = {"steps": G.STEPS, "width": G.SIZE, "height": G.SIZE}

# Each node's box with its title bar; its height what the node needs for its widgets if that is more
# (an image node draws its image before the page has grown it to fit)
NODES = """() => app.graph._nodes.map(n => {
  const box = Array.from(n.boundingRect);
  box[3] += Math.max(0, n.computeSize()[1] - n.size[1]);
  return {id: n.id, type: n.type, title: n.title, box: box};
})"""
# Whether the nodes with these ids show their images (loaded, in the image-preview widget); draws
DRAWN = """(ids) => {
  app.canvas.draw(true, true);
  return ids.every(id => {
    const n = app.graph.getNodeById(id);
    return n.imgs?.length && n.imgs.every(i => i.complete)
      && (n.widgets || []).some(w => w.name === '$$canvas-image-preview');
  });
}"""
SET_TEST_VALUES = """([personal, vanilla, lora, reference, values]) => {
  for (const n of app.graph._nodes) {
    for (const w of n.widgets || []) {
      if (n.type === 'CheckpointLoaderSimple' && w.name === 'ckpt_name')
        w.value = String(w.value).includes('v1-5') ? vanilla : personal;
      else if (w.name === 'lora_name' && w.value !== 'None') w.value = lora;  // LoRA loader, Subject
      else if (n.type === 'LoadImage' && w.name === 'image') w.value = reference;
      else if (w.name in values) w.value = values[w.name];
    }
  }
}"""
WIDGET = """([id, name]) => {
  const w = (app.graph.getNodeById(id).widgets || []).find(w => w.name === name);
  return w ? w.value : null;
}"""
# A Preview Any node's text and how much of it its box hides (scrolled out of view), in px
PREVIEW = """(id) => {
  const w = (app.graph.getNodeById(id).widgets || []).find(w => w.name === 'preview');
  if (!w) return null;
  const el = w.element || w.inputEl;
  return {text: w.value, hidden: el ? el.scrollHeight - el.clientHeight : null};
}"""
SET_WIDGET = """([id, name, value]) => {
  app.graph.getNodeById(id).widgets.find(w => w.name === name).value = value;
}"""


@pytest.fixture(scope="module")
def page(comfy):
    for browser in S.chromium():
        p = browser.new_page(viewport={"width": 1600, "height": 1000})
        p.console = []
        p.on("console", lambda message, seen=p.console: seen.append(message))
        p.goto(comfy.url + "/", wait_until="domcontentloaded")
        p.wait_for_function("window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        time.sleep(2)  # the first-run dialogs and the default graph settle
        p.keyboard.press("Escape")  # the first-run template dialog
        p.evaluate("() => app.extensionManager.setting.set('Comfy.Minimap.Visible', false)")
        yield p
        p.close()


@pytest.fixture(scope="module")
def module_name(comfy):
    """The custom-node folder ComfyUI serves our templates under (the checkout's folder name)."""
    listed = A.get(comfy.url, "/workflow_templates")
    ours = [m for m, names in listed.items() if "layout_retouch_dreambooth" in names]
    assert len(ours) == 1, listed
    return ours[0]


@pytest.fixture(scope="module")
def reference(comfy):
    return A.upload(comfy.url, photo(0, 512), "my-dog.png")


def open_template(page, module_name: str, name: str) -> None:
    """Open an example as the Templates menu does (its JSON from the custom node's folder)."""
    page.evaluate(
        """async ([module, name]) => {
          const r = await fetch(`/api/workflow_templates/${module}/${name}.json`);
          await app.loadGraphData(await r.json(), true, true, name);
        }""",
        [module_name, name],
    )
    time.sleep(1)


def set_test_values(page, reference: str) -> None:
    page.evaluate(SET_TEST_VALUES, [G.PERSONAL, G.VANILLA, G.LORA, reference, TEST_VALUES])


def queue_and_wait(comfy, page) -> A.Result:
    """Queue the page's graph as the Run button does; the finished prompt's /history entry."""
    before = set(A.get(comfy.url, "/history"))
    page.evaluate("app.queuePrompt(0, 1)")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 900:
        new = set(A.get(comfy.url, "/history")) - before
        if new:
            (pid,) = new
            return A.wait(comfy.url, pid)
        time.sleep(1)
    raise AssertionError("the prompt queued from the page did not appear in /history")


def overlaps(nodes: list[dict]) -> list[tuple]:
    """Pairs of nodes whose boxes (title bar included) intersect."""
    out = []
    for i, a in enumerate(nodes):
        ax, ay, aw, ah = a["box"]
        for b in nodes[i + 1 :]:
            bx, by, bw, bh = b["box"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                out.append((a["title"], a["box"], b["title"], b["box"]))
    return out


def log_text(comfy) -> str:
    if not comfy.log_path:
        return ""
    with open(comfy.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_nodes_are_in_the_node_library(page):
    names = page.evaluate("Object.keys(LiteGraph.registered_node_types)")
    for node in (*OURS, "LayoutRetouchSAMLoader", "LayoutRetouchSubject"):
        assert node in names
    category = page.evaluate("LiteGraph.registered_node_types['LayoutRetouchSampler'].category")
    assert category == "Layout-and-Retouch"


@pytest.mark.skipif(not EXPORT, reason="LR_COMFY_EXPORT not set: nothing to export")
def test_export_example_workflows(comfy, page, reference):
    """Write the UI-format examples, their thumbnails and the docs' graph screenshot (see the
    module's docstring); runs before the checks below, which then read what is written when
    EXPORT is the checkout's workflows/ folder."""
    os.makedirs(EXPORT, exist_ok=True)
    for name in EXAMPLES:
        with open(os.path.join(WORKFLOWS, "api", name + "_api.json"), encoding="utf-8") as f:
            example = json.load(f)
        page.evaluate("g => app.loadApiJson(g, 'example.json')", example)
        time.sleep(1)
        layout = {str(k): v for k, v in WL.LAYOUTS[name].items()}
        ui = json.loads(page.evaluate(LAYOUT_AND_SERIALIZE, layout))
        with open(os.path.join(EXPORT, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(ui, f, indent=1)
            f.write("\n")
        page.evaluate("g => app.loadGraphData(g, true, true, 'example')", ui)
        time.sleep(1)
        thumbnail(page, os.path.join(EXPORT, name + ".jpg"))
        if name == "layout_retouch_dreambooth":  # as shipped; `reference` is its my-dog.png
            fit_view(page, 1600, 1000)
            time.sleep(1)
            page.screenshot(path=os.path.join(EXPORT, "comfyui-graph.png"))


LAYOUT_AND_SERIALIZE = """(layout) => {
  for (const [id, [x, y, w, h]] of Object.entries(layout)) {
    const n = app.graph.getNodeById(Number(id));
    n.pos = [x, y];
    n.size = [w, h === null ? n.computeSize()[1] : h];
  }
  for (const n of app.graph._nodes) {  // seeds fixed: the example gives the same image each run
    const c = (n.widgets || []).find(w => w.name === 'control_after_generate');
    if (c) c.value = 'fixed';
  }
  const g = app.graph.serialize();
  g.extra.ds = {scale: 0.75, offset: [110, 110]};  // the whole graph in a 1600 × 1000 window
  return JSON.stringify(g);
}"""


def fit_view(page, width: int, height: int, margin: int = 100) -> list[float]:
    """Scale and move the canvas so the whole graph fits the window less `margin` on each side
    (clear of the menu bar and the side bar); the graph's rectangle on the screen."""
    return page.evaluate(
        """([W, H, m]) => {
          const boxes = app.graph._nodes.map(n => {  // as NODES measures them
            const b = Array.from(n.boundingRect);
            b[3] += Math.max(0, n.computeSize()[1] - n.size[1]);
            return b;
          });
          const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
          const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
          const s = Math.min(1, (W - 2 * m) / (x1 - x0), (H - 2 * m) / (y1 - y0));
          const ds = app.canvas.ds;
          ds.scale = s;
          ds.offset = [m / s - x0, m / s - y0];
          app.canvas.setDirty(true, true);
          return [m, m, (x1 - x0) * s, (y1 - y0) * s];
        }""",
        [width, height, margin],
    )


def thumbnail(page, path: str, size: int = 400) -> None:
    """The graph as the page draws it, on the canvas's background, square, `size` px, JPEG."""
    from PIL import Image

    x, y, w, h = fit_view(page, 1600, 1000)
    time.sleep(1)
    pad = 12  # of the canvas around the graph
    shot = page.screenshot(
        clip={"x": x - pad, "y": y - pad, "width": w + 2 * pad, "height": h + 2 * pad}
    )
    img = Image.open(io.BytesIO(shot)).convert("RGB")
    side = max(img.size)
    square = Image.new("RGB", (side, side), img.getpixel((1, 1)))  # the canvas's colour
    square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    square.resize((size, size), Image.LANCZOS).save(path, "JPEG", quality=82, optimize=True)


def test_templates_menu_offers_the_ui_workflows_with_thumbnails(comfy, page, module_name):
    """The Templates menu lists every .json of workflows/ (not its api/ folder): the UI-format
    examples only, each card with its thumbnail (no 404 in the console)."""
    listed = A.get(comfy.url, "/workflow_templates")[module_name]
    assert sorted(listed) == EXAMPLES
    page.console.clear()
    page.get_by_text("Templates", exact=True).first.click()
    dialog = page.locator("[role=dialog]")
    dialog.get_by_text(module_name, exact=True).first.click()
    for name in EXAMPLES:
        dialog.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
    page.wait_for_function(
        "n => Array.from(document.querySelectorAll('[role=dialog] img'))"
        ".filter(i => i.complete && i.naturalWidth > 0).length >= n",
        arg=len(EXAMPLES),
        timeout=30_000,
    )
    missing = [m.text for m in page.console if "404" in m.text or ".jpg" in m.text]
    assert not missing, missing
    page.keyboard.press("Escape")


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_from_the_page_and_says_what_it_used_without_overlaps(
    comfy, page, module_name, reference, name
):
    open_template(page, module_name, name)
    with open(os.path.join(WORKFLOWS, "api", name + "_api.json"), encoding="utf-8") as f:
        api = json.load(f)
    assert sorted(n["type"] for n in page.evaluate(NODES)) == sorted(
        n["class_type"] for n in api.values()
    )
    ours = [n for n in page.evaluate(NODES) if n["type"] in OURS]
    seeded = [n["id"] for n in ours if page.evaluate(WIDGET, [n["id"], "seed"]) is not None]
    seeds = {i: page.evaluate(WIDGET, [i, "seed"]) for i in seeded}
    controls = {i: page.evaluate(WIDGET, [i, "control_after_generate"]) for i in seeded}
    set_test_values(page, reference)
    r = queue_and_wait(comfy, page)
    assert r.ok, r.describe()
    with_images = [int(i) for i, out in r.outputs.items() if out.get("images")]
    page.wait_for_function(DRAWN, arg=with_images, timeout=30_000, polling=200)
    time.sleep(1)
    problems = []  # all of them, not the first only
    nodes = page.evaluate(NODES)
    problems += [f"{a} {ab} overlaps {b} {bb}" for a, ab, b, bb in overlaps(nodes)]
    for node in ours:
        shown = page.evaluate(WIDGET, [node["id"], TEXT_WIDGET])
        want = says(name, node["type"])
        if shown is None or shown.split("\n") != want:
            problems.append(f"{node['title']} shows {shown!r}, not {want}")
        elif r.outputs.get(str(node["id"]), {}).get("text") != [shown]:
            problems.append(f"/history has not the text {node['title']} shows")
    # the Preview Any of an `info` output shows that node's text, all of it
    for info in [n for n in nodes if n["type"] == "PreviewAny"] or [None]:
        source = api[str(info["id"])]["inputs"]["source"][0] if info else None
        want = says(name, api[source]["class_type"] if source else ours[-1]["type"])
        previewed = page.evaluate(PREVIEW, info["id"]) if info else None
        if previewed is None or previewed["text"].split("\n") != want:
            problems.append(f"Preview Any of 'info' shows {previewed}, not {want}")
        elif previewed["hidden"] > 0:
            problems.append(f"{info['title']} hides {previewed['hidden']} px of its text")
    # 'fixed': the seed the example ships is the one that ran, and stays
    if set(controls.values()) != {"fixed"}:
        problems.append(f"control after generate: {controls}")
    after = {i: page.evaluate(WIDGET, [i, "seed"]) for i in seeded}
    if after != seeds:
        problems.append(f"the seed changed from {seeds} to {after}")
    assert not problems, "\n".join(problems)
    if EXPORT and name == "layout_retouch_dreambooth":
        page.keyboard.press("Escape")
        fit_view(page, 1600, 1000, margin=70)
        time.sleep(1)
        page.screenshot(path=os.path.join(EXPORT, "comfyui-result.png"))


REFUSED = [
    ("empty concept token", "concept_token", "", "concept_token is empty"),
    ("token not in the prompt", "prompt", "a photo of a dog", "does not appear in the prompt"),
    ("λ1 too large for the steps", "lambda1", 49, "scaled from the 49 you set for 50 steps"),
]


@pytest.mark.parametrize("case, widget, value, words", REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_input_is_a_validation_error_on_the_node_before_anything_runs(
    comfy, page, module_name, reference, case, widget, value, words
):
    open_template(page, module_name, "layout_retouch_dreambooth")
    set_test_values(page, reference)
    sampler = next(n["id"] for n in page.evaluate(NODES) if n["type"] == "LayoutRetouchSampler")
    page.evaluate(SET_WIDGET, [sampler, widget, value])
    before = set(A.get(comfy.url, "/history"))
    log_before = len(log_text(comfy))
    page.evaluate("async () => { await app.queuePrompt(0, 1) }")
    errors = page.evaluate("() => app.lastNodeErrors")
    assert errors and str(sampler) in errors, f"no validation error on the node: {errors}"
    reasons = errors[str(sampler)]["errors"]
    assert errors[str(sampler)]["class_type"] == "LayoutRetouchSampler"
    assert all(words in e["details"] and "Layout-and-Retouch: " in e["details"] for e in reasons)
    # ComfyUI's validation dialog shows the message; nothing was queued or run
    dialog = page.locator("[role=dialog]").filter(has_text=words)
    dialog.first.wait_for(timeout=10_000)
    page.keyboard.press("Escape")
    time.sleep(1)
    assert set(A.get(comfy.url, "/history")) == before and not A.queue_running(comfy.url)
    assert "Traceback" not in log_text(comfy)[log_before:]
