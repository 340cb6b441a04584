"""The plain host works: tiny checkpoints, embedding and LoRA load and change the image; generation is
deterministic (the base of every bit-identity test). These pass without the extension's glue."""

from __future__ import annotations

import host_helpers as H
import numpy as np
import tiny_checkpoints as TC


def test_plain_txt2img_is_a_real_deterministic_image(webui, plain_before):
    r = plain_before
    assert r.image.shape == (H.SIZE, H.SIZE, 3)
    assert r.image.std() > 1.0, "a flat image: the tiny checkpoint's weights did not load"
    it = H.parse_infotext(r.infotexts[0])
    assert it["Model"] == TC.PERSONAL and it["Steps"] == str(H.STEPS) and it["Sampler"] == "DDIM"
    again = H.txt2img(webui.url, H.plain_body())
    assert np.array_equal(again.image, r.image), (
        "same seed, same request: the host must be bit-identical"
    )


def test_tiny_checkpoints_are_listed_and_personal_is_loaded(webui):
    names = {m["model_name"]: m for m in H.get(webui.url, "/sdapi/v1/sd-models")}
    for stem in (TC.PERSONAL, TC.VANILLA, TC.WIDE):
        assert stem in names, f"{stem} missing from /sdapi/v1/sd-models: {sorted(names)}"
        assert names[stem]["config"] and names[stem]["config"].endswith(stem + ".yaml"), names[stem]
    assert H.get(webui.url, "/sdapi/v1/options")["sd_model_checkpoint"] == webui.title(TC.PERSONAL)


def test_checkpoints_have_different_weights(webui, plain_before):
    r = H.txt2img(
        webui.url,
        H.plain_body(
            override_settings={"sd_model_checkpoint": webui.title(TC.VANILLA)},
            override_settings_restore_afterwards=True,
        ),
    )
    assert r.ok, r.describe()
    assert H.parse_infotext(r.infotexts[0])["Model"] == TC.VANILLA
    assert H.differs(r.image, plain_before.image)
    back = H.txt2img(webui.url, H.plain_body())
    assert H.parse_infotext(back.infotexts[0])["Model"] == TC.PERSONAL
    assert np.array_equal(back.image, plain_before.image)


def test_textual_inversion_embedding_is_loaded_and_used(webui):
    emb = H.get(webui.url, "/sdapi/v1/embeddings")
    assert TC.EMBEDDING in emb["loaded"], emb
    assert (
        emb["loaded"][TC.EMBEDDING]["shape"] == 32 and emb["loaded"][TC.EMBEDDING]["vectors"] == 2
    )
    with_emb = H.txt2img(webui.url, H.plain_body(f"a photo of {TC.EMBEDDING} dog"))
    without = H.txt2img(webui.url, H.plain_body("a photo of dog"))
    assert H.differs(with_emb.image, without.image)
    assert TC.EMBEDDING in H.parse_infotext(with_emb.infotexts[0]).get("TI hashes", ""), (
        with_emb.infotexts[0]
    )


def test_lora_is_loaded_and_changes_the_image(webui):
    assert TC.LORA in [x["name"] for x in H.get(webui.url, "/sdapi/v1/loras")]
    base = H.txt2img(webui.url, H.plain_body("a photo of sks dog"))
    with_lora = H.txt2img(webui.url, H.plain_body(f"a photo of sks dog <lora:{TC.LORA}:1>"))
    assert "Lora hashes" in H.parse_infotext(with_lora.infotexts[0]), with_lora.infotexts[0]
    assert np.abs(with_lora.image.astype(int) - base.image).mean() > 0.1
    again = H.txt2img(webui.url, H.plain_body("a photo of sks dog"))
    assert np.array_equal(again.image, base.image), "the LoRA stayed applied after its request"


def test_xyz_plot_over_steps_returns_a_grid(webui):
    choices = H.xyz_axis_choices(webui.url)
    r = H.txt2img(
        webui.url,
        dict(
            H.plain_body(),
            script_name="x/y/z plot",
            script_args=H.xyz_args(choices.index("Steps"), "3,4,5"),
        ),
    )
    assert r.ok, r.describe()
    assert [im.shape[:2] for im in r.images] == [(H.SIZE, 3 * H.SIZE)] + [(H.SIZE, H.SIZE)] * 3
    for i in range(3):
        assert np.array_equal(r.images[0][:, i * H.SIZE : (i + 1) * H.SIZE], r.images[1 + i])
