"""The Layout-and-Retouch nodes inside a real ComfyUI (v0.3.64), on full-size random SD1.5 weights at
64×64 and 4 steps: graphs POSTed to /prompt, results read from /history and /view."""

from __future__ import annotations

import copy
import json
import os

import comfy_http as A
import graphs as G
import numpy as np
import pytest
import torch
from PIL import Image

from layout_retouch_comfy import run
from lib_layout_retouch.job import regions_from_image
from lib_layout_retouch.progress import ProgressPlan

HERE = os.path.dirname(os.path.abspath(__file__))
NODES = ("LayoutRetouchSampler", "LayoutRetouchLayout", "LayoutRetouchRetouch")
TINY_SAM = "sam_tiny.pth"  # conftest.py writes it into models/sams; tiny_sam_node reads its kind
FIELDS_OFFERED = (
    "reference_prompt",
    "scale_with_steps",
    "ca_threshold",
    "layout_source",
    "reset_reference",
    "layer_preset",
)


def photo(seed: int, size: int = 96) -> Image.Image:
    """A reference "photo": a coloured blob on a background (any RGB image will do)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    blob = ((x - size / 2) ** 2 + (y - size / 2) ** 2) < (size / 3) ** 2
    img = np.where(blob[..., None], g.integers(0, 255, 3), g.integers(0, 255, 3)).astype(np.uint8)
    return Image.fromarray(img + g.integers(0, 20, img.shape).astype(np.uint8))


@pytest.fixture(scope="module")
def refs(comfy):
    return [A.upload(comfy.url, photo(i), f"lr-ref{i}.png") for i in range(2)]


@pytest.fixture(scope="module")
def plain_before(comfy):
    r = A.run(comfy.url, G.plain())
    assert r.ok, r.describe()
    return r.latent("out")


def log_text(comfy) -> str:
    with open(comfy.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


def assert_plain_unchanged(comfy, before):
    r = A.run(comfy.url, G.plain())
    assert r.ok, r.describe()
    assert torch.equal(r.latent("out"), before), (
        "the plain KSampler changed: something was left patched"
    )


def test_nodes_are_registered_with_the_library_fields(comfy):
    info = A.get(comfy.url, "/object_info")
    for name in (*NODES, "LayoutRetouchSAMLoader"):
        assert name in info and info[name]["category"] == "Layout-and-Retouch"
        assert "\n" not in info[name]["description"]
    node = info["LayoutRetouchSampler"]["input"]
    assert (
        node["required"]["lambda1"][1]["min"] == 0 and node["required"]["mask_start"][1]["min"] == 2
    )
    assert node["optional"]["ca_threshold"][1]["min"] == pytest.approx(0.01)
    assert set(FIELDS_OFFERED) <= set(node["optional"])
    assert node["optional"]["layout_source"][0] == ["inversion", "input"]
    assert "infotext" not in node["optional"]["layout_source"][1]["tooltip"]
    for name in ("LayoutRetouchSampler", "LayoutRetouchRetouch"):
        assert info[name]["input"]["optional"]["reference"][0] == "IMAGE"
        assert info[name]["input"]["optional"]["sam"][0] == "LAYOUT_RETOUCH_SAM"
        assert info[name]["input"]["optional"]["subjects"][0] == "LAYOUT_RETOUCH_SUBJECTS"
    assert info["LayoutRetouchSampler"]["output_name"] == [
        "retouched",
        "layout",
        "blend_mask",
        "attention_map",
        "info",
        "regions",
    ]
    subject = info["LayoutRetouchSubject"]
    assert subject["output"] == ["LAYOUT_RETOUCH_SUBJECTS"]
    assert G.LORA in subject["input"]["required"]["lora_name"][0]  # models/loras
    assert subject["input"]["optional"]["subjects"][0] == "LAYOUT_RETOUCH_SUBJECTS"
    # a started ComfyUI has the tier's tiny SAM (tiny_sam_node) in models/sams, and only it
    if comfy.proc is not None:
        assert info["LayoutRetouchSAMLoader"]["input"]["required"]["sam_name"][0] == [TINY_SAM]


def test_enabled_differs_from_plain_and_plain_is_bit_identical_after(comfy, refs, plain_before):
    r = A.run(comfy.url, G.retouch(refs[0]))
    assert r.ok, r.describe()
    out, layout = r.latent("out"), r.latent("layout")
    assert out.shape == plain_before.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all() and not torch.equal(out, plain_before)
    assert not torch.allclose(out, layout, atol=1e-3), "the retouch changed nothing"
    (mask,) = r.images("mask_save")
    (amap,) = r.images("map_save")
    assert mask.shape == amap.shape == (64, 64, 3) and amap.max() > amap.min()
    assert_plain_unchanged(comfy, plain_before)


REFUSED_BEFORE_THE_RUN = [
    ("no reference", dict(reference=None), "reference", "no subject"),
    (
        "concept token not in prompt",
        dict(prompt="a photo of a dog on a beach"),
        "concept_token",
        "does not appear",
    ),
    ("empty class phrase", dict(class_phrase=""), "class_phrase", "class_phrase is empty"),
    ("λ1 ≥ steps", dict(lambda1=4), "lambda1", "λ1"),
    ("layout source stage1", dict(layout_source="stage1"), "layout_source", "not offered"),
]


@pytest.mark.parametrize(
    "case, change, input_name, words",
    REFUSED_BEFORE_THE_RUN,
    ids=[b[0] for b in REFUSED_BEFORE_THE_RUN],
)
def test_what_needs_no_model_is_refused_by_validation_naming_the_input(
    comfy, refs, case, change, input_name, words
):
    """/prompt answers 400 with the node's error (VALIDATE_INPUTS, or ComfyUI's own for a missing
    required input) and nothing runs: no checkpoint is loaded for a typo."""
    change = dict(change)
    reference = change.pop("reference", refs[0])
    before = set(A.get(comfy.url, "/history"))
    answer = A.refused(comfy.url, G.retouch(reference, **change))
    reasons = answer["node_errors"]["lr"]["errors"]
    assert answer["node_errors"]["lr"]["class_type"] == "LayoutRetouchSampler"
    assert reasons and all(words in f"{e['message']}: {e['details']}" for e in reasons), reasons
    assert all(input_name in e["details"] for e in reasons), reasons
    assert all("Layout-and-Retouch: " in e["details"] for e in reasons), reasons
    assert set(A.get(comfy.url, "/history")) == before


def test_a_refusal_at_run_time_is_an_execution_error_logged_in_one_line(comfy, refs, plain_before):
    """What only the models can tell (here a v-prediction vanilla model) fails the node with the
    message naming the input; the log has ComfyUI's one line for it and no traceback."""
    g = G.retouch(refs[0])
    g["vpred"] = {
        "class_type": "ModelSamplingDiscrete",
        "inputs": {"model": ["vckpt", 0], "sampling": "v_prediction", "zsnr": False},
    }
    g["lr"]["inputs"]["vanilla_model"] = ["vpred", 0]
    log_before = len(log_text(comfy))
    r = A.run(comfy.url, g)
    assert not r.ok
    err = r.error()
    assert err.get("node_type") == "LayoutRetouchSampler", err
    msg = err["exception_message"]
    assert msg.startswith("Layout-and-Retouch") and "V_PREDICTION" in msg, msg
    assert "'vanilla_model'" in msg
    if comfy.log_path:
        log = log_text(comfy)[log_before:]
        assert "!!! Exception during processing !!! Layout-and-Retouch" in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    assert_plain_unchanged(comfy, plain_before)  # and ComfyUI keeps serving


