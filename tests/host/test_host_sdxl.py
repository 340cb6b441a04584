"""Layout-and-Retouch on SDXL inside a live WebUI.

The same host checks as on SD1, with the tiny SDXL models of `tiny_checkpoints.py` (sgm
DiffusionEngine, loaded by the WebUI as SDXL): the module switches the WebUI's model to
tiny-xl-personal (conftest `sdxl_model`, which verifies the switch) and back to the SD1
tiny-personal at the end (verified bit-identical to the session's SD1 baseline).

As on SD1, every check is on something only a working run produces — `LR ` infotext keys, extra
gallery images, pixel differences, log lines — never on HTTP 200 alone.

Defaults (`xl`): DreamBooth mode, personalized = tiny-xl-personal (loaded), vanilla = tiny-xl-vanilla,
64×64, 8 DDIM steps, λ1=2, λ2=3, mask start 6 taken literally, no SAM.
"""

from __future__ import annotations

import re

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
# An error message naming SD1 (SD1, SD 1.5, SD v1, sd1.x …) — "SDXL" does not match.
NAMES_SD1 = re.compile(r"\bsd[ -]?v?1(?:\b|\.|x)", re.IGNORECASE)
PROMPT = "a photo of sks dog jumping over a fence"


@pytest.fixture(scope="module")
def xl_plain_before(webui, sdxl_model):
    """The plain SDXL image made before any enabled SDXL run (the module's baseline)."""
    r = H.txt2img(webui.url, H.plain_body(PROMPT))
    assert r.ok, r.describe()
    assert H.parse_infotext(r.infotexts[0]).get("Model") == TC.XL_PERSONAL, r.describe()
    return r


@pytest.fixture(scope="module")
def xl_defaults(webui, sdxl_model, lr_defaults) -> dict:
    """The SD1 defaults (conftest `lr_defaults`) with the SDXL vanilla checkpoint."""
    return dict(lr_defaults, vanilla_checkpoint=webui.title(TC.XL_VANILLA))


@pytest.fixture
def xl(xl_defaults):
    def make(**kw):
        d = dict(xl_defaults)
        d.update(kw)
        return d

    return make


def _run(webui, args, prompt=PROMPT, **kw) -> H.Result:
    return H.txt2img(webui.url, H.lr_body(args, prompt=prompt, **kw))


# ---------------------------------------------------------------- the host with the SDXL model


def test_sdxl_models_are_listed_and_the_plain_sdxl_host_works(
    webui, sdxl_model, xl_plain_before, plain_before
):
    names = {m["model_name"]: m for m in H.get(webui.url, "/sdapi/v1/sd-models")}
    for stem in (TC.XL_PERSONAL, TC.XL_VANILLA, TC.XL_WIDE):
        assert stem in names, f"{stem} missing from /sdapi/v1/sd-models: {sorted(names)}"
        assert names[stem]["config"] and names[stem]["config"].endswith(stem + ".yaml"), names[stem]
    assert H.get(webui.url, "/sdapi/v1/options")["sd_model_checkpoint"] == sdxl_model
    img = xl_plain_before.image
    assert img.shape == (H.SIZE, H.SIZE, 3) and img.std() > 1.0, "the SDXL plain image is flat"
    assert H.differs(img, plain_before.image), "the SDXL model gave the SD1 image"
    again = H.txt2img(webui.url, H.plain_body(PROMPT))
    assert np.array_equal(again.image, img), (
        "same seed, same request: the SDXL host must be bit-identical"
    )


def test_sdxl_vanilla_checkpoint_has_other_weights(webui, sdxl_model, xl_plain_before):
    r = H.txt2img(
        webui.url,
        H.plain_body(
            PROMPT,
            override_settings={"sd_model_checkpoint": webui.title(TC.XL_VANILLA)},
            override_settings_restore_afterwards=True,
        ),
    )
    assert r.ok and H.parse_infotext(r.infotexts[0])["Model"] == TC.XL_VANILLA, r.describe()
    assert H.differs(r.image, xl_plain_before.image)
    back = H.txt2img(webui.url, H.plain_body(PROMPT))
    assert H.parse_infotext(back.infotexts[0])["Model"] == TC.XL_PERSONAL
    assert np.array_equal(back.image, xl_plain_before.image)


