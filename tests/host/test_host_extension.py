"""Layout-and-Retouch inside a live WebUI, through its API.

Every check is on something only a working run produces — `LR ` infotext keys, extra gallery images,
pixel differences, log lines — never on HTTP 200 alone: the WebUI swallows exceptions raised in
script hooks and answers 200 with an ordinary image.

Defaults (conftest `lr_defaults`): DreamBooth mode, personalized = tiny-personal (loaded), vanilla =
tiny-vanilla, 64×64, 8 DDIM steps, λ1=2, λ2=3, mask start 6 taken literally, no SAM.
"""

from __future__ import annotations

import os
import re
import shutil

import host_helpers as H
import numpy as np
import pytest
import tiny_checkpoints as TC

SWITCH_LINE = re.compile(
    r"\[Layout-and-Retouch\] stage 1: switched to personalized UNet at step (\d+)"
)
RETOUCH_LINE = re.compile(
    r"\[Layout-and-Retouch\] retouch of (\d+) image\(s\):[^\n]*reference (inverted|cached)"
)


def test_script_is_registered(webui, plain_before):
    s = H.script_info(webui.url, H.SCRIPT)
    assert s is not None, (
        "Layout-and-Retouch missing from /sdapi/v1/script-info (scripts/ not loaded?)"
    )
    assert s["is_alwayson"] is True
    assert len(s["args"]) >= 1


def test_enabled_named_args_retouch_and_disabled_is_plain(webui, lr, plain_before):
    on = H.txt2img(webui.url, H.lr_body(lr()))
    lr_keys = H.assert_retouched(on)
    assert lr_keys.get("LR lambda1") == "2", lr_keys
    assert "LR steps used" in lr_keys, lr_keys
    assert lr_keys.get("LR mask") == "CA only", lr_keys
    assert len(on.images) == 1
    assert H.differs(on.image, plain_before.image), (
        "enabled gave the plain image: nothing was retouched"
    )

    off = H.txt2img(webui.url, H.lr_body(lr(enabled=False)))
    assert off.ok and not off.lr, off.describe()
    assert np.array_equal(off.image, plain_before.image), (
        "enabled=False must leave the generation untouched"
    )


def test_reference_with_data_url_prefix_is_the_same(webui, lr):
    plain = H.txt2img(webui.url, H.lr_body(lr()))
    prefixed = H.txt2img(
        webui.url, H.lr_body(lr(reference_image=H.png_b64(H.reference_rgb(), data_url=True)))
    )
    H.assert_retouched(plain)
    H.assert_retouched(prefixed)
    assert np.array_equal(plain.image, prefixed.image)


def test_positional_form_equals_named_form(webui, lr):
    named = H.txt2img(webui.url, H.lr_body(lr(lambda1=3)))
    pos = H.txt2img(webui.url, H.lr_body(H.positional(lr(lambda1=3))))
    H.assert_retouched(named)
    H.assert_retouched(pos)
    assert pos.lr == named.lr
    assert np.array_equal(pos.image, named.image)


def test_omitted_names_take_defaults(webui, lr, reference_b64):
    minimal = {
        "enabled": True,
        "reference_image": reference_b64,
        "personalization": "dreambooth",
        "vanilla_checkpoint": webui.title(TC.VANILLA),
        "concept_token": "sks",
        "class_phrase": "dog",
    }
    r = H.txt2img(webui.url, H.lr_body(minimal))
    lr_keys = H.assert_retouched(r)
    assert "LR lambda1" in lr_keys and "LR steps used" in lr_keys


def test_plain_is_bit_identical_after_enabled_and_after_failed(webui, lr, plain_before):
    H.assert_retouched(H.txt2img(webui.url, H.lr_body(lr())))
    after_ok = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after_ok.image, plain_before.image), (
        "something stayed patched after an enabled run"
    )
    assert after_ok.infotexts[0] == plain_before.infotexts[0]

    failed = H.txt2img(webui.url, H.lr_body(lr(concept_token="zzz")))  # token not in the prompt
    H.assert_error_names(failed, "concept_token", "concept token")
    after_fail = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(after_fail.image, plain_before.image), (
        "something stayed patched after a failed run"
    )


