"""The X/Y/Z grid image, the axes' units, the vanilla checkpoint's architecture (issue 20), via the API."""

from __future__ import annotations

import host_helpers as H
import pytest
import tiny_checkpoints as TC

pytestmark = pytest.mark.usefixtures("webui")


def _xyz(webui, lr_args, label, values, **kw):
    choices = H.xyz_axis_choices(webui.url)
    body = H.lr_body(lr_args, **kw)
    body.update(
        script_name="x/y/z plot",
        script_args=H.xyz_args(choices.index(label), ",".join(map(str, values))),
    )
    return H.txt2img(webui.url, body)


def test_the_grid_image_carries_no_lr_keys(webui, lr):
    """A grid is not a retouched image: pasting it must not switch the extension on with its first
    cell's values. The cells keep their own."""
    r = _xyz(webui, lr(), "[L&R] Lambda1", [1, 2])
    assert r.ok, r.describe()
    grid, cells = r.infotexts[0], r.infotexts[1:3]
    assert "X Type: [L&R] Lambda1" in grid, grid
    assert H.lr_params(grid) == {}, f"the grid's infotext carries LR keys: {grid}"
    assert [H.lr_params(c).get("LR lambda1") for c in cells] == ["1", "2"], cells


def test_a_refused_axis_value_says_the_axis_counts_steps_at_this_count(webui, lr):
    """[L&R] Mask start = 31 (the panel's default, for 50 steps) at 10 steps: refused, and the message
    says axis values count the generation's steps and what to enter for the slider's 31 (7)."""
    r = _xyz(webui, lr(), "[L&R] Mask start", [6, 31], steps=10)
    assert r.status == 422, r.describe()
    text = H.error_text(r)
    assert "[L&R] Mask start = 31" in text, text
    assert "X/Y/Z values count this generation's 10 steps" in text, text
    assert "if you meant 31 of 50 steps, as on the slider, enter 7" in text, text


def test_a_vanilla_checkpoint_of_another_architecture_is_refused_before_loading(webui, lr):
    """Told from the file's header: no 'loading vanilla UNet' line for it."""
    mark = webui.log_mark()
    r = H.txt2img(webui.url, H.lr_body(lr(vanilla_checkpoint=webui.title(TC.WIDE))))
    H.assert_error_names(r, "vanilla_checkpoint")
    assert "another size" in H.error_text(r), H.error_text(r)
    log = webui.log_since(mark)
    assert "loading vanilla UNet" not in log, log[-2000:]
    r = H.txt2img(webui.url, H.lr_body(lr(vanilla_checkpoint=webui.title(TC.XL_VANILLA))))
    text = H.error_text(r)
    assert r.status == 422 and "SDXL" in text and "SD1" in text, text
    assert "loading vanilla UNet" not in webui.log_since(mark), (
        "an SDXL UNet was loaded to refuse it"
    )
