"""Bad and unusual input through the API.

Refused input must fail the request with an HTTP error whose body names the parameter (never a
silently un-retouched 200); unusual-but-usable references must work and say what was done in an
`LR note…` infotext key; after all of it the WebUI keeps serving and a plain generation is
bit-identical to one made before.
"""

from __future__ import annotations

import base64
import io
import os

import host_helpers as H
import numpy as np
import pytest
import tiny_checkpoints as TC
from host_helpers import SAM_CORRUPT, SAM_MISSING
from PIL import Image

# ---------------------------------------------------------------- refused: HTTP error naming the parameter

REFUSED = [
    # id, changes to the defaults (None value = leave the name out), names the error must contain
    ("no-reference", {"reference_image": None}, ("reference_image", "reference image")),
    ("empty-reference", {"reference_image": ""}, ("reference_image", "reference image")),
    (
        "invalid-base64",
        {"reference_image": "this is not base64 !!!"},
        ("reference_image", "reference image"),
    ),
    (
        "base64-not-an-image",
        {"reference_image": base64.b64encode(b"just some bytes, no image").decode()},
        ("reference_image", "reference image"),
    ),
    ("concept-token-not-in-prompt", {"concept_token": "zzz"}, ("concept_token", "concept token")),
    ("lambda1-equals-steps", {"lambda1": H.STEPS}, ("lambda1", "λ1")),
    ("lambda1-above-steps", {"lambda1": H.STEPS + 5}, ("lambda1", "λ1")),
    ("lambda1-negative", {"lambda1": -1}, ("lambda1", "λ1")),
    ("lambda1-not-a-number", {"lambda1": "abc"}, ("lambda1", "λ1")),
    ("lambda2-negative", {"lambda2": -1}, ("lambda2", "λ2")),
    ("lambda2-above-steps", {"lambda2": 1000}, ("lambda2", "λ2")),
    ("mask-start-negative", {"mask_start": -1}, ("mask_start", "mask start")),
    ("mask-start-above-steps", {"mask_start": 1000}, ("mask_start", "mask start")),
    ("ca-threshold-above-1", {"ca_threshold": 2.0}, ("ca_threshold", "ca threshold")),
    ("unknown-personalization", {"personalization": "hypernetwork"}, ("personalization",)),
    ("unknown-layout-source", {"layout_source": "magic"}, ("layout_source", "layout source")),
    ("unknown-name", {"lamda1": 3}, ("lamda1",)),
    (
        "vanilla-not-listed",
        {"vanilla_checkpoint": "no-such-model.safetensors"},
        ("vanilla_checkpoint", "vanilla checkpoint"),
    ),
    (
        "vanilla-path-traversal",
        {"vanilla_checkpoint": "../../etc/passwd"},
        ("vanilla_checkpoint", "vanilla checkpoint"),
    ),
    (
        "vanilla-absolute-path",
        {"vanilla_checkpoint": "/etc/passwd"},
        ("vanilla_checkpoint", "vanilla checkpoint"),
    ),
    (
        "vanilla-other-architecture",
        {"vanilla_checkpoint": TC.WIDE},
        ("vanilla_checkpoint", "vanilla checkpoint"),
    ),
    ("sam-not-listed", {"sam_model": "sam_vit_h_nothere.pth"}, ("sam_model", "sam model")),
    ("sam-path-traversal", {"sam_model": "../../etc/passwd"}, ("sam_model", "sam model")),
    ("sam-absolute-path", {"sam_model": "/etc/passwd"}, ("sam_model", "sam model")),
]


@pytest.mark.parametrize("changes,names", [pytest.param(c, n, id=i) for i, c, n in REFUSED])
def test_refused_input_names_the_parameter(webui, lr, plain_before, changes, names):
    args = lr()
    for k, v in changes.items():
        if v is None:
            args.pop(k, None)
        else:
            args[k] = v
    r = H.txt2img(webui.url, H.lr_body(args))
    H.assert_error_names(r, *names)
    assert webui.alive(), "the WebUI stopped serving after a refused request"


