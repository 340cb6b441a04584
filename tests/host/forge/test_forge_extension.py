"""The extension in Forge: the A1111 tier's checks, on full-size random SD1.5 weights.

Enabled vs plain, plain bit-identical before/after an enabled run and after failures, the vanilla
switch (log line at λ1+1, and the vanilla weights matter), LoRA off for the vanilla steps and restored,
Textual Inversion, batch 2, intermediates, an X/Y/Z sweep, bad inputs, interrupt, and the stage-1
trajectory read through Forge's σ-scaled DDIM. Each enabled run takes ≈ 30–60 s on a CPU here, so
checks share runs where they can. Assertions are on what only a working run produces.
"""

from __future__ import annotations

import re

import forge_checkpoints as FC
import host_helpers as H
import numpy as np

SWITCH_LINE = re.compile(
    r"\[Layout-and-Retouch\] stage 1: switched to personalized UNet at step (\d+)"
)
RETOUCH_LINE = re.compile(
    r"\[Layout-and-Retouch\] retouch of (\d+) image\(s\):[^\n]*reference (inverted|cached)"
)


def _xyz(webui, lr_args, label, values, **kw):
    choices = H.xyz_axis_choices(webui.url)
    assert label in choices, [c for c in choices if "L&R" in c]
    body = H.lr_body(lr_args, **kw)
    body.update(
        script_name="x/y/z plot",
        script_args=H.xyz_args(choices.index(label), ",".join(map(str, values))),
    )
    return H.txt2img(webui.url, body)


def test_forge_enabled_run_is_retouched_and_plain_stays_bit_identical(webui, lr, plain_before):
    mark = webui.log_mark()
    on = H.txt2img(webui.url, H.lr_body(lr(lambda1=3)))
    got = H.assert_retouched(on)
    assert got.get("LR lambda1") == "3" and "LR steps used" in got, got
    assert H.differs(on.image, plain_before.image), "the enabled run gave the plain image"
    log = webui.log_since(mark)
    # the vanilla steps are s ≤ λ1: the personalized UNet takes step λ1+1, once
    assert [int(s) for s in SWITCH_LINE.findall(log)] == [4], log[-2000:]
    assert [n for n, _ in RETOUCH_LINE.findall(log)] == ["1"], log[-2000:]
    assert "vanilla checkpoint's text encoder" in log, (
        "stage 1 did not read y_p⁻ with the vanilla text encoder"
    )
    after = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after.image, plain_before.image), (
        "something stayed patched after an enabled run"
    )
    assert not after.lr

    failed = H.txt2img(webui.url, H.lr_body(lr(concept_token="zzz")))  # token not in the prompt
    H.assert_error_names(failed, "concept_token", "concept token")
    after_fail = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after_fail.image, plain_before.image), (
        "something stayed patched after a failed run"
    )


def test_forge_vanilla_checkpoint_is_what_stage1_uses(webui, lr):
    other = H.txt2img(webui.url, H.lr_body(lr()))
    itself = H.txt2img(webui.url, H.lr_body(lr(vanilla_checkpoint=webui.title(FC.PERSONAL))))
    H.assert_retouched(other)
    notes = " ".join(H.lr_notes(itself).values())
    assert "the loaded model itself" in notes, itself.lr
    assert H.differs(other.image, itself.image), "the vanilla checkpoint had no effect on stage 1"
    again = H.txt2img(webui.url, H.lr_body(lr()))
    assert np.array_equal(again.image, other.image), "the same enabled request gave another image"


def test_forge_lora_mode_switches_the_lora_off_and_restores_it(webui, lr):
    prompt = f"a photo of sks dog in snow <lora:{FC.LORA}:1>"
    plain_lora = H.txt2img(webui.url, H.plain_body(prompt))
    args = lr(
        personalization="lora", vanilla_checkpoint="", concept_token="sks", class_phrase="dog"
    )
    on = H.txt2img(webui.url, H.lr_body(args, prompt=prompt))
    lr_keys = H.assert_retouched(on)
    assert lr_keys.get("LR personalization") == "lora", lr_keys
    assert H.differs(on.image, plain_lora.image)
    again = H.txt2img(webui.url, H.plain_body(prompt))
    assert np.array_equal(again.image, plain_lora.image), "LoRA state not restored after the run"
    # and the vanilla steps really ran without it: λ1 = 0 (LoRA never off) gives another image
    never_off = H.txt2img(webui.url, H.lr_body(dict(args, lambda1=0), prompt=prompt))
    H.assert_retouched(never_off)
    assert H.differs(never_off.image, on.image), (
        "switching the LoRA off for stage 1 changed nothing"
    )


def test_forge_lora_mode_without_a_lora_tag_is_refused(webui, lr):
    r = H.txt2img(webui.url, H.lr_body(lr(personalization="lora", vanilla_checkpoint="")))
    H.assert_error_names(r, "personalization", "<lora:")


def test_forge_textual_inversion_mode(webui, lr):
    prompt = f"a photo of {FC.EMBEDDING} dog on the beach"
    args = lr(
        personalization="textual_inversion",
        vanilla_checkpoint="",
        concept_token=FC.EMBEDDING,
        class_phrase="dog",
        reference_prompt=f"a photo of {FC.EMBEDDING} dog",
    )
    on = H.txt2img(webui.url, H.lr_body(args, prompt=prompt))
    lr_keys = H.assert_retouched(on)
    assert lr_keys.get("LR personalization") == "textual_inversion", lr_keys
    assert "no installed Textual-Inversion" not in " ".join(H.lr_notes(on).values()), on.lr
    off = H.txt2img(webui.url, H.plain_body(prompt))
    assert H.differs(on.image, off.image)