def test_sdxl_lora_and_embedding_work_in_the_plain_host(webui, sdxl_model):
    assert TC.XL_LORA in [x["name"] for x in H.get(webui.url, "/sdapi/v1/loras")]
    base = H.txt2img(webui.url, H.plain_body("a photo of sks dog"))
    with_lora = H.txt2img(webui.url, H.plain_body(f"a photo of sks dog <lora:{TC.XL_LORA}:1>"))
    assert "Lora hashes" in H.parse_infotext(with_lora.infotexts[0]), with_lora.infotexts[0]
    assert np.abs(with_lora.image.astype(int) - base.image).mean() > 0.1, (
        "the SDXL LoRA had no effect"
    )
    again = H.txt2img(webui.url, H.plain_body("a photo of sks dog"))
    assert np.array_equal(again.image, base.image), "the SDXL LoRA stayed applied after its request"
    emb = H.get(webui.url, "/sdapi/v1/embeddings")["loaded"][TC.XL_EMBEDDING]
    assert emb["shape"] == 288 and emb["vectors"] == 2, emb
    with_emb = H.txt2img(webui.url, H.plain_body(f"a photo of {TC.XL_EMBEDDING} dog"))
    without = H.txt2img(webui.url, H.plain_body("a photo of dog"))
    assert H.differs(with_emb.image, without.image)
    assert TC.XL_EMBEDDING in H.parse_infotext(with_emb.infotexts[0]).get("TI hashes", ""), (
        with_emb.infotexts[0]
    )


# ---------------------------------------------------------------- enabled vs plain


def test_sdxl_enabled_retouches_and_disabled_is_plain(webui, xl, xl_plain_before):
    on = _run(webui, xl())
    lr_keys = H.assert_retouched(on)
    assert lr_keys.get("LR lambda1") == "2", lr_keys
    assert "LR steps used" in lr_keys, lr_keys
    assert lr_keys.get("LR mask") == "CA only", lr_keys
    assert len(on.images) == 1 and on.image.shape[:2] == (H.SIZE, H.SIZE)
    assert H.differs(on.image, xl_plain_before.image), (
        "enabled gave the plain image: nothing was retouched"
    )

    off = _run(webui, xl(enabled=False))
    assert off.ok and not off.lr, off.describe()
    assert np.array_equal(off.image, xl_plain_before.image), (
        "enabled=False must leave the SDXL generation untouched"
    )


def test_sdxl_repeat_is_bit_identical(webui, xl):
    a = _run(webui, xl(lambda1=3))
    b = _run(webui, xl(lambda1=3))
    H.assert_retouched(a)
    H.assert_retouched(b)
    assert np.array_equal(a.image, b.image), (
        "an SDXL retouch repeated (cached inversion) gave another image"
    )


def test_sdxl_plain_is_bit_identical_after_enabled_and_after_failed(webui, xl, xl_plain_before):
    H.assert_retouched(_run(webui, xl()))
    after_ok = H.txt2img(webui.url, H.plain_body(PROMPT))
    assert np.array_equal(after_ok.image, xl_plain_before.image), (
        "something stayed patched after an enabled SDXL run"
    )
    assert after_ok.infotexts[0] == xl_plain_before.infotexts[0]

    failed = _run(webui, xl(concept_token="zzz"))
    H.assert_error_names(failed, "concept_token", "concept token")
    after_fail = H.txt2img(webui.url, H.plain_body(PROMPT))
    assert np.array_equal(after_fail.image, xl_plain_before.image), (
        "something stayed patched after a failed SDXL run"
    )


