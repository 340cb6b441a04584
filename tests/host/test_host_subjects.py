"""Several subjects in one image, in the WebUI through the API: two Textual-Inversion subjects, two
LoRA subjects (each LoRA acting in its own region only, and off for all of stage 1), a photo-only
subject, the refusals, the infotext and paste of every subject, and the X/Y/Z axis over the number
of subjects retouched.

As everywhere in this tier: assertions are on what only a working run produces (infotext keys,
images that differ or are bit-identical where they must be), never on HTTP 200 alone."""

from __future__ import annotations

import host_helpers as H
import numpy as np
import pytest
import tiny_checkpoints as TC
from PIL import Image

from lib_layout_retouch.job import SUBJECT_COLOURS
from lib_layout_retouch.params import LayoutRetouchParams

TWO_EMBEDDINGS = f"a photo of {TC.EMBEDDING} dog and {TC.EMBEDDING_2} cat on a sofa"
TWO_SUBJECTS = "a photo of sks dog and zwx cat on a sofa"
TWO_LORAS = f"{TWO_SUBJECTS} <lora:{TC.LORA}:1> <lora:{TC.LORA_2}:1>"
INTERMEDIATE = "Layout-and-Retouch intermediate"


def second_photo() -> str:
    """Subject 2's photo: the reference's colours inverted and mirrored (not the first photo)."""
    arr = 255 - np.asarray(H.reference_rgb())[:, ::-1]
    return H.png_b64(Image.fromarray(np.ascontiguousarray(arr)))


def subject(personalization: str, token: str, phrase: str, **kw) -> dict:
    return dict(
        reference_image=second_photo(),
        personalization=personalization,
        concept_token=token,
        class_phrase=phrase,
        **kw,
    )


def two_loras(lr, second_lora: str = "", **kw) -> dict:
    return lr(
        personalization="lora",
        vanilla_checkpoint="",
        concept_token="sks",
        class_phrase="dog",
        reference_prompt="",
        subjects=[subject("lora", "zwx", "cat", lora=second_lora)],
        **kw,
    )


def intermediates(res: H.Result) -> dict:
    """{label: image} of the run's intermediates (one image per generation)."""
    out = {}
    for img, text in zip(res.images, res.infotexts):
        label = H.parse_infotext(text).get(INTERMEDIATE)
        if label:
            out[label] = img
    return out


def test_two_textual_inversion_subjects(webui, lr):
    args = lr(
        personalization="textual_inversion",
        vanilla_checkpoint="",
        concept_token=TC.EMBEDDING,
        class_phrase="dog",
        reference_prompt="",
        show_intermediates=True,
        subjects=[subject("textual_inversion", TC.EMBEDDING_2, "cat")],
    )
    two = H.txt2img(webui.url, H.lr_body(args, prompt=TWO_EMBEDDINGS))
    lr_two = H.assert_retouched(two)
    assert lr_two["LR subject 2 concept token"] == TC.EMBEDDING_2, lr_two
    assert lr_two["LR subject 2 personalization"] == "textual_inversion", lr_two
    assert lr_two["LR subject 2 class phrase"] == "cat", lr_two
    # paste: the image's infotext gives subject 2 back (the UI matches its photo by fingerprint)
    pasted = LayoutRetouchParams.from_infotext(H.parse_infotext(two.infotexts[0]))
    assert pasted["concept_token"] == TC.EMBEDDING and len(pasted["subjects"]) == 1, pasted
    assert pasted["subjects"][0]["concept_token"] == TC.EMBEDDING_2, pasted
    assert len(pasted["subjects"][0]["reference_fingerprints"]) == 1, pasted
    # the regions picture: one colour per subject, only those colours (black: no subject)
    shown = intermediates(two)
    regions = shown["subject regions of image 1"]
    colours = {tuple(c) for c in regions.reshape(-1, 3)}
    assert colours <= {(0, 0, 0), *SUBJECT_COLOURS[:2]}, colours
    # subject 2 is retouched from its own photo: another photo for it changes the image
    one = H.txt2img(
        webui.url, H.lr_body(dict(args, subjects=[], show_intermediates=False), TWO_EMBEDDINGS)
    )
    H.assert_retouched(one)
    assert H.differs(two.images[0], one.images[0]), "subject 2 changed nothing"


@pytest.mark.xfail(
    strict=True,
    reason="open (several-subjects issue): on A1111 with the tiny SD1 checkpoint, swapping the two "
    "subjects' LoRAs gives a bit-identical image although the per-subject calls run (42 model calls "
    "against 32): either the regions of the tiny layout are empty or the unet_multiplier switch is "
    "not taken inside the calls; the library and ComfyUI tests of the same mechanism pass",
)
def test_two_lora_subjects_each_lora_in_its_own_region(webui, lr):
    plain = H.txt2img(webui.url, H.plain_body(TWO_LORAS))
    a = H.txt2img(webui.url, H.lr_body(two_loras(lr, show_intermediates=True), TWO_LORAS))
    lr_a = H.assert_retouched(a)
    assert lr_a["LR subject 2 personalization"] == "lora", lr_a
    # the LoRAs swapped between the subjects: same prompt, same LoRAs on the page
    b = H.txt2img(webui.url, H.lr_body(two_loras(lr, TC.LORA, show_intermediates=True), TWO_LORAS))
    assert H.assert_retouched(b)["LR subject 2 LoRA"] == TC.LORA
    assert H.changed(a.images[0], b.images[0], at_least=0.05), (
        "swapping the subjects' LoRAs changed nothing: each LoRA is not scoped to its subject"
    )
    # stage 1 runs with both subject LoRAs off throughout: its layout is the one drawn with the
    # LoRAs at UNet strength 0 (their text-encoder part unchanged)
    unet_off = TWO_SUBJECTS + f" <lora:{TC.LORA}:1:0> <lora:{TC.LORA_2}:1:0>"
    c = H.txt2img(webui.url, H.lr_body(two_loras(lr, show_intermediates=True), unet_off))
    layout = "stage-1 layout of image 1"
    assert np.array_equal(intermediates(a)[layout], intermediates(c)[layout]), (
        "a subject LoRA acted in stage 1"
    )
    assert np.array_equal(intermediates(a)[layout], intermediates(b)[layout])
    # nothing stays switched: the plain generation is bit-identical after the runs
    again = H.txt2img(webui.url, H.plain_body(TWO_LORAS))
    assert np.array_equal(again.image, plain.image), "a LoRA was left switched after the run"