def test_the_sam_loader_makes_the_mask_sam_and_ca_and_the_node_says_what_it_used(comfy, refs):
    listed = A.get(comfy.url, "/object_info/LayoutRetouchSAMLoader")["LayoutRetouchSAMLoader"]
    if TINY_SAM not in listed["input"]["required"]["sam_name"][0]:
        pytest.skip(f"no {TINY_SAM} in this ComfyUI's models/sams (a started one has it)")
    g = G.retouch(refs[0])
    g["sam"] = {
        "class_type": "LayoutRetouchSAMLoader",
        "inputs": {"sam_name": TINY_SAM, "device": "cpu"},
    }
    g["lr"]["inputs"]["sam"] = ["sam", 0]
    r = A.run(comfy.url, g)
    assert r.ok, r.describe()
    (text,) = r.outputs["lr"]["text"]
    assert text.split("\n") == [
        "At 4 steps: λ1=1, λ2=1, mask from step 3 of 4",
        "Mask: SAM+CA",
        "Notes: reference was 96×96: resized to 64×64",
    ], text


def test_lora_as_two_models(comfy, refs, plain_before):
    dreambooth = A.run(comfy.url, G.retouch(refs[0]))
    r = A.run(comfy.url, G.with_lora(G.retouch(refs[0])))
    assert r.ok, r.describe()
    out = r.latent("out")
    assert torch.isfinite(out).all() and not torch.allclose(
        out, dreambooth.latent("out"), atol=1e-3
    )
    assert_plain_unchanged(comfy, plain_before)  # the LoRA's weight patches are off again