def test_plain_identical_after_all_refused_input(webui, plain_before):
    # Runs after the parametrized refusals above (file order).
    r = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(r.image, plain_before.image), "a refused request left something patched"
    assert r.infotexts[0] == plain_before.infotexts[0]


# ---------------------------------------------------------------- usable references: work, with a note


def _run_ref(webui, lr, b64: str) -> H.Result:
    return H.txt2img(webui.url, H.lr_body(lr(reference_image=b64)))


def _assert_works_with_note(r: H.Result, what: str) -> None:
    H.assert_retouched(r)
    assert H.lr_notes(r), (
        f"{what}: expected an 'LR note…' infotext key saying what was done: {r.lr}"
    )


@pytest.fixture(scope="module")
def rgb_run(webui, lr_defaults):
    r = H.txt2img(webui.url, H.lr_body(dict(lr_defaults)))
    H.assert_retouched(r)
    return r


def test_rgba_reference(webui, lr, rgb_run):
    rgb = H.reference_rgb()
    opaque = rgb.convert("RGBA")
    r = _run_ref(webui, lr, H.png_b64(opaque))
    H.assert_retouched(r)  # nothing is lost from a fully opaque RGBA: a note is optional
    assert np.array_equal(r.image, rgb_run.image), (
        "a fully opaque RGBA reference must act as its RGB"
    )
    see_through = opaque.copy()
    see_through.putalpha(
        Image.fromarray(np.tile(np.linspace(0, 255, H.SIZE, dtype=np.uint8), (H.SIZE, 1)))
    )
    t = _run_ref(webui, lr, H.png_b64(see_through))
    _assert_works_with_note(t, "RGBA with transparency")
    assert H.differs(t.image, rgb_run.image), "transparency had no effect on the reference"


@pytest.mark.parametrize(
    "mode, note",
    [
        ("L", "grayscale"),
        ("P", "palette"),
    ],
)
def test_single_channel_reference_acts_as_its_rgb_twin(webui, lr, mode, note):
    """A grayscale or palette reference works with a note, and gives exactly its RGB twin's image."""
    src = H.reference_rgb()
    img = (
        src.convert("L")
        if mode == "L"
        else src.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    )
    r = _run_ref(webui, lr, H.png_b64(img))
    _assert_works_with_note(r, note)
    same = _run_ref(webui, lr, H.png_b64(img.convert("RGB")))
    H.assert_retouched(same)
    assert np.array_equal(r.image, same.image)


def test_16bit_reference_is_scaled_not_clipped(webui, lr):
    g8 = np.array(H.reference_rgb().convert("L"), dtype=np.uint16)
    g8[0, 0] = (
        255  # full range: any sane 16→8-bit scaling (by 65535 or by the maximum) gives g8 back
    )
    img16 = Image.fromarray(
        g8 * 257
    )  # uint16 → mode I;16  # 16-bit values whose 8-bit reading is g8
    r = _run_ref(webui, lr, H.png_b64(img16))
    _assert_works_with_note(r, "16-bit")
    same = _run_ref(webui, lr, H.png_b64(Image.fromarray(g8.astype(np.uint8)).convert("RGB")))
    H.assert_retouched(same)
    assert np.array_equal(r.image, same.image), (
        "a 16-bit reference must read as its 8-bit equivalent"
    )


def test_exif_rotated_reference_is_turned_upright(webui, lr, rgb_run):
    stored, exif = H.exif_rotated(H.reference_rgb())
    r = _run_ref(webui, lr, H.png_b64(stored, exif=exif))
    _assert_works_with_note(r, "EXIF-rotated")
    assert np.array_equal(r.image, rgb_run.image), "the EXIF orientation was not applied"


def test_huge_reference(webui, lr):
    n = 8000
    ramp = np.linspace(0, 255, n, dtype=np.float32)
    arr = np.empty((n, n, 3), np.uint8)
    arr[..., 0] = ramp[None, :]
    arr[..., 1] = ramp[:, None]
    arr[..., 2] = 90
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    del arr
    r = _run_ref(webui, lr, base64.b64encode(buf.getvalue()).decode())
    _assert_works_with_note(r, "8000 px")


