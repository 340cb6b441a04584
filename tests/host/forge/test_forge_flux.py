"""Flux.1 in Forge on the tier's tiny Flux (forge_tiny_checkpoints.py): Forge's own loader, engine,
sampler and LoRA loader run it on the CPU — and the extension retouches on it (LoRA and DreamBooth
stage 1, the DiT retouch through lib_layout_retouch.adapters.forge.flux), refuses what Flux cannot do by
name, and leaves plain Flux generations bit-identical.

The module switches Forge to `flux-personal` (POST /sdapi/v1/options) and back to `forge-personal` at
the end, where the SD1.5 plain image must equal the session's baseline bit for bit. Requests: 64×64,
8 steps, Euler / Simple (Forge's Flux defaults), CFG 1 (Flux.1-dev is guidance-distilled: the
"Distilled CFG Scale" goes into the guidance embedding), seed 1234.
"""

from __future__ import annotations

import re

import forge_checkpoints as FC
import forge_tiny_checkpoints as FFC
import host_helpers as H
import numpy as np
import pytest

# sd_forge_lora/networks.py:41,50 (both lines name the UNet's model class, KModel)
LORA_LINE = re.compile(
    r"\[LORA\] Loaded \S*flux-lora\S* for KModel-(UNet|CLIP) with (\d+) keys at weight \S+ "
    r"\(skipped (\d+) keys\)"
)