# ---------------------------------------------------------------- the three personalization kinds


def test_sdxl_dreambooth_switches_unet_at_lambda1_plus_one(webui, xl, sdxl_model):
    mark = webui.log_mark()
    r = _run(webui, xl(lambda1=3))
    H.assert_retouched(r)
    steps = [int(k) for k in SWITCH_LINE.findall(webui.log_since(mark))]
    assert steps == [4], f"expected one switch line at step 4, saw {steps}"
    assert H.get(webui.url, "/sdapi/v1/options")["sd_model_checkpoint"] == sdxl_model


def test_sdxl_vanilla_checkpoint_is_used(webui, xl):
    other = _run(webui, xl())
    itself = _run(webui, xl(vanilla_checkpoint=webui.title(TC.XL_PERSONAL)))
    H.assert_retouched(other)
    H.assert_retouched(itself)
    assert H.differs(other.image, itself.image), (
        "the SDXL vanilla checkpoint had no effect on stage 1"
    )


def test_sdxl_lora_mode_and_lora_state_restored(webui, xl):
    prompt = f"a photo of sks dog in snow <lora:{TC.XL_LORA}:1>"
    plain_lora = H.txt2img(webui.url, H.plain_body(prompt))
    args = xl(
        personalization="lora", vanilla_checkpoint="", concept_token="sks", class_phrase="dog"
    )
    on = _run(webui, args, prompt=prompt)
    lr_keys = H.assert_retouched(on)
    assert any("lora" in v.lower() for v in lr_keys.values()), lr_keys
    assert H.differs(on.image, plain_lora.image)
    again = H.txt2img(webui.url, H.plain_body(prompt))
    assert np.array_equal(again.image, plain_lora.image), (
        "SDXL LoRA state not restored after the run"
    )
    no_lora = H.txt2img(webui.url, H.plain_body("a photo of sks dog in snow"))
    assert H.differs(no_lora.image, plain_lora.image)


def test_sdxl_textual_inversion_mode(webui, xl):
    prompt = f"a photo of {TC.XL_EMBEDDING} dog on the beach"
    args = xl(
        personalization="textual_inversion",
        vanilla_checkpoint="",
        concept_token=TC.XL_EMBEDDING,
        class_phrase="dog",
        reference_prompt=f"a photo of {TC.XL_EMBEDDING} dog",
    )
    on = _run(webui, args, prompt=prompt)
    lr_keys = H.assert_retouched(on)
    assert any("textual" in v.lower() for v in lr_keys.values()), lr_keys
    off = H.txt2img(webui.url, H.plain_body(prompt))
    assert H.differs(on.image, off.image)


# ---------------------------------------------------------------- batches, intermediates, sizes


def test_sdxl_batch_inverts_the_reference_once(webui, xl):
    fresh = H.reference_rgb()
    fresh.putpixel((1, 1), (3, 2, 1))  # not in the inversion cache yet
    mark = webui.log_mark()
    on = _run(webui, xl(reference_image=H.png_b64(fresh)), batch_size=2, n_iter=2)
    H.assert_retouched(on)
    assert len(on.images) == 4, on.describe()
    for i in range(4):
        assert H.lr_params(on.infotexts[i]), f"image {i} has no LR infotext"
    lines = RETOUCH_LINE.findall(webui.log_since(mark))
    assert sum(int(n) for n, _ in lines) == 4, f"retouch log lines: {lines}"
    assert [how for _, how in lines].count("inverted") == 1, (
        f"reference inverted more than once: {lines}"
    )
    off = H.txt2img(webui.url, H.plain_body(PROMPT, batch_size=2))
    assert H.differs(on.images[0], off.images[0]) and H.differs(on.images[1], off.images[1])
    assert H.differs(on.images[0], on.images[1]), "each image must get its own layout (own seed)"