def test_non_square_reference(webui, lr):
    _assert_works_with_note(_run_ref(webui, lr, H.png_b64(H.reference_rgb(96, 64))), "96×64")
    _assert_works_with_note(_run_ref(webui, lr, H.png_b64(H.reference_rgb(64, 160))), "64×160")


# ---------------------------------------------------------------- SAM checkpoint problems: CA-mask fallback


def _sam_choice(webui, needle: str) -> str:
    s = H.script_info(webui.url, H.SCRIPT)
    assert s is not None, "Layout-and-Retouch missing from /sdapi/v1/script-info"
    for a in s["args"]:
        for c in a.get("choices") or []:
            if isinstance(c, str) and needle in c:
                return c
    pytest.fail(
        f"no SAM dropdown choice contains {needle!r} (files in <data-dir>/models/sam are listed?)"
    )


def _assert_ca_fallback(r: H.Result) -> None:
    lr_keys = H.assert_retouched(r)
    assert lr_keys.get("LR mask") == "CA only", lr_keys
    notes = " ".join(H.lr_notes(r).values()).lower()
    assert "sam" in notes, f"expected a note that SAM could not be used: {lr_keys}"


def test_corrupt_sam_checkpoint_falls_back_to_ca_mask(webui, lr):
    if not webui.models.get("sam_dir"):
        pytest.skip("needs a WebUI started by the harness (it writes the corrupt SAM file)")
    _assert_ca_fallback(
        H.txt2img(
            webui.url, H.lr_body(lr(sam_model=_sam_choice(webui, SAM_CORRUPT.rsplit(".", 1)[0])))
        )
    )


def test_missing_sam_checkpoint_falls_back_to_ca_mask(webui, lr):
    if not webui.models.get("sam_dir"):
        pytest.skip("needs a WebUI started by the harness (it writes and deletes the SAM file)")
    name = _sam_choice(webui, SAM_MISSING.rsplit(".", 1)[0])  # listed while the file was there
    path = os.path.join(webui.models["sam_dir"], SAM_MISSING)
    if os.path.exists(path):
        os.remove(path)
    _assert_ca_fallback(H.txt2img(webui.url, H.lr_body(lr(sam_model=name))))


# ---------------------------------------------------------------- interrupt mid-stage-2


def test_interrupt_mid_retouch_leaves_nothing_patched(webui, lr, plain_before):
    """POST /sdapi/v1/interrupt while the retouch runs. The retouch is found through the WebUI's progress
    (the glue advances it through stage 2: `textinfo` names the "retouch" phase, `sampling_step` of
    `sampling_steps`); the interrupt is sent a third of the way in. Afterwards the WebUI serves, a plain
    generation is bit-identical to one before, and the same enabled run gives its full result again."""
    steps = 40
    body = H.lr_body(lr(lambda1=4, lambda2=8, mask_start=25), steps=steps)
    full = H.txt2img(webui.url, body)
    H.assert_retouched(full)

    # One bar over both stages: the retouch runs from ~40% to 100% of it here (stage 1 40 steps,
    # inversions 20 + 20, retouch 120 stage-1-step equivalents); 60% is a third into the retouch.
    r, hit, seen = H.interrupt_during_retouch(webui.url, body, at=0.6, interval=0.005)
    assert hit, (
        f"the progress never showed the retouch phase past a third; textinfo seen: {sorted(seen)}"
    )
    assert webui.alive()
    # The glue catches the interrupt and returns the layout (a 200, as the WebUI does for an interrupted
    # generation), saying so in LR notes.
    assert r.ok and r.images and r.lr, r.describe()
    assert H.differs(r.image, full.image), f"the interrupt at {hit[0]} had no effect"
    assert "interrupted" in " ".join(H.lr_notes(r).values()), r.lr
    after = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after.image, plain_before.image), (
        "something stayed patched after an interrupt"
    )
    again = H.txt2img(webui.url, body)
    H.assert_retouched(again)
    assert np.array_equal(again.image, full.image), (
        "an interrupt left state behind (cache or hooks)"
    )