def flux_body(prompt: str = H.PROMPT, **kw) -> dict:
    body = dict(sampler_name="Euler", scheduler="Simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    body.update(kw)
    return H.plain_body(prompt, **body)


@pytest.fixture(scope="module")
def flux_model(webui, plain_before):
    """`flux-personal` loaded for this module; `forge-personal` again afterwards, its plain image
    bit-identical to the session's baseline. Checks the switch: a plain Flux image says
    `Model: flux-personal` and the log shows Forge's Flux engine (its distilled-CFG line)."""
    mark = webui.log_mark()
    title = H.set_checkpoint(webui.url, webui.title(FFC.PERSONAL))
    try:
        r = H.txt2img(webui.url, flux_body("flux switch check", steps=2))
        assert r.ok, r.describe()
        assert H.parse_infotext(r.infotexts[0]).get("Model") == FFC.PERSONAL, r.describe()
        log = webui.log_since(mark)
        assert "Distilled CFG Scale: 3.5" in log, log[-3000:]
        assert "K-Model Created" in log, log[-3000:]
        yield title
    finally:
        H.set_checkpoint(webui.url, webui.title(FC.PERSONAL))
        back = H.txt2img(webui.url, H.plain_body())
        assert H.parse_infotext(back.infotexts[0]).get("Model") == FC.PERSONAL, back.describe()
        assert np.array_equal(back.image, plain_before.image), (
            "after the Flux module, the SD1.5 plain image differs from the session's baseline"
        )


@pytest.fixture(scope="module")
def flux_plain(webui, flux_model):
    r = H.txt2img(webui.url, flux_body())
    assert r.ok, r.describe()
    return r


def test_flux_checkpoints_are_listed(webui):
    for name in (FFC.PERSONAL, FFC.VANILLA, FFC.SCHNELL):
        assert name in webui.titles, webui.titles


def test_flux_plain_txt2img_is_a_deterministic_non_flat_image(webui, flux_plain, plain_before):
    img = flux_plain.image
    assert img.shape == (H.SIZE, H.SIZE, 3), img.shape
    assert img.std() > 1.0, "a flat image: the tiny Flux gives no signal"
    info = H.parse_infotext(flux_plain.infotexts[0])
    assert info.get("Model") == FFC.PERSONAL, flux_plain.describe()
    assert info.get("Distilled CFG Scale") == "3.5", flux_plain.describe()
    assert H.differs(img, plain_before.image)
    again = H.txt2img(webui.url, flux_body())
    assert np.array_equal(again.image, img), "the same plain Flux request gave another image"


def test_flux_prompt_and_distilled_guidance_matter(webui, flux_plain):
    """The T5/CLIP text and the guidance embedding reach the transformer."""
    other_prompt = H.txt2img(webui.url, flux_body("a red car on a beach"))
    other_guidance = H.txt2img(webui.url, flux_body(distilled_cfg_scale=6.0))
    for r in (other_prompt, other_guidance):
        assert r.ok, r.describe()
        assert H.differs(r.image, flux_plain.image), r.describe()


def test_flux_real_cfg_with_a_negative_prompt_runs(webui, flux_plain):
    """CFG > 1 on Flux (cond and uncond through the transformer) gives another image."""
    r = H.txt2img(webui.url, flux_body(cfg_scale=3.0, negative_prompt="blurry"))
    assert r.ok, r.describe()
    assert H.differs(r.image, flux_plain.image)


def test_flux_lora_is_mapped_changes_the_image_and_is_not_left_applied(webui, flux_plain):
    mark = webui.log_mark()
    r = H.txt2img(webui.url, flux_body(H.PROMPT + f" <lora:{FFC.LORA}:1>"))
    assert r.ok, r.describe()
    log = webui.log_since(mark)
    loaded = {part: (int(n), int(skipped)) for part, n, skipped in LORA_LINE.findall(log)}
    # every double-block attention/MLP and single-block linear of the tiny transformer (2·8 + 4·2),
    # and CLIP-L's attention + MLP (2 layers · 6); nothing unmatched
    assert loaded == {"UNet": (2 * 8 + 4 * 2, 0), "CLIP": (2 * 6, 0)}, log[-3000:]
    assert "unmatched keys" not in log and "version mismatch" not in log, log[-3000:]
    assert H.differs(r.image, flux_plain.image), "the Flux LoRA changed nothing: keys not mapped?"
    back = H.txt2img(webui.url, flux_body())
    assert np.array_equal(back.image, flux_plain.image), "the Flux LoRA stayed applied"


def test_flux_vanilla_checkpoint_gives_another_image(webui, flux_plain):
    r = H.txt2img(
        webui.url,
        flux_body(override_settings={"sd_model_checkpoint": webui.title(FFC.VANILLA)}),
    )
    assert r.ok, r.describe()
    assert H.parse_infotext(r.infotexts[0]).get("Model") == FFC.VANILLA, r.describe()
    assert H.differs(r.image, flux_plain.image)
    H.set_checkpoint(webui.url, webui.title(FFC.PERSONAL))
    back = H.txt2img(webui.url, flux_body())
    assert np.array_equal(back.image, flux_plain.image), "switching back changed the image"


def flux_lr_body(lr_args: dict, prompt: str = H.PROMPT, **kw) -> dict:
    body = dict(sampler_name="Euler", scheduler="Simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    body.update(kw)
    return H.lr_body(lr_args, prompt, **body)


LORA_PROMPT = H.PROMPT + f" <lora:{FFC.LORA}:1>"


def test_flux_lora_run_is_retouched_and_plain_stays_bit_identical(webui, flux_plain, lr):
    """LoRA mode on Flux: LR infotext keys, another image than the plain LoRA one, one retouch log
    line; afterwards plain Flux (with and without the LoRA) is bit-identical to before; a repeat is
    bit-identical (cached inversion); λ1=0 (no LoRA-off steps) gives another image, so stage 1 really
    ran without the LoRA."""
    lora_plain = H.txt2img(webui.url, flux_body(LORA_PROMPT))
    assert lora_plain.ok, lora_plain.describe()
    mark = webui.log_mark()
    on = H.txt2img(webui.url, flux_lr_body(lr(personalization="lora"), LORA_PROMPT))
    got = H.assert_retouched(on)
    assert got.get("LR lambda1") == "2" and "LR steps used" in got, got
    assert H.differs(on.image, lora_plain.image), "the enabled Flux run gave the plain image"
    log = webui.log_since(mark)
    assert re.search(r"\[Layout-and-Retouch\] retouch of 1 image\(s\)", log), log[-3000:]
    assert not any(m in log for m in H.TRACEBACK_MARKERS), log[-3000:]
    again = H.txt2img(webui.url, flux_lr_body(lr(personalization="lora"), LORA_PROMPT))
    assert np.array_equal(again.image, on.image), "a repeated enabled Flux run differs"
    no_off = H.txt2img(webui.url, flux_lr_body(lr(personalization="lora", lambda1=0), LORA_PROMPT))
    assert no_off.ok, no_off.describe()
    assert H.differs(no_off.image, on.image), "λ1=0 equals λ1=2: the LoRA was never off"
    back = H.txt2img(webui.url, flux_body())
    assert np.array_equal(back.image, flux_plain.image), "something stayed patched (Flux)"
    back_lora = H.txt2img(webui.url, flux_body(LORA_PROMPT))
    assert np.array_equal(back_lora.image, lora_plain.image), "the LoRA state changed (Flux)"


def test_flux_dreambooth_run_switches_at_lambda1_plus_one(webui, flux_plain, lr):
    """DreamBooth on Flux: the vanilla transformer for λ1 steps. Stage 1 reads the class prompt
    with the loaded model's T5 and CLIP-L (flux-vanilla's own differ: another seed), and says so in
    a note: asking for the loaded model's text encoders gives the same image, without the note."""
    mark = webui.log_mark()
    args = lr(lambda1=3, vanilla_checkpoint=webui.title(FFC.VANILLA))
    on = H.txt2img(webui.url, flux_lr_body(args))
    got = H.assert_retouched(on)
    assert got.get("LR lambda1") == "3", got
    log = webui.log_since(mark)
    switched = re.findall(r"stage 1: switched to personalized UNet at step (\d+)", log)
    assert switched == ["4"], log[-3000:]
    assert H.differs(on.image, flux_plain.image)
    notes = " ".join(H.lr_notes(on).values())
    assert "T5 and CLIP-L" in notes and "stage1_text_encoder" in notes, on.lr
    loaded = H.txt2img(webui.url, flux_lr_body({**args, "stage1_text_encoder": "loaded"}))
    H.assert_retouched(loaded)
    assert "T5 and CLIP-L" not in " ".join(H.lr_notes(loaded).values()), loaded.lr
    assert np.array_equal(loaded.image, on.image), "stage 1 read y_p⁻ with other text encoders"
    back = H.txt2img(webui.url, flux_body())
    assert np.array_equal(back.image, flux_plain.image), "something stayed patched (Flux DB)"


def test_flux_refusals_name_the_parameter_and_leave_plain_unchanged(webui, flux_plain, lr):
    ti = H.txt2img(webui.url, flux_lr_body(lr(personalization="textual_inversion")))
    H.assert_error_names(ti, "personalization")
    assert "Flux" in H.error_text(ti), ti.describe()
    stage1 = H.txt2img(
        webui.url, flux_lr_body(lr(personalization="lora", layout_source="stage1"), LORA_PROMPT)
    )
    H.assert_error_names(stage1, "layout_source")
    sd1_vanilla = H.txt2img(webui.url, flux_lr_body(lr(vanilla_checkpoint=webui.title(FC.VANILLA))))
    H.assert_error_names(sd1_vanilla, "vanilla_checkpoint")
    back = H.txt2img(webui.url, flux_body())
    assert np.array_equal(back.image, flux_plain.image), (
        "a refused run changed the next plain image"
    )
    assert back.infotexts[0] == flux_plain.infotexts[0]


def test_flux_interrupt_mid_retouch_leaves_nothing_patched(webui, flux_plain, lr):
    """Interrupt while the Flux retouch runs (30 steps, so the phase lasts long enough to be caught):
    the layout comes back with a note, and the next plain Flux image is bit-identical."""
    body = flux_lr_body(lr(personalization="lora"), LORA_PROMPT, steps=30)
    r, hit, seen = H.interrupt_during_retouch(webui.url, body, at=0.6, interval=0.02)
    assert hit, f"the progress never showed the retouch phase; textinfo seen: {sorted(seen)}"
    assert r.ok and r.images and r.lr, r.describe()
    assert "interrupted" in " ".join(H.lr_notes(r).values()), r.lr
    after = H.txt2img(webui.url, flux_body())
    assert np.array_equal(after.image, flux_plain.image), (
        "something stayed patched (Flux interrupt)"
    )


def test_flux_batch_2_with_intermediates(webui, flux_plain, lr):
    """Batch 2 on Flux: two retouched results with their own layouts (own seeds), then each one's
    layout, blend mask and attention map, which carry no LR keys."""
    off = H.txt2img(webui.url, flux_body(LORA_PROMPT, batch_size=2))
    assert off.ok, off.describe()
    on = H.txt2img(
        webui.url,
        flux_lr_body(
            lr(personalization="lora", show_intermediates=True), LORA_PROMPT, batch_size=2
        ),
    )
    H.assert_retouched(on)
    assert len(on.images) == 2 + 2 * 3, on.describe()
    for i in range(2):
        assert H.lr_params(on.infotexts[i]), f"image {i} has no LR infotext: {on.infotexts[i]!r}"
        assert H.differs(on.images[i], off.images[i]), f"Flux image {i} was not retouched"
    assert H.differs(on.images[0], on.images[1]), "each image must get its own layout (own seed)"
    for t in on.infotexts[2:]:
        assert not H.lr_params(t), f"an intermediate carries LR keys: {t!r}"
    back = H.txt2img(webui.url, flux_body())
    assert np.array_equal(back.image, flux_plain.image), "something stayed patched (Flux batch)"


def test_flux_xyz_sweep_over_lambda2(webui, flux_plain, lr):
    """The X/Y/Z plot's LR axis on Flux: a 1×2 grid whose cells record λ2 = 1 and 4 and differ."""
    choices = H.xyz_axis_choices(webui.url)
    label = "[L&R] Lambda2"
    assert label in choices, [c for c in choices if "L&R" in c]
    body = flux_lr_body(lr(personalization="lora"), LORA_PROMPT)
    body.update(script_name="x/y/z plot", script_args=H.xyz_args(choices.index(label), "1,4"))
    r = H.txt2img(webui.url, body)
    assert r.ok, r.describe()
    assert r.images[0].shape[:2] == (H.SIZE, 2 * H.SIZE), "no 1×2 grid"
    got = [H.lr_params(t).get("LR lambda2") for t in r.infotexts[1:3]]
    assert got == ["1", "4"], r.infotexts
    assert H.differs(r.images[1], r.images[2]), "λ2 = 1 and 4 gave the same Flux image"


def test_flux_schnell_retouch_at_four_steps(webui, flux_plain, lr):
    """schnell's few steps: λ1 = 1 and λ2 = 2 at 4 steps (as given), the retouch runs, LR steps used
    records them, and the image differs from schnell's plain LoRA image."""
    override = {"sd_model_checkpoint": webui.title(FFC.SCHNELL)}
    try:
        plain = H.txt2img(webui.url, flux_body(LORA_PROMPT, steps=4, override_settings=override))
        assert plain.ok, plain.describe()
        on = H.txt2img(
            webui.url,
            flux_lr_body(
                lr(personalization="lora", lambda1=1, lambda2=2, mask_start=3),
                LORA_PROMPT,
                steps=4,
                override_settings=override,
            ),
        )
        got = H.assert_retouched(on)
        assert H.parse_infotext(on.infotexts[0]).get("Model") == FFC.SCHNELL, on.describe()
        assert (got.get("LR lambda1"), got.get("LR lambda2")) == ("1", "2"), got
        assert "LR steps used" in got, got
        assert H.differs(on.image, plain.image), "the schnell retouch gave the plain image"
    finally:
        H.set_checkpoint(webui.url, webui.title(FFC.PERSONAL))


def test_flux_schnell_is_loaded_as_schnell(webui, flux_plain):
    """The schnell-shaped checkpoint (no guidance embedding) is Forge's schnell: the distilled CFG
    is ignored (its log line), and a 4-step image is made."""
    mark = webui.log_mark()
    r = H.txt2img(
        webui.url,
        flux_body(steps=4, override_settings={"sd_model_checkpoint": webui.title(FFC.SCHNELL)}),
    )
    assert r.ok, r.describe()
    assert H.parse_infotext(r.infotexts[0]).get("Model") == FFC.SCHNELL, r.describe()
    assert r.image.std() > 1.0
    assert "Distilled CFG Scale will be ignored for Schnell" in webui.log_since(mark)
    H.set_checkpoint(webui.url, webui.title(FFC.PERSONAL))