def test_sdxl_show_intermediates_appends_layout_mask_and_ca_map(webui, xl):
    plain = _run(webui, xl())
    shown = _run(webui, xl(show_intermediates=True))
    H.assert_retouched(shown)
    assert len(shown.images) == len(plain.images) + 3, shown.describe()
    assert np.array_equal(shown.images[0], plain.images[0]), (
        "showing intermediates changed the result"
    )
    layout, mask, ca = shown.images[1:4]
    assert layout.shape[:2] == (H.SIZE, H.SIZE) and layout.ndim == 3
    assert mask.shape[:2] == (H.SIZE, H.SIZE)
    assert ca.ndim in (2, 3) and ca.size > 1
    assert H.differs(layout[..., :3], shown.images[0]), (
        "the layout image equals the result: no retouch happened"
    )


@pytest.mark.parametrize("width,height", [(64, 96), (96, 64)])
def test_sdxl_non_square_size(webui, xl, width, height):
    on = _run(webui, xl(), width=width, height=height)
    lr_keys = H.assert_retouched(on)
    assert on.image.shape[:2] == (height, width), on.describe()
    plain = H.txt2img(webui.url, H.plain_body(PROMPT, width=width, height=height))
    assert H.differs(on.image, plain.image), f"{width}×{height}: nothing was retouched ({lr_keys})"


# ---------------------------------------------------------------- layer preset


def test_sdxl_layer_preset_is_recorded_and_matters(webui, xl):
    std = _run(webui, xl(layer_preset="standard"))
    light = _run(webui, xl(layer_preset="light"))
    assert H.assert_retouched(std).get("LR layer preset") == "standard", std.lr
    assert H.assert_retouched(light).get("LR layer preset") == "light", light.lr
    assert H.differs(std.image, light.image), "the light preset gave the standard image"
    args = xl()
    del args["layer_preset"]
    default = _run(webui, args)
    assert np.array_equal(default.image, std.image), "the default preset is not 'standard'"


def test_sdxl_layer_preset_is_an_xyz_axis(webui, sdxl_model):
    lr_axes = [c for c in H.xyz_axis_choices(webui.url) if c.startswith("[L&R]")]
    assert any("preset" in c.lower() for c in lr_axes), lr_axes


# ---------------------------------------------------------------- X/Y/Z, paste


def test_sdxl_xyz_over_lambda1_returns_a_grid(webui, xl):
    choices = H.xyz_axis_choices(webui.url)
    assert "[L&R] Lambda1" in choices, [c for c in choices if "L&R" in c]
    body = H.lr_body(xl(), prompt=PROMPT)
    body.update(
        script_name="x/y/z plot", script_args=H.xyz_args(choices.index("[L&R] Lambda1"), "1,2,4")
    )
    r = H.txt2img(webui.url, body)
    assert r.ok and len(r.images) == 4, r.describe()
    assert all(isinstance(t, str) for t in r.infotexts[1:4]), (
        f"cells without an infotext (failed cells?): {r.describe()}"
    )
    assert r.images[0].shape[:2] == (H.SIZE, 3 * H.SIZE), "no 1×3 grid"
    cells = r.images[1:4]
    assert [im.shape[:2] for im in cells] == [(H.SIZE, H.SIZE)] * 3
    assert [H.lr_params(t).get("LR lambda1") for t in r.infotexts[1:4]] == ["1", "2", "4"], (
        r.infotexts
    )
    assert H.differs(cells[0], cells[1]) and H.differs(cells[1], cells[2])
    single = _run(webui, xl(lambda1=2))
    assert np.array_equal(single.image, cells[1]), "the λ1=2 cell differs from a λ1=2 run"