def test_dreambooth_switches_unet_at_lambda1_plus_one(webui, lr):
    mark = webui.log_mark()
    r = H.txt2img(webui.url, H.lr_body(lr(lambda1=3)))
    H.assert_retouched(r)
    steps = [int(k) for k in SWITCH_LINE.findall(webui.log_since(mark))]
    # Steps count 1..T in denoising order; s <= λ1 is vanilla, so the personalized UNet takes step λ1+1.
    assert steps == [4], f"expected one switch line at step 4, saw {steps}"
    assert H.get(webui.url, "/sdapi/v1/options")["sd_model_checkpoint"] == webui.title(TC.PERSONAL)


def test_vanilla_checkpoint_is_used(webui, lr):
    other = H.txt2img(webui.url, H.lr_body(lr()))
    itself = H.txt2img(webui.url, H.lr_body(lr(vanilla_checkpoint=webui.title(TC.PERSONAL))))
    H.assert_retouched(other)
    H.assert_retouched(itself)
    assert H.changed(other.image, itself.image), (
        f"the vanilla checkpoint had no measurable effect on stage 1 "
        f"(mean change {H.mean_change(other.image, itself.image):.3f} levels)"
    )


def test_vanilla_checkpoint_by_name_or_title(webui, lr):
    by_title = H.txt2img(webui.url, H.lr_body(lr()))
    by_name = H.txt2img(webui.url, H.lr_body(lr(vanilla_checkpoint=TC.VANILLA)))
    H.assert_retouched(by_title)
    H.assert_retouched(by_name)
    assert np.array_equal(by_title.image, by_name.image)


def test_dreambooth_does_not_reload_vanilla_weights_from_disk(webui, lr):
    """After one DreamBooth run the vanilla UNet is resident: overwrite the vanilla checkpoint file with
    garbage (same name, same mtime, so it stays listed with the same title) and run again — a reload
    from disk would fail or change the image."""
    if not webui.models.get("ckpt_dir"):
        pytest.skip("needs a WebUI started by the harness (overwrites the vanilla checkpoint file)")
    first = H.txt2img(webui.url, H.lr_body(lr()))
    H.assert_retouched(first)
    src = os.path.join(webui.models["ckpt_dir"], TC.VANILLA + ".safetensors")
    st = os.stat(src)
    away = src + ".away"
    shutil.move(src, away)
    try:
        with open(src, "wb") as f:
            f.write(os.urandom(st.st_size))
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        mark = webui.log_mark()
        second = H.txt2img(webui.url, H.lr_body(lr()))
        log = webui.log_since(mark)
    finally:
        os.replace(away, src)
    H.assert_retouched(second)
    assert np.array_equal(first.image, second.image)
    assert "Loading weights [" not in log, f"weights were loaded during the second run:\n{log}"


def test_textual_inversion_mode(webui, lr):
    prompt = f"a photo of {TC.EMBEDDING} dog on the beach"
    args = lr(
        personalization="textual_inversion",
        vanilla_checkpoint="",
        concept_token=TC.EMBEDDING,
        class_phrase="dog",
        reference_prompt=f"a photo of {TC.EMBEDDING} dog",
    )
    on = H.txt2img(webui.url, H.lr_body(args, prompt=prompt))
    lr_keys = H.assert_retouched(on)
    assert any("textual" in v.lower() for v in lr_keys.values()), lr_keys
    off = H.txt2img(webui.url, H.plain_body(prompt))
    assert H.differs(on.image, off.image)