def test_forge_batch_2_with_intermediates(webui, lr):
    off = H.txt2img(webui.url, H.plain_body(batch_size=2))
    on = H.txt2img(webui.url, H.lr_body(lr(show_intermediates=True), batch_size=2))
    H.assert_retouched(on)
    # 2 results, then layout + mask + attention map of each
    assert len(on.images) == 2 + 2 * 3, on.describe()
    for i in range(2):
        assert H.lr_params(on.infotexts[i]), f"image {i} has no LR infotext: {on.infotexts[i]!r}"
        assert H.differs(on.images[i], off.images[i]), f"image {i} was not retouched"
    assert H.differs(on.images[0], on.images[1]), "each image must get its own layout (own seed)"
    for t in on.infotexts[2:]:
        assert not H.lr_params(t), f"an intermediate carries LR keys: {t!r}"


def test_forge_xyz_sweep_over_lambda1(webui, lr):
    r = _xyz(webui, lr(), "[L&R] Lambda1", [1, 3])
    assert r.ok, r.describe()
    assert r.images[0].shape[:2] == (H.SIZE, 2 * H.SIZE), "no 1×2 grid"
    assert [H.lr_params(t).get("LR lambda1") for t in r.infotexts[1:3]] == ["1", "3"], r.infotexts
    assert H.differs(r.images[1], r.images[2])


def test_forge_bad_inputs_are_refused_by_name_and_forge_keeps_serving(webui, lr, plain_before):
    cases = [
        (lr(reference_image=None), ("reference_image",)),
        (lr(lambda1=9), ("lambda1", "λ1")),
        (lr(vanilla_checkpoint="no-such-model.safetensors"), ("vanilla_checkpoint",)),
        (lr(sam_model="../../etc/passwd"), ("sam_model", "path")),
        (lr(reference_image="not base64 at all"), ("reference_image",)),
    ]
    for args, names in cases:
        r = H.txt2img(webui.url, H.lr_body(args))
        H.assert_error_names(r, *names)
    bad_axis = _xyz(webui, lr(), "[L&R] Mask start", [6, 60])
    H.assert_error_names(bad_axis, "mask start")
    after = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after.image, plain_before.image)


def test_forge_layout_source_stage1_reads_the_ddim_trajectory(webui, lr):
    """Forge hands the CFG denoiser x on the σ scale; the glue reads z_t = x/√(σ²+1). With the DDIM
    sampler the stage-1 trajectory is used (no fallback note) and differs from the inverted layout."""
    inv = H.txt2img(webui.url, H.lr_body(lr()))
    st1 = H.txt2img(webui.url, H.lr_body(lr(layout_source="stage1")))
    H.assert_retouched(st1)
    assert "needs the DDIM sampler" not in " ".join(H.lr_notes(st1).values()), st1.lr
    assert H.differs(st1.image, inv.image)


def test_forge_interrupt_mid_retouch_leaves_nothing_patched(webui, lr, plain_before):
    body = H.lr_body(lr())
    r, hit, seen = H.interrupt_during_retouch(webui.url, body, at=0.6, interval=0.05)
    assert hit, f"the progress never showed the retouch phase; textinfo seen: {sorted(seen)}"
    assert r.ok and r.images and r.lr, r.describe()
    assert "interrupted" in " ".join(H.lr_notes(r).values()), r.lr
    after = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after.image, plain_before.image), (
        "something stayed patched after an interrupt"
    )


def test_forge_img2img_and_inpaint_retouch_and_keep_the_outside(webui, lr):
    """img2img in Forge: retouched over the steps run, and a plain img2img right after is
    bit-identical; inpaint keeps the input's pixels outside the mask. (Forge's VAE encode and its
    inpaint step draw from the global RNG, so the bit-identity check comes before any inpaint run.)"""
    plain = H.img2img(webui.url, H.img2img_body())
    assert plain.ok, plain.describe()
    on = H.img2img(webui.url, H.lr_img2img_body(lr()))
    got = H.assert_retouched(on)
    assert "img2img ran 7 of 8 steps" in got["LR steps used"], got
    assert H.differs(on.image, plain.image)
    again = H.img2img(webui.url, H.img2img_body())
    assert np.array_equal(again.image, plain.image), "plain img2img changed after an enabled run"
    box = (16, 16, 48, 48)
    painted = H.img2img(webui.url, H.lr_img2img_body(lr(), mask=H.box_mask(box=box)))
    H.assert_retouched(painted)
    keep = np.ones((H.SIZE, H.SIZE), bool)
    keep[box[1] : box[3], box[0] : box[2]] = False
    source = np.asarray(H.input_rgb())
    assert np.array_equal(painted.image[keep], source[keep]), (
        "pixels outside the inpaint mask changed"
    )
    assert H.differs(painted.image[~keep], source[~keep])


def test_forge_another_extensions_attention_replacement_is_refused_by_name(webui, lr):
    """An extension that replaces attention through Forge's `set_model_attn1_replace` (here the
    test-only `attn_replace_extension`, triggered by `attnreplace` in the prompt) bypasses the modules
    the retouch edits: the run is refused naming the conflict, and the same prompt runs plain."""
    prompt = H.PROMPT + " attnreplace"
    plain = H.txt2img(webui.url, H.plain_body(prompt))
    assert plain.ok, plain.describe()
    r = H.txt2img(webui.url, H.lr_body(lr(), prompt=prompt))
    H.assert_error_names(r, "set_model_attn", "replaces the UNet's attention")
    assert "attn1" in H.error_text(r), H.error_text(r)
    again = H.txt2img(webui.url, H.plain_body(prompt))
    assert np.array_equal(again.image, plain.image)