def test_sdxl_infotext_paste_restores_the_parameters(webui, xl, reference_b64):
    src = _run(
        webui,
        xl(
            lambda1=3,
            lambda2=5,
            mask_start=7,
            ca_threshold=0.2,
            reset_reference=False,
            layer_preset="light",
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


# ---------------------------------------------------------------- bad input


def test_sdxl_refuses_an_sd1_vanilla_checkpoint_naming_both_architectures(webui, xl):
    r = _run(webui, xl(vanilla_checkpoint=webui.title(TC.VANILLA)))
    H.assert_error_names(r, "vanilla_checkpoint", "vanilla checkpoint")
    text = H.error_text(r)
    assert "sdxl" in text.lower(), f"the error does not name SDXL: {text[:1000]}"
    assert NAMES_SD1.search(text), f"the error does not name SD1: {text[:1000]}"
    assert webui.alive()


def test_sdxl_refuses_an_sdxl_vanilla_of_another_architecture(webui, xl):
    r = _run(webui, xl(vanilla_checkpoint=webui.title(TC.XL_WIDE)))
    H.assert_error_names(r, "vanilla_checkpoint", "vanilla checkpoint")
    assert webui.alive()


@pytest.mark.parametrize(
    "changes,names",
    [
        pytest.param({"lambda1": H.STEPS}, ("lambda1", "λ1"), id="lambda1-equals-steps"),
        pytest.param(
            {"reference_image": ""}, ("reference_image", "reference image"), id="empty-reference"
        ),
        pytest.param(
            {"layer_preset": "heavy"}, ("layer_preset", "layer preset"), id="unknown-layer-preset"
        ),
    ],
)
def test_sdxl_refused_input_names_the_parameter(webui, xl, changes, names):
    H.assert_error_names(_run(webui, xl(**changes)), *names)
    assert webui.alive()


def test_sdxl_plain_identical_after_all_refused_input(webui, xl_plain_before):
    r = H.txt2img(webui.url, H.plain_body(PROMPT))
    assert np.array_equal(r.image, xl_plain_before.image), (
        "a refused SDXL request left something patched"
    )
    assert r.infotexts[0] == xl_plain_before.infotexts[0]


# (The half-precision VAE retry cannot run in this tier — the CPU WebUI runs with --no-half — so it
# is proven in the library: tests/test_sdxl.py::test_half_precision_vae_that_overflows_is_retried_in_float32.)


def test_sdxl_refiner_switch_is_refused_before_sampling(webui, xl):
    """The WebUI's Refiner would swap models mid-sampling: refused with a message, nothing computed."""
    mark = webui.log_mark()
    r = _run(webui, xl(), refiner_checkpoint=webui.title(TC.XL_VANILLA), refiner_switch_at=0.5)
    H.assert_error_names(r, "refiner_checkpoint", "refiner")
    assert "Refiner" in H.error_text(r)
    log = webui.log_since(mark)
    assert not SWITCH_LINE.search(log) and not RETOUCH_LINE.search(log), log[-2000:]
    assert webui.alive()


def test_sdxl_hires_fix_retouches_the_first_pass_once(webui, xl):
    hr = dict(
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="Latent",
        hr_second_pass_steps=3,
        denoising_strength=0.5,
    )
    plain_hr = H.txt2img(webui.url, H.plain_body(PROMPT, **hr))
    assert plain_hr.ok, plain_hr.describe()
    mark = webui.log_mark()
    r = _run(webui, xl(), **hr)
    H.assert_retouched(r)
    assert [n for n, _ in RETOUCH_LINE.findall(webui.log_since(mark))] == ["1"]
    assert r.image.shape[:2] == (96, 96) and H.differs(r.image, plain_hr.image)


# ---------------------------------------------------------------- memory (slow, last)


@pytest.mark.slow
def test_sdxl_50_enabled_generations_keep_memory_flat(webui, xl):
    from test_host_memory import REFERENCES, _references, assert_memory_flat

    refs = _references()
    assert_memory_flat(
        webui,
        lambda i: _run(
            webui,
            xl(reference_image=refs[i % REFERENCES]),
            prompt=f"a photo of sks dog number {i}",
            seed=1000 + i,
        ),
        "SDXL ",
    )