def test_lora_mode_and_lora_state_restored(webui, lr):
    prompt = f"a photo of sks dog in snow <lora:{TC.LORA}:1>"
    plain_lora = H.txt2img(webui.url, H.plain_body(prompt))
    args = lr(
        personalization="lora", vanilla_checkpoint="", concept_token="sks", class_phrase="dog"
    )
    on = H.txt2img(webui.url, H.lr_body(args, prompt=prompt))
    lr_keys = H.assert_retouched(on)
    assert any("lora" in v.lower() for v in lr_keys.values()), lr_keys
    assert H.differs(on.image, plain_lora.image)
    again = H.txt2img(webui.url, H.plain_body(prompt))
    assert np.array_equal(again.image, plain_lora.image), "LoRA state not restored after the run"
    no_lora = H.txt2img(webui.url, H.plain_body("a photo of sks dog in snow"))
    assert H.differs(no_lora.image, plain_lora.image)


def test_batch_size_2_gives_2_retouched_images(webui, lr):
    on = H.txt2img(webui.url, H.lr_body(lr(), batch_size=2))
    off = H.txt2img(webui.url, H.plain_body(batch_size=2))
    H.assert_retouched(on)
    assert len(on.images) == 2 and len(off.images) == 2, on.describe()
    for i in range(2):
        assert H.lr_params(on.infotexts[i]), f"image {i} has no LR infotext: {on.infotexts[i]!r}"
        assert H.differs(on.images[i], off.images[i]), f"image {i} was not retouched"
    assert H.differs(on.images[0], on.images[1]), "each image must get its own layout (own seed)"


def test_batch_inverts_the_reference_once(webui, lr):
    """Batch size 2 × batch count 2 with a reference never seen before: the glue's per-batch log line
    `[Layout-and-Retouch] retouch of N image(s): …, reference inverted|cached, …` says the reference
    was inverted for the first batch and taken from the cache for the second."""
    fresh = H.reference_rgb()
    fresh.putpixel((1, 1), (1, 2, 3))  # not in the inversion cache yet
    mark = webui.log_mark()
    on = H.txt2img(
        webui.url, H.lr_body(lr(reference_image=H.png_b64(fresh)), batch_size=2, n_iter=2)
    )
    H.assert_retouched(on)
    assert len(on.images) == 4, on.describe()  # the API returns no grid
    for i in range(4):
        assert H.lr_params(on.infotexts[i]), f"image {i} has no LR infotext"
    lines = RETOUCH_LINE.findall(webui.log_since(mark))
    assert sum(int(n) for n, _ in lines) == 4, f"retouch log lines: {lines}"
    assert [how for _, how in lines].count("inverted") == 1, (
        f"reference inverted more than once: {lines}"
    )


def test_show_intermediates_appends_layout_mask_and_ca_map(webui, lr):
    plain = H.txt2img(webui.url, H.lr_body(lr()))
    shown = H.txt2img(webui.url, H.lr_body(lr(show_intermediates=True)))
    H.assert_retouched(shown)
    assert len(shown.images) == len(plain.images) + 3, shown.describe()
    assert np.array_equal(shown.images[0], plain.images[0]), (
        "showing intermediates changed the result"
    )
    layout, mask, ca = shown.images[1:4]
    assert layout.shape[:2] == (H.SIZE, H.SIZE) and layout.ndim == 3
    assert mask.shape[:2] == (H.SIZE, H.SIZE)
    assert ca.ndim in (2, 3) and ca.size > 1
    assert H.differs(layout[..., :3] if layout.ndim == 3 else layout, shown.images[0]), (
        "the layout image equals the result: no retouch happened"
    )


def test_scale_with_steps_records_the_effective_values(webui, lr):
    # T=10 with the paper's λ1=5, λ2=10, mask start 31 at T=50: counts scale and round half up
    # (1, 2); mask start keeps the NUMBER of blended steps proportional (20 of 50 → 4 of 10 → step 7).
    r = H.txt2img(
        webui.url,
        H.lr_body(lr(scale_with_steps=True, lambda1=5, lambda2=10, mask_start=31), steps=10),
    )
    lr_keys = H.assert_retouched(r)
    used = [int(v) for v in re.findall(r"(?:=|step )\s*(\d+)", lr_keys["LR steps used"])]
    assert used[:3] == [1, 2, 7], lr_keys
    assert lr_keys["LR lambda1"] == "5" and lr_keys["LR mask start"] == "31", (
        "the values as given are kept too"
    )