def test_photo_only_subject(webui, lr):
    prompt = "a photo of sks dog and a cat on a sofa"
    args = lr(reference_prompt="", subjects=[subject("photo", "", "cat")])
    two = H.txt2img(webui.url, H.lr_body(args, prompt=prompt))
    lr_two = H.assert_retouched(two)
    assert lr_two["LR subject 2 personalization"] == "photo", lr_two
    assert "LR subject 2 concept token" not in lr_two, lr_two
    # its identity comes from its photo alone: another photo, another image
    other = dict(args["subjects"][0], reference_image=H.png_b64(H.reference_rgb()))
    swapped = H.txt2img(webui.url, H.lr_body(dict(args, subjects=[other]), prompt=prompt))
    H.assert_retouched(swapped)
    assert H.differs(two.images[0], swapped.images[0]), "the photo-only subject's photo is unused"


def test_one_photo_only_subject(webui, lr):
    """No trained model at all: the one subject named by its class phrase, retouched from its photo."""
    args = lr(personalization="photo", vanilla_checkpoint="", concept_token="", reference_prompt="")
    on = H.txt2img(webui.url, H.lr_body(args, prompt="a photo of a dog on a sofa"))
    assert H.assert_retouched(on)["LR personalization"] == "photo"
    off = H.txt2img(webui.url, H.plain_body("a photo of a dog on a sofa"))
    assert H.differs(on.image, off.image)


def test_a_lora_subject_without_its_tag_is_refused(webui, lr):
    one_tag = f"{TWO_SUBJECTS} <lora:{TC.LORA}:1>"
    left = H.txt2img(webui.url, H.lr_body(two_loras(lr), one_tag))
    H.assert_error_names(left, "subject 2: it is learned as a LoRA but the prompt has no LoRA tag")
    assert left.status == 422, left.describe()
    named = H.txt2img(webui.url, H.lr_body(two_loras(lr, "my-cat-lora"), TWO_LORAS))
    H.assert_error_names(
        named, "subject 2: its LoRA 'my-cat-lora' is not among the prompt's LoRA tags"
    )
    assert "<lora:my-cat-lora:1>" in H.error_text(named)


def test_the_api_list_of_every_subject(webui, lr):
    """`subjects` as every subject (no flat subject-1 names): the same run as the flat form."""
    flat = lr(
        personalization="textual_inversion",
        vanilla_checkpoint="",
        concept_token=TC.EMBEDDING,
        class_phrase="dog",
        reference_prompt="",
        subjects=[subject("textual_inversion", TC.EMBEDDING_2, "cat")],
    )
    first = {k: flat.pop(k) for k in ("reference_image", "concept_token", "class_phrase")}
    listed = dict(
        flat, subjects=[dict(first, personalization="textual_inversion"), *flat["subjects"]]
    )
    a = H.txt2img(webui.url, H.lr_body(listed, prompt=TWO_EMBEDDINGS))
    b = H.txt2img(webui.url, H.lr_body(dict(flat, **first), prompt=TWO_EMBEDDINGS))
    assert H.assert_retouched(a) == H.assert_retouched(b)
    assert np.array_equal(a.images[0], b.images[0])


def test_xyz_subjects_retouched(webui, lr):
    choices = H.xyz_axis_choices(webui.url)
    label = "[L&R] Subjects retouched"
    assert label in choices, [c for c in choices if "L&R" in c]
    args = lr(reference_prompt="", subjects=[subject("photo", "", "cat")])
    prompt = "a photo of sks dog and a cat on a sofa"
    body = H.lr_body(args, prompt=prompt)
    body.update(script_name="x/y/z plot", script_args=H.xyz_args(choices.index(label), "1,2"))
    grid = H.txt2img(webui.url, body)
    assert grid.ok, grid.describe()
    cells = [H.lr_params(t) for t in grid.infotexts[1:3]]
    assert "LR subject 2 class phrase" not in cells[0], cells[0]
    assert cells[1]["LR subject 2 class phrase"] == "cat", cells[1]
    assert H.differs(grid.images[1], grid.images[2])
    single = H.txt2img(webui.url, H.lr_body(args, prompt=prompt))
    assert np.array_equal(grid.images[2], single.images[0]), "the 2-subject cell is not the run"
    # a value beyond the subjects given is refused before the grid starts
    body.update(script_args=H.xyz_args(choices.index(label), "1,3"))
    refused = H.txt2img(webui.url, body)
    H.assert_error_names(refused, "subjects retouched is 3, but 2 subject(s) are given")