def test_batch_of_two_with_two_photos(comfy, refs):
    r = A.run(comfy.url, G.retouch(refs, batch=2))
    assert r.ok, r.describe()
    out = r.latent("out")
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    assert len(r.images("mask_save")) == 2


def test_inpaint_with_a_mask_keeps_the_outside(comfy, refs):
    src = np.asarray(photo(5, 64).convert("RGBA")).copy()
    src[:, :32, 3] = 0  # transparent left half: LoadImage's MASK (1 − α) is 1 there
    name = A.upload(comfy.url, Image.fromarray(src, "RGBA"), "lr-inpaint.png")
    r = A.run(comfy.url, G.inpaint(G.retouch(refs[0]), name))
    assert r.ok, r.describe()
    out, src_latent = r.latent("out"), r.latent("src_latent")
    right = (
        slice(None),
        slice(None),
        slice(None),
        slice(5, None),
    )  # latent columns ≥ 5: α = 1 only
    scale = src_latent.abs().max().item()
    assert torch.allclose(out[right], src_latent[right], atol=1e-5 * scale, rtol=0)
    left = (slice(None), slice(None), slice(None), slice(0, 3))
    assert not torch.allclose(out[left], src_latent[left], atol=1e-2 * scale)


def test_interrupt_mid_retouch_leaves_nothing_patched(comfy, refs, plain_before):
    """/interrupt once the node's progress bar is in the retouch (its last part, weighted as
    `ProgressPlan` weighs it: stage 1, the reference and layout inversions come first), read from
    ComfyUI's websocket."""
    steps = 8
    retouch = round(ProgressPlan(steps=steps).units["retouch"] * run.TICKS)
    pid = A.queue_and_interrupt_when(
        comfy.url,
        G.retouch(refs[0], steps=steps, prefix="cancelled"),
        "lr",
        lambda value, total: total - retouch < value < total,
    )
    r = A.wait(comfy.url, pid)
    assert not r.ok and r.messages("execution_interrupted"), r.status
    assert_plain_unchanged(comfy, plain_before)


def test_two_subject_nodes_each_retouched_in_its_own_region(comfy, refs, plain_before):
    """Two chained Subject nodes (a LoRA subject and a photo-only one): the regions output has a
    region of each subject's colour, and nothing else but black (disjoint); the result is another
    than with the first subject alone; the LoRA's weight patches are off again afterwards."""
    two = A.run(comfy.url, G.subjects(refs))
    assert two.ok, two.describe()
    (regions,) = two.images("regions_save")
    index = regions_from_image(Image.fromarray(regions))
    assert (index == 0).any() and (index == 1).any(), np.unique(index)
    assert ((index >= 0) | (regions == 0).all(-1)).all()
    (text,) = two.outputs["lr"]["text"]
    assert text.split("\n")[:2] == [
        "At 4 steps: λ1=1, λ2=1, mask from step 3 of 4",
        "Mask: CA only",
    ]
    one = A.run(comfy.url, G.subjects(refs[:1], prompt="a photo of sks dog and a cat on a beach"))
    assert one.ok, one.describe()
    out, alone = two.latent("out"), one.latent("out")
    assert torch.isfinite(out).all() and not torch.allclose(out, alone, atol=1e-3)
    assert_plain_unchanged(comfy, plain_before)


WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(HERE))), "workflows")
API_WORKFLOWS = os.path.join(WORKFLOWS, "api")


def for_test(graph: dict, reference: str) -> dict:
    """An example API workflow with the test models, the uploaded photo, 64×64 and 4 steps."""
    g = copy.deepcopy(graph)
    for node in g.values():
        i = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            i["ckpt_name"] = G.VANILLA if "v1-5" in i["ckpt_name"] else G.PERSONAL
        if node["class_type"] == "LoraLoader" or i.get("lora_name", "None") != "None":
            i["lora_name"] = G.LORA
        if node["class_type"] == "LoadImage":
            i["image"] = reference
        for k, v in (
            ("steps", G.STEPS),
            ("width", G.SIZE),
            ("height", G.SIZE),
            ("lambda1", 1),
            ("lambda2", 1),
            ("mask_start", 3),
            ("scale_with_steps", False),
        ):
            if k in i:
                i[k] = v
    return g


@pytest.mark.parametrize("name", sorted(os.listdir(API_WORKFLOWS)))
def test_example_api_workflow_runs(comfy, refs, name):
    with open(os.path.join(API_WORKFLOWS, name), encoding="utf-8") as f:
        graph = json.load(f)
    r = A.run(comfy.url, for_test(graph, refs[0]))
    assert r.ok, r.describe()
    saved = [n for n, node in graph.items() if node["class_type"] == "SaveImage"]
    assert saved and all(r.images(n) for n in saved)