def test_layout_source_stage1_differs_from_inversion(webui, lr):
    inv = H.txt2img(webui.url, H.lr_body(lr(layout_source="inversion")))
    st1 = H.txt2img(webui.url, H.lr_body(lr(layout_source="stage1")))
    H.assert_retouched(inv)
    lr_keys = H.assert_retouched(st1)
    assert any("stage1" in v.replace(" ", "").lower() for v in lr_keys.values()), lr_keys
    assert H.differs(inv.image, st1.image)


def test_reset_reference_is_recorded_and_matters(webui, lr):
    """reset_reference: the reference path is re-set to its stored inversion latent every step
    (MasaCtrl/DreamMatcher) or left to run freely from z_r[T]; the two give different K_r/V_r."""
    reset = H.txt2img(webui.url, H.lr_body(lr(reset_reference=True)))
    free = H.txt2img(webui.url, H.lr_body(lr(reset_reference=False)))
    assert H.assert_retouched(reset)["LR reset reference"] == "True"
    assert H.assert_retouched(free)["LR reset reference"] == "False"
    assert H.differs(reset.image, free.image)
    again = H.txt2img(webui.url, H.lr_body(lr(reset_reference=True)))
    assert np.array_equal(again.image, reset.image), (
        "a cached reference inversion gave another image"
    )


def test_lambda_values_change_the_image(webui, lr):
    a = H.txt2img(webui.url, H.lr_body(lr(lambda1=1)))
    b = H.txt2img(webui.url, H.lr_body(lr(lambda1=4)))
    c = H.txt2img(webui.url, H.lr_body(lr(lambda2=6)))
    for r in (a, b, c):
        H.assert_retouched(r)
    assert a.lr["LR lambda1"] == "1" and b.lr["LR lambda1"] == "4"
    assert H.differs(a.image, b.image)
    assert H.differs(c.image, H.txt2img(webui.url, H.lr_body(lr())).image)


def test_infotext_paste_restores_the_parameters(webui, lr, reference_b64):
    """The API's `infotext` field pastes like "Send to txt2img": the WebUI fills the script's positional
    args from the infotext (the script's `infotext_fields`). The reference image is not in an infotext,
    so the request gives positions 0–1 (enabled, reference_image) and the rest must come from the paste."""
    src = H.txt2img(
        webui.url,
        H.lr_body(
            lr(
                lambda1=3,
                lambda2=5,
                mask_start=7,
                ca_threshold=0.2,
                layout_source="inversion",
                reset_reference=False,
            )
        ),
    )
    src_lr = H.assert_retouched(src)
    pasted = H.txt2img(
        webui.url,
        {
            "infotext": src.infotexts[0],
            "alwayson_scripts": {H.SCRIPT: {"args": [True, reference_b64]}},
        },
    )
    pasted_lr = H.assert_retouched(pasted)
    assert pasted_lr == src_lr, f"pasted {pasted_lr} != original {src_lr}"
    assert np.array_equal(pasted.image, src.image)


def test_xyz_axes_are_registered_once(webui):
    lr_axes = [c for c in H.xyz_axis_choices(webui.url) if c.startswith("[L&R]")]
    assert "[L&R] Lambda1" in lr_axes, lr_axes
    assert len(lr_axes) >= 7, (
        f"axes for Enable, λ1, λ2, mask start, CA threshold, vanilla, SAM: {lr_axes}"
    )
    assert len(lr_axes) == len(set(lr_axes)), f"an axis is registered twice: {lr_axes}"


