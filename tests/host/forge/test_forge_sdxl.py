"""SDXL in Forge, on the tier's tiny SDXL (forge_tiny_checkpoints.py; Forge recognises it through the
tier-only registration of tiny_models_extension/tiny_registration.py): Forge's own SDXL engine, and the
extension's SD1-style checks on it — enabled vs plain, `enabled: false` = plain, plain bit-identical
after an enabled and after a refused run, the vanilla checkpoint matters, an SD1 vanilla refused.

The module switches Forge to `sdxl-personal` and back to `forge-personal` at the end, where the SD1.5
plain image must equal the session's baseline bit for bit. Requests as in the SD1 checks (64×64,
8 DDIM steps, CFG 5, seed 1234); DreamBooth against `sdxl-vanilla`, λ1=2, λ2=3, mask start 6.
"""

from __future__ import annotations

import re

import forge_checkpoints as FC
import forge_tiny_checkpoints as FTC
import host_helpers as H
import numpy as np
import pytest

SWITCH_LINE = re.compile(
    r"\[Layout-and-Retouch\] stage 1: switched to personalized UNet at step (\d+)"
)


@pytest.fixture(scope="module")
def sdxl_model(webui, plain_before):
    """`sdxl-personal` loaded for this module (checked: `Model: sdxl-personal`, and Forge's SDXL
    engine — its conditioning has SDXL's size vector, seen as the 1600-wide ADM the UNet accepts);
    `forge-personal` again afterwards, bit-identical to the session's baseline."""
    title = H.set_checkpoint(webui.url, webui.title(FTC.SDXL_PERSONAL))
    try:
        r = H.txt2img(webui.url, H.plain_body("sdxl switch check", steps=2))
        assert r.ok, r.describe()
        assert H.parse_infotext(r.infotexts[0]).get("Model") == FTC.SDXL_PERSONAL, r.describe()
        yield title
    finally:
        H.set_checkpoint(webui.url, webui.title(FC.PERSONAL))
        back = H.txt2img(webui.url, H.plain_body())
        assert H.parse_infotext(back.infotexts[0]).get("Model") == FC.PERSONAL, back.describe()
        assert np.array_equal(back.image, plain_before.image), (
            "after the SDXL module, the SD1.5 plain image differs from the session's baseline"
        )


@pytest.fixture(scope="module")
def sdxl_plain(webui, sdxl_model):
    r = H.txt2img(webui.url, H.plain_body())
    assert r.ok, r.describe()
    return r


@pytest.fixture
def xl_lr(lr, webui):
    def make(**kw):
        kw.setdefault("vanilla_checkpoint", webui.title(FTC.SDXL_VANILLA))
        return lr(**kw)

    return make


def test_sdxl_plain_is_a_deterministic_image_and_the_vanilla_differs(
    webui, sdxl_plain, plain_before
):
    img = sdxl_plain.image
    assert img.shape == (H.SIZE, H.SIZE, 3) and img.std() > 1.0, sdxl_plain.describe()
    assert H.differs(img, plain_before.image)
    again = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(again.image, img), "the same plain SDXL request gave another image"
    van = H.txt2img(
        webui.url,
        H.plain_body(override_settings={"sd_model_checkpoint": webui.title(FTC.SDXL_VANILLA)}),
    )
    assert H.parse_infotext(van.infotexts[0]).get("Model") == FTC.SDXL_VANILLA, van.describe()
    assert H.differs(van.image, img)
    H.set_checkpoint(webui.url, webui.title(FTC.SDXL_PERSONAL))
    back = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(back.image, img), "switching back to sdxl-personal changed the image"


def test_sdxl_disabled_extension_gives_the_plain_image(webui, sdxl_plain, xl_lr):
    r = H.txt2img(webui.url, H.lr_body(xl_lr(enabled=False)))
    assert r.ok, r.describe()
    assert np.array_equal(r.image, sdxl_plain.image), "enabled=false changed the SDXL image"
    assert not r.lr, r.lr


def test_sdxl_enabled_run_is_retouched_and_plain_stays_bit_identical(webui, sdxl_plain, xl_lr):
    mark = webui.log_mark()
    on = H.txt2img(webui.url, H.lr_body(xl_lr(lambda1=3)))
    got = H.assert_retouched(on)
    assert got.get("LR lambda1") == "3" and "LR steps used" in got, got
    assert H.parse_infotext(on.infotexts[0]).get("Model") == FTC.SDXL_PERSONAL, on.describe()
    assert H.differs(on.image, sdxl_plain.image), "the enabled SDXL run gave the plain image"
    log = webui.log_since(mark)
    assert [int(s) for s in SWITCH_LINE.findall(log)] == [4], log[-2000:]
    after = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after.image, sdxl_plain.image), "something stayed patched (SDXL)"
    assert not after.lr

    # the vanilla checkpoint matters: the personalized one as "vanilla" gives another image
    same = H.txt2img(
        webui.url, H.lr_body(xl_lr(lambda1=3, vanilla_checkpoint=webui.title(FTC.SDXL_PERSONAL)))
    )
    assert same.ok, same.describe()
    assert H.differs(same.image, on.image), "the vanilla SDXL weights did not matter"
    again = H.txt2img(webui.url, H.lr_body(xl_lr(lambda1=3)))
    assert np.array_equal(again.image, on.image), "a repeated enabled SDXL run differs"


def test_sdxl_refusals_name_the_parameter_and_leave_plain_unchanged(webui, sdxl_plain, xl_lr):
    sd1_vanilla = H.txt2img(webui.url, H.lr_body(xl_lr(vanilla_checkpoint=webui.title(FC.VANILLA))))
    H.assert_error_names(sd1_vanilla, "vanilla_checkpoint")
    too_late = H.txt2img(webui.url, H.lr_body(xl_lr(lambda1=H.STEPS)))
    H.assert_error_names(too_late, "lambda1", "λ1")
    after = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after.image, sdxl_plain.image), "a refused SDXL run changed the image"
