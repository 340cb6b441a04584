"""img2img, inpaint and several reference photos with the tiny SDXL model: the same
contract as `test_host_img2img.py` on SDXL (its module fixture `sdxl_model` loads tiny-xl-personal
and the SD1 model again afterwards)."""

from __future__ import annotations

import host_helpers as H
import numpy as np
import pytest
import tiny_checkpoints as TC
from test_host_img2img import MASK_BOX, other_reference, outside

PROMPT = "a photo of sks dog on a sofa, sdxl img2img"


@pytest.fixture(scope="module")
def xl(webui, sdxl_model, lr_defaults):
    def make(**kw):
        d = dict(lr_defaults, vanilla_checkpoint=webui.title(TC.XL_VANILLA))
        d.update(kw)
        return d

    return make


def test_sdxl_img2img_enabled_vs_plain_and_plain_afterwards(url, xl):
    plain = H.img2img(url, H.img2img_body(PROMPT))
    assert plain.ok and H.parse_infotext(plain.infotexts[0]).get("Model") == TC.XL_PERSONAL, (
        plain.describe()
    )
    r = H.img2img(url, H.lr_img2img_body(xl(), PROMPT))
    got = H.assert_retouched(r)
    assert "img2img ran 7 of 8 steps" in got["LR steps used"], got
    assert H.differs(r.image, plain.image)
    again = H.img2img(url, H.img2img_body(PROMPT))
    assert np.array_equal(again.image, plain.image)


def test_sdxl_layout_source_input(url, xl):
    r = H.img2img(url, H.lr_img2img_body(xl(layout_source="input"), PROMPT))
    got = H.assert_retouched(r)
    assert got["LR layout source"] == "input" and "denoising strength not used" in got.get(
        "LR notes", ""
    ), got


def test_sdxl_inpaint_keeps_the_input_outside_the_mask(url, xl):
    init = H.input_rgb()
    r = H.img2img(
        url,
        H.lr_img2img_body(
            xl(show_intermediates=True), PROMPT, init=init, mask=H.box_mask(box=MASK_BOX)
        ),
    )
    H.assert_retouched(r)
    keep = outside(MASK_BOX)
    assert np.array_equal(r.image[keep], np.asarray(init)[keep])
    assert not r.images[2][keep].any(), "the blend mask reaches outside the user's mask"


def test_sdxl_two_references_and_too_many(url, xl, reference_b64):
    refs = [reference_b64, other_reference(1)]
    r = H.img2img(url, H.lr_img2img_body(xl(reference_image=refs), PROMPT))
    assert len(H.assert_retouched(r)["LR reference"].split(", ")) == 2
    bad = H.img2img(url, H.lr_img2img_body(xl(reference_image=[reference_b64] * 5), PROMPT))
    H.assert_error_names(bad, "reference_image")


def test_sdxl_mask_of_the_wrong_size_refused(url, xl):
    r = H.img2img(url, H.lr_img2img_body(xl(), PROMPT, mask=H.box_mask(32, 32, box=(8, 8, 24, 24))))
    H.assert_error_names(r, "mask")