def test_xyz_over_lambda1_returns_a_grid(webui, lr):
    choices = H.xyz_axis_choices(webui.url)
    assert "[L&R] Lambda1" in choices, [c for c in choices if "L&R" in c]
    body = H.lr_body(lr())
    body.update(
        script_name="x/y/z plot", script_args=H.xyz_args(choices.index("[L&R] Lambda1"), "1,2,4")
    )
    r = H.txt2img(webui.url, body)
    assert r.ok, r.describe()
    assert r.images[0].shape[:2] == (H.SIZE, 3 * H.SIZE), "no 1×3 grid"
    cells = r.images[1:4]
    assert [im.shape[:2] for im in cells] == [(H.SIZE, H.SIZE)] * 3
    assert [H.lr_params(t).get("LR lambda1") for t in r.infotexts[1:4]] == ["1", "2", "4"], (
        r.infotexts
    )
    assert H.differs(cells[0], cells[1]) and H.differs(cells[1], cells[2])
    single = H.txt2img(webui.url, H.lr_body(lr(lambda1=2)))
    assert np.array_equal(single.image, cells[1]), "the λ1=2 cell differs from a λ1=2 run"


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_retouches_the_first_pass_once(webui, lr, upscaler):
    """Stage 2 runs on the first-pass latents, before the hires pass (latent and pixel upscalers)."""
    hr = dict(
        enable_hr=True,
        hr_scale=2,
        hr_upscaler=upscaler,
        hr_second_pass_steps=3,
        denoising_strength=0.5,
    )
    plain_hr = H.txt2img(webui.url, H.plain_body(**hr))
    assert plain_hr.ok, plain_hr.describe()
    mark = webui.log_mark()
    r = H.txt2img(webui.url, H.lr_body(lr(), **hr))
    H.assert_retouched(r)
    log = webui.log_since(mark)
    assert [n for n, _ in RETOUCH_LINE.findall(log)] == ["1"], log[-2000:]
    assert r.image.shape[:2] == (2 * H.SIZE, 2 * H.SIZE)
    assert H.differs(r.image, plain_hr.image)


ROWS_LINE = re.compile(r"\[Layout-and-Retouch\] retouch of \d+ image\(s\):[^\n]*\((\d+) rows\)")


def test_reference_attention_cache_setting_skips_the_reference_rows(webui, lr):
    """With the opt-in "Reference attention cache (MB)" setting, a repeat with the same reference runs
    no reference rows in the identity steps, and the image stays the same."""
    import requests

    fresh = H.reference_rgb()
    fresh.putpixel((2, 2), (9, 8, 7))
    body = H.lr_body(lr(reference_image=H.png_b64(fresh)))
    requests.post(
        webui.url + "/sdapi/v1/options", json={"layout_retouch_kv_cache_mb": 64}, timeout=60
    ).raise_for_status()
    try:
        mark = webui.log_mark()
        first = H.txt2img(webui.url, body)
        second = H.txt2img(webui.url, body)
        rows = [int(n) for n in ROWS_LINE.findall(webui.log_since(mark))]
    finally:
        requests.post(
            webui.url + "/sdapi/v1/options", json={"layout_retouch_kv_cache_mb": 0}, timeout=60
        )
    H.assert_retouched(first)
    H.assert_retouched(second)
    assert len(rows) == 2 and rows[1] < rows[0], rows
    assert np.abs(first.image.astype(int) - second.image.astype(int)).max() <= 1


def test_stage1_reads_y_p_minus_with_the_vanilla_text_encoder(webui, lr, plain_before):
    """DreamBooth: y_p⁻ goes through tiny-vanilla's own text encoder (which differs from the loaded
    tiny-personal's), unless `stage1_text_encoder` says 'loaded'; nothing stays swapped afterwards."""
    mark = webui.log_mark()
    vanilla = H.txt2img(
        webui.url, H.lr_body(lr(stage1_text_encoder="vanilla"), prompt=H.PROMPT + " te")
    )
    loaded = H.txt2img(
        webui.url, H.lr_body(lr(stage1_text_encoder="loaded"), prompt=H.PROMPT + " te")
    )
    assert H.assert_retouched(vanilla).get("LR stage-1 text encoder") == "vanilla"
    assert H.assert_retouched(loaded).get("LR stage-1 text encoder") == "loaded"
    assert H.differs(vanilla.image, loaded.image), "the stage-1 text encoder made no difference"
    log = webui.log_since(mark)
    assert log.count("stage 1: y_p⁻ encoded with the vanilla checkpoint's text encoder") == 1, log[
        -2000:
    ]
    plain = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(plain.image, plain_before.image), "a text encoder stayed swapped"
