"""img2img, inpaint and several reference photos in the real WebUI, SD1.

Defaults as the txt2img tests (DreamBooth, tiny-personal vs tiny-vanilla, λ1=2, λ2=3, mask start 6
taken literally); the input is `H.input_rgb()`, denoising strength 0.75 (8 steps → img2img runs
int(0.75·8)+1 = 7)."""

from __future__ import annotations

import host_helpers as H
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("webui")

MASK_BOX = (16, 16, 48, 48)


def outside(mask_box, margin=0, size=H.SIZE) -> np.ndarray:
    """Boolean (h, w): True outside the box grown by `margin` pixels."""
    x0, y0, x1, y1 = mask_box
    keep = np.ones((size, size), bool)
    keep[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = False
    return keep


@pytest.fixture(scope="module")
def plain_img2img(url):
    r = H.img2img(url, H.img2img_body())
    assert r.ok, r.describe()
    return r


def other_reference(seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = np.asarray(H.reference_rgb()).astype(np.int16) + rng.integers(
        -60, 60, (H.SIZE, H.SIZE, 3)
    )
    return H.png_b64(Image.fromarray(img.clip(0, 255).astype(np.uint8)))


def test_script_is_always_on_in_img2img(url):
    s = H.script_info(url, H.SCRIPT, img2img=True)
    assert s is not None and s.get("is_alwayson"), s
    names = [a.get("label") for a in s["args"]]
    assert any("More photos" in (n or "") for n in names), names


def test_img2img_enabled_vs_plain_and_plain_bit_identical_afterwards(url, lr, plain_img2img):
    r = H.img2img(url, H.lr_img2img_body(lr()))
    got = H.assert_retouched(r)
    assert got["LR lambda1"] == "2", got
    assert "img2img ran 7 of 8 steps" in got["LR steps used"], got
    assert H.differs(r.image, plain_img2img.image)
    off = H.img2img(url, H.lr_img2img_body(lr(enabled=False)))
    assert off.ok and not off.lr and np.array_equal(off.image, plain_img2img.image), off.describe()
    again = H.img2img(url, H.img2img_body())
    assert np.array_equal(again.image, plain_img2img.image)
    assert again.infotexts[0] == plain_img2img.infotexts[0]


def test_img2img_schedule_is_scaled_to_the_steps_run(webui, url, lr):
    # 20 steps at strength 0.5: img2img runs int(0.5·20)+1 = 11; the paper's λ1=5 (at 50) scaled to
    # 11 is 1 (at 20 it would be 2): the vanilla model draws step 1, the switch is at step 2.
    mark = webui.log_mark()
    r = H.img2img(
        url,
        H.lr_img2img_body(
            lr(lambda1=5, lambda2=10, mask_start=31, scale_with_steps=True),
            steps=20,
            denoising_strength=0.5,
        ),
    )
    got = H.assert_retouched(r)
    assert (
        "λ1=1" in got["LR steps used"] and "img2img ran 11 of 20 steps" in got["LR steps used"]
    ), got
    log = webui.log_since(mark)
    lines = [
        ln for ln in log.splitlines() if "stage 1: switched to personalized UNet at step" in ln
    ]
    assert lines and "at step 2 (after 1 model calls)" in lines[0], log[-3000:]


def test_layout_source_input_retouches_the_input_itself(webui, url, lr, plain_img2img):
    mark = webui.log_mark()
    r = H.img2img(url, H.lr_img2img_body(lr(layout_source="input"), denoising_strength=0.3))
    got = H.assert_retouched(r)
    assert got["LR layout source"] == "input", got
    assert "denoising strength not used" in got.get("LR notes", ""), got
    log = webui.log_since(mark)
    assert "stage 1:" not in log and "retouch of 1 image" in log, log[-3000:]
    assert H.differs(r.image, plain_img2img.image)
    # the strength is not used: another strength gives the same image
    r2 = H.img2img(url, H.lr_img2img_body(lr(layout_source="input"), denoising_strength=0.9))
    H.assert_retouched(r2)
    assert np.array_equal(r.image, r2.image)
    # the host's RNG is left as a plain img2img leaves it (the next input is encoded with it)
    again = H.img2img(url, H.img2img_body())
    assert np.array_equal(again.image, plain_img2img.image)


def test_inpaint_keeps_the_input_outside_the_mask(url, lr):
    init = H.input_rgb()
    mask = H.box_mask(box=MASK_BOX)
    plain = H.img2img(url, H.img2img_body(init=init, mask=mask))
    assert plain.ok, plain.describe()
    r = H.img2img(url, H.lr_img2img_body(lr(show_intermediates=True), init=init, mask=mask))
    H.assert_retouched(r)
    keep = outside(MASK_BOX)
    # the blend mask (result, layout, mask, attention map) is bounded by the user's mask
    assert len(r.images) == 4, r.describe()
    assert not r.images[2][keep].any(), "the retouch's mask reaches outside the user's mask"
    assert np.array_equal(r.image[keep], np.asarray(init)[keep]), "pixels outside the mask changed"
    assert H.differs(r.image[~keep], plain.image[~keep]), (
        "the retouch changed nothing inside the mask"
    )
    # input as layout, inpainted: the same guarantee
    r_in = H.img2img(url, H.lr_img2img_body(lr(layout_source="input"), init=init, mask=mask))
    H.assert_retouched(r_in)
    assert np.array_equal(r_in.image[keep], np.asarray(init)[keep])
    assert H.differs(r_in.image[~keep], np.asarray(init)[~keep])


def test_inpaint_only_masked_with_mask_blur(url, lr):
    init = H.input_rgb()
    mask = H.box_mask(box=(24, 24, 40, 40))
    body = H.lr_img2img_body(
        lr(), init=init, mask=mask, inpaint_full_res=True, inpaint_full_res_padding=8, mask_blur=2
    )
    r = H.img2img(url, body)
    H.assert_retouched(r)
    info = H.parse_infotext(r.infotexts[0])
    assert info.get("Inpaint area") == "Only masked" and info.get("Mask blur") == "2", info
    keep = outside((24, 24, 40, 40), margin=6)  # blur 2: a kernel of 11 px, ±5
    assert np.array_equal(r.image[keep], np.asarray(init)[keep])
    plain = H.img2img(url, {k: v for k, v in body.items() if k != "alwayson_scripts"})
    assert H.differs(r.image, plain.image)


def test_inpaint_not_masked_mode(url, lr):
    # "Inpaint not masked": the painted box is KEPT, the rest is retouched
    init = H.input_rgb()
    r = H.img2img(
        url,
        H.lr_img2img_body(lr(), init=init, mask=H.box_mask(box=MASK_BOX), inpainting_mask_invert=1),
    )
    H.assert_retouched(r)
    inside = ~outside(MASK_BOX)
    assert np.array_equal(r.image[inside], np.asarray(init)[inside])


@pytest.mark.parametrize("n", [2, 3])
def test_several_references(url, lr, reference_b64, n):
    refs = [reference_b64] + [other_reference(k) for k in range(1, n)]
    one = H.img2img(url, H.lr_img2img_body(lr()))
    r = H.img2img(url, H.lr_img2img_body(lr(reference_image=refs)))
    got = H.assert_retouched(r)
    prints = got["LR reference"].split(", ")
    assert len(prints) == n and len(set(prints)) == n, got
    assert prints[0] == one.lr["LR reference"]
    assert H.differs(r.image, one.image)
    # txt2img takes the list too
    t = H.txt2img(url, H.lr_body(lr(reference_image=refs)))
    assert H.assert_retouched(t)["LR reference"] == got["LR reference"]


def test_too_many_references_refused(url, lr, reference_b64):
    r = H.img2img(url, H.lr_img2img_body(lr(reference_image=[reference_b64] * 5)))
    H.assert_error_names(r, "reference_image")
    assert "at most 4" in H.error_text(r)


def test_one_bad_reference_among_several_is_named(url, lr, reference_b64):
    r = H.img2img(
        url,
        H.lr_img2img_body(lr(reference_image=[reference_b64, "bm90IGFuIGltYWdl", reference_b64])),
    )
    H.assert_error_names(r, "reference_image")
    assert "photo 2 of 3" in H.error_text(r), H.error_text(r)


def test_more_photos_slot_is_refused_in_the_api(url, lr, reference_b64):
    args = H.positional(lr()) + [[reference_b64]]
    r = H.img2img(url, H.lr_img2img_body(args))
    H.assert_error_names(r, "reference_image")


def test_mask_of_the_wrong_size_refused(webui, url, lr):
    mark = webui.log_mark()
    r = H.img2img(url, H.lr_img2img_body(lr(), mask=H.box_mask(32, 32, box=(8, 8, 24, 24))))
    H.assert_error_names(r, "mask")
    assert "32×32" in H.error_text(r) and "64×64" in H.error_text(r)
    log = webui.log_since(mark)
    assert len(H.log_refusal_lines(log)) == 1 and "retouch of" not in log, log[-2000:]


def test_empty_mask_refused(url, lr):
    r = H.img2img(url, H.lr_img2img_body(lr(), mask=H.box_mask(box=(0, 0, 0, 0))))
    H.assert_error_names(r, "mask")
    assert "empty" in H.error_text(r)


def test_input_with_latent_noise_refused(url, lr):
    r = H.img2img(
        url, H.lr_img2img_body(lr(layout_source="input"), mask=H.box_mask(), inpainting_fill=2)
    )
    H.assert_error_names(r, "inpainting_fill", "masked content")


def test_layout_source_input_refused_in_txt2img(url, lr):
    r = H.txt2img(url, H.lr_body(lr(layout_source="input")))
    H.assert_error_names(r, "layout_source")


def test_lambda1_beyond_the_steps_run_says_why(url, lr):
    # 8 steps at strength 0.25: img2img runs 3; λ1 = 3 is too many, though < 8
    r = H.img2img(url, H.lr_img2img_body(lr(lambda1=3), denoising_strength=0.25))
    H.assert_error_names(r, "lambda1", "λ1")
    assert "img2img runs 3 of the 8 steps" in H.error_text(r), H.error_text(r)


def test_xyz_lambda1_axis_in_img2img(url, lr):
    choices = H.xyz_axis_choices_img2img(url)
    idx = choices.index(next(c for c in choices if c.startswith("[L&R]") and "Lambda1" in c))
    body = H.lr_img2img_body(lr())
    body.update(script_name="x/y/z plot", script_args=H.xyz_args(idx, "1,2"))
    r = H.img2img(url, body)
    assert r.ok, r.describe()
    cells = [H.lr_params(t) for t in r.infotexts[1:]]
    assert [c.get("LR lambda1") for c in cells] == ["1", "2"], r.infotexts
    single = H.img2img(url, H.lr_img2img_body(lr(lambda1=2)))
    assert np.array_equal(r.images[2], single.image)


def test_infotext_paste_in_img2img(url, lr, reference_b64):
    r = H.img2img(url, H.lr_img2img_body(lr(lambda1=1, ca_threshold=0.2)))
    H.assert_retouched(r)
    body = H.lr_img2img_body([True, reference_b64])
    body["infotext"] = r.infotexts[0]
    pasted = H.img2img(url, body)
    got = H.assert_retouched(pasted)
    assert got["LR lambda1"] == "1" and got["LR CA threshold"] == "0.2", got
    assert np.array_equal(pasted.image, r.image)


@pytest.mark.parametrize("fill", [0, 2, 3])
def test_inpaint_masked_content_choices(url, lr, fill):
    """'fill', 'latent noise', 'latent nothing' (stage 1 draws inside the mask): retouched, outside kept."""
    init = H.input_rgb()
    r = H.img2img(
        url, H.lr_img2img_body(lr(), init=init, mask=H.box_mask(box=MASK_BOX), inpainting_fill=fill)
    )
    H.assert_retouched(r)
    keep = outside(MASK_BOX)
    assert np.array_equal(r.image[keep], np.asarray(init)[keep])
