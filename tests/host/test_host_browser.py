"""The browser tier: the extension as a person meets it, in headless Chromium (Debian's
package, driven by Playwright) against a real WebUI started WITH its UI (`webui_ui` in conftest).

Skipped with the reason when Playwright or Chromium is missing. Every check is on what the page
shows after a real generation: header checkbox state, gallery images, the infotext panel under the
gallery, the message area, the progress bar's text while it runs."""

from __future__ import annotations

import json
import os
import re
import time

import host_helpers as H
import host_server as S
import numpy as np
import pytest
import tiny_checkpoints as TC
from PIL import Image

ACC = "#script_layoutandretouch_enabled"
SID = "script_layoutandretouch_"
XYZ = "script_txt2img_xyz_plot_"
TIMEOUT = 180_000  # ms; a loaded 2-core machine is slow


@pytest.fixture(scope="module")
def browser(webui_ui):
    yield from S.chromium()


@pytest.fixture
def page(browser, webui_ui, tmp_path):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT)
    pg.goto(webui_ui.url)
    pg.wait_for_selector("#txt2img_prompt textarea")
    pg.wait_for_function(
        "() => document.querySelector('%s .input-accordion-checkbox') !== null" % ACC
    )
    yield pg
    ctx.close()


# ---------------------------------------------------------------- page helpers
def set_number(pg, elem_id, value):
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def set_text(pg, selector, value):
    box = pg.locator(selector)
    box.fill(value)
    box.press("Tab")


def header_checkbox(pg):
    return pg.locator(f"{ACC} .input-accordion-checkbox")


def enable(pg):
    if not header_checkbox(pg).is_checked():
        pg.locator(
            f"{ACC} .label-wrap"
        ).first.click()  # opening the accordion enables it (WebUI convention)
    pg.wait_for_function("() => document.querySelector('#%senabled-checkbox input').checked" % SID)


def choose(pg, elem_id, option):
    """Pick `option` in a gradio 3 dropdown."""
    pg.locator(f"#{elem_id} input").click()
    pg.locator(f"#{elem_id} ul.options li", has_text=option).first.click()


def dropdown_options(pg, elem_id):
    """The options a gradio 3 dropdown offers (opened and closed again)."""
    box = pg.locator(f"#{elem_id} input")
    box.click()
    pg.locator(f"#{elem_id} ul.options li").first.wait_for()
    texts = [t.strip() for t in pg.locator(f"#{elem_id} ul.options li").all_inner_texts()]
    box.blur()  # the list closes on blur (Escape leaves it open: the next click would close it)
    pg.locator(f"#{elem_id} ul.options").wait_for(state="detached")
    return texts


def number_value(pg, elem_id) -> str:
    return pg.locator(f"#{elem_id} input[type=number]").input_value()


def slider_max(pg, elem_id) -> str:
    return pg.locator(f"#{elem_id} input[type=number]").get_attribute("max")


def setup_small(pg, prompt, steps=8):
    set_text(pg, "#txt2img_prompt textarea", prompt)
    set_number(pg, "txt2img_width", 64)
    set_number(pg, "txt2img_height", 64)
    set_number(pg, "txt2img_steps", steps)
    choose(pg, "txt2img_sampling", "DDIM")


def setup_lr(pg, photo, vanilla_title, guess=True):
    enable(pg)
    pg.locator(f"#{SID}reference_image input[type=file]").set_input_files(photo)
    pg.wait_for_selector(f"#{SID}reference_image img")
    choose(pg, f"{SID}vanilla_checkpoint", vanilla_title)
    if guess:
        pg.locator(f"#{SID}guess").click()
        pg.wait_for_function(
            "() => document.querySelector('#%sconcept_token input, #%sconcept_token textarea').value == 'sks'"
            % (SID, SID)
        )


LOG_JS = (
    "() => [...document.querySelectorAll('#html_log_txt2img')].map(e => e.innerText).join('\\n')"
)


def start_generation(pg) -> str:
    """Click Generate; returns the message area's text before, so `finished` sees this run's end
    (the area under the gallery shows "Time taken" when a generation ends, refused or not)."""
    before = pg.evaluate(LOG_JS)
    pg.locator("#txt2img_generate").click()
    return before


def finished(pg, before) -> bool:
    now = pg.evaluate(LOG_JS)
    return now != before and "Time taken" in now


def generate(pg):
    before = start_generation(pg)
    t0 = time.monotonic()
    while not finished(pg, before):
        assert time.monotonic() - t0 < TIMEOUT / 1000, "the generation did not end"
        time.sleep(0.1)


def gallery_count(pg):
    return pg.locator("#txt2img_gallery .thumbnails .thumbnail-item").count()


def info_text(pg):
    return pg.locator("#html_info_txt2img").first.inner_text()


def select_image(pg, index):
    pg.locator("#txt2img_gallery .thumbnails .thumbnail-item").nth(index).click()
    time.sleep(0.5)


def shot(pg, name, selector=None):
    """With LR_SCREENSHOTS=<dir>: save <dir>/<name> (the README's pictures), of `selector` or the page."""
    shots = os.environ.get("LR_SCREENSHOTS")
    if not shots:
        return
    path = os.path.join(shots, name)
    if selector:
        pg.locator(selector).first.scroll_into_view_if_needed()
        pg.locator(selector).first.screenshot(path=path)
    else:
        pg.screenshot(path=path)


# ---------------------------------------------------------------- tests
def test_accordion_with_enable_in_its_header_and_a_tidy_panel(page, webui_ui):
    cb = header_checkbox(page)
    assert cb.count() == 1 and not cb.is_checked(), "no Enable checkbox in the accordion's header"
    cb.click()  # ticking it switches the extension on
    page.wait_for_function(
        "() => document.querySelector('#%senabled-checkbox input').checked" % SID
    )
    page.locator(f"{ACC} .label-wrap").first.click() if not page.locator(
        f"#{SID}concept_token"
    ).is_visible() else None
    # what a first-time user needs is visible; the rest is folded into "Advanced"
    for name in (
        "reference_image",
        "personalization",
        "vanilla_checkpoint",
        "concept_token",
        "class_phrase",
        "lambda1",
        "lambda2",
        "mask_start",
        "guess",
        "vanilla_refresh",
    ):
        assert page.locator(f"#{SID}{name}").is_visible(), f"{name} is not in the basic group"
    adv = page.locator(f"#{SID}advanced")
    assert (
        adv.locator(f"#{SID}sam_model").count() == 1
        and not page.locator(f"#{SID}sam_model").is_visible()
    )
    # single-line text fields
    for name in ("concept_token", "class_phrase"):
        box = page.locator(f"#{SID}{name} textarea, #{SID}{name} input[type=text]").first
        assert box.get_attribute("rows") in (None, "1"), f"{name} is not single-line"
    # the vanilla dropdown: no loaded model, no empty "✓" option
    page.locator(f"#{SID}vanilla_checkpoint input").click()
    options = [
        t.strip() for t in page.locator(f"#{SID}vanilla_checkpoint ul.options li").all_inner_texts()
    ]
    page.keyboard.press("Escape")
    assert options and all(o and o != "✓" for o in options), options
    assert not any(TC.PERSONAL in o for o in options), (
        f"the loaded model is offered as vanilla: {options}"
    )
    assert any(TC.VANILLA in o for o in options), options
    # told from the files' headers: no checkpoint of another architecture (SDXL files, the
    # other-width SD1) is offered while an SD1 model is loaded
    assert not any(TC.WIDE in o or "tiny-xl" in o for o in options), options
    # hover hints on every control, the photo and Guess included (the hints script runs after the
    # UI loads; under load that takes a while, so wait for it rather than a fixed time)
    titles_js = """(sid) => {
        const out = {};
        const photo = document.querySelector('#' + sid + 'reference_image [data-testid=block-label]');
        out.photo = photo ? photo.title : null;
        out.photo_block = document.querySelector('#' + sid + 'reference_image').title;
        out.guess = document.querySelector('#' + sid + 'guess').title;
        out.header = document.querySelector('#' + sid + 'enabled .label-wrap span').title
                     || document.querySelector('#' + sid + 'enabled .label-wrap').title;
        out.token = [...document.querySelectorAll('#' + sid + 'concept_token span')].map(s => s.title).join('');
        return out; }"""
    try:
        page.wait_for_function(
            f"(sid) => Object.values(({titles_js})(sid)).every(Boolean)", arg=SID, timeout=60000
        )
    except Exception:  # noqa: BLE001 - the assertion below names what is missing
        pass
    titles = page.evaluate(titles_js, SID)
    assert all(titles.values()), f"controls without a hover hint: {titles}"
    # the hints speak the user's words, not the paper's symbols
    hints = page.evaluate(
        "() => Object.entries(window.titles || {}).filter(([k]) => k.includes('Layout') || "
        "k.includes('λ') || k.includes('reference') || k.includes('encoder'))"
        ".map(([k, v]) => k + ': ' + v).join('\\n')"
    )
    for jargon in ("I_r", "y_p", "layout-copy", "reference path"):
        assert jargon not in hints, f"a hover hint says {jargon!r}:\n{hints}"
    # img2img's own layout source (the input image) is not offered in txt2img
    sources = page.locator(f"#{SID}layout_source label").all_inner_texts()
    assert sources and not any("input image" in t for t in sources), sources
    shot(page, "ui-accordion.png", ACC)
    page.locator(f"#{SID}advanced .label-wrap").first.click()
    page.locator(f"#{SID}sam_model").wait_for(state="visible")
    shot(page, "ui-advanced.png", f"#{SID}advanced")


def test_generate_with_a_photo_progress_through_stage_2_never_goes_back_and_intermediates_are_labelled(
    page, webui_ui, photo_path
):
    setup_small(page, "a photo of sks dog in the snow", steps=60)
    setup_lr(page, photo_path, webui_ui.title(TC.VANILLA))
    page.locator(f"#{SID}show_intermediates input").check()
    before = start_generation(page)
    texts = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < TIMEOUT / 1000 and not finished(page, before):
        t = page.evaluate(
            "() => { const d = document.querySelector('#txt2img_results .progressDiv .progress');"
            " return d ? d.textContent : null; }"
        )
        if t and (not texts or texts[-1] != t):
            texts.append(t)
        time.sleep(0.05)
    assert finished(page, before), (
        f"no end of the generation within {TIMEOUT // 1000}s; progress seen: {texts}"
    )
    percents = [int(m.group(1)) for m in (re.search(r"(\d+)%", x) for x in texts) if m]
    assert any("stage 2" in x for x in texts), (
        f"the progress text never named stage 2: {sorted(set(texts))}"
    )
    assert percents == sorted(percents), f"the progress went backwards: {texts}"
    assert not any(re.search(r"ETA: \d{2}:\d{2}:\d{2}", x) and "retouch" in x for x in texts), (
        texts
    )  # no hours
    assert gallery_count(page) == 4, "result + layout, mask, attention map expected"
    # the thumbnails say what each intermediate is (the result's has no caption)
    try:  # the page's script captions them on its next UI update
        page.wait_for_function(
            "() => document.querySelectorAll('#txt2img_gallery .layout-retouch-caption').length >= 3",
            timeout=15_000,
        )
    except Exception:  # noqa: BLE001 - the assertion below names what is missing
        pass
    captions = page.evaluate(
        "() => [...document.querySelectorAll('#txt2img_gallery .thumbnails .thumbnail-item')]"
        ".map(t => [(t.querySelector('.layout-retouch-caption') || {}).textContent || '', t.title])"
    )
    assert [c for c, _ in captions] == ["", "layout", "mask", "map"], captions
    assert [t for _, t in captions[1:]] == [
        "stage-1 layout of image 1",
        "blend mask of image 1",
        "subject cross-attention map of image 1",
    ], captions  # the full label on hover
    # at 1280 px a caption fits its thumbnail (it was cut to "stag…")
    page.set_viewport_size({"width": 1280, "height": 800})
    time.sleep(0.5)
    cut = page.evaluate(
        "() => [...document.querySelectorAll('#txt2img_gallery .thumbnails .layout-retouch-caption')]"
        ".filter(c => c.scrollWidth > c.clientWidth + 1 || "
        "c.getBoundingClientRect().height > c.parentElement.getBoundingClientRect().height / 2)"
        ".map(c => c.textContent + ' ' + c.scrollWidth + '>' + c.clientWidth)"
    )
    assert cut == [], f"captions that do not fit their thumbnail at 1280 px: {cut}"
    page.set_viewport_size({"width": 1400, "height": 1000})
    # the blend mask (mostly white here) is shown on a grey matte, the result is not
    matte_js = (
        "() => getComputedStyle(document.querySelector('#txt2img_gallery .preview img'))"
        ".backgroundColor"
    )
    select_image(page, 2)
    page.wait_for_function(f"() => ({matte_js})() === 'rgb(128, 128, 128)'", timeout=10_000)
    select_image(page, 0)
    page.wait_for_function(f"() => ({matte_js})() !== 'rgb(128, 128, 128)'", timeout=10_000)
    assert "LR lambda1" in info_text(page)
    shot(page, "ui-result.png")
    for i, what in (
        (1, "stage-1 layout of image 1"),
        (2, "blend mask of image 1"),
        (3, "subject cross-attention map of image 1"),
    ):
        select_image(page, i)
        text = info_text(page)
        assert f"Layout-and-Retouch intermediate: {what}" in text, text
        assert "LR " not in text, text


def test_an_error_in_the_ui_uses_the_control_label_and_no_traceback(page, webui_ui, photo_path):
    setup_small(page, "a photo of sks dog on a beach")
    setup_lr(page, photo_path, webui_ui.title(TC.VANILLA), guess=False)  # no concept token
    mark = webui_ui.log_mark()
    generate(page)
    page.wait_for_function(
        "() => document.querySelector('#html_log_txt2img').innerText.includes('Concept token')"
    )
    msg = page.locator("#html_log_txt2img").first.inner_text()
    assert "“Concept token” is empty" in msg and "concept_token" not in msg, msg
    assert gallery_count(page) == 0, "a refused generation made an image"
    log = webui_ui.log_since(mark, settle=1.0)
    assert len(H.log_refusal_lines(log)) == 1, log
    assert not any(m in log for m in H.TRACEBACK_MARKERS), (
        f"the refusal printed a traceback:\n{log}"
    )


def _xyz(page, axis, values):
    page.locator("#txt2img_script_container #script_list input").click()
    page.locator(
        "#txt2img_script_container #script_list ul.options li", has_text="X/Y/Z plot"
    ).first.click()
    page.wait_for_selector(f"#{XYZ}x_type", state="visible")
    choose(page, f"{XYZ}x_type", axis)
    page.locator(f"#{XYZ}csv_mode input").check()
    set_text(page, f"#{XYZ}x_values textarea, #{XYZ}x_values input", values)
    page.locator(f"#{XYZ}include_lone_images input").check()


def test_xyz_enable_true_false_the_false_image_has_no_lr_keys(page, webui_ui, photo_path):
    setup_small(page, "a photo of sks dog jumping")
    setup_lr(page, photo_path, webui_ui.title(TC.VANILLA))
    _xyz(page, "[L&R] Enable", "True, False")
    generate(page)
    page.wait_for_function(
        "() => document.querySelectorAll('#txt2img_gallery .thumbnails .thumbnail-item').length >= 3"
    )
    select_image(page, 1)
    assert "LR lambda1" in info_text(page)
    select_image(page, 2)
    text = info_text(page)
    assert "LR " not in text, f"the un-retouched cell carries LR keys: {text}"


def test_a_bad_xyz_value_gives_a_message_and_no_grid(page, webui_ui, photo_path):
    setup_small(page, "a photo of sks dog in a box", steps=10)
    setup_lr(page, photo_path, webui_ui.title(TC.VANILLA))
    _xyz(page, "[L&R] Mask start", "6, 60")
    mark = webui_ui.log_mark()
    generate(page)  # until the area under the gallery says "Time taken" (a refused run ends too)
    text = page.evaluate(LOG_JS)
    assert "Mask start = 60" in text, f"no message naming the bad value under the gallery: {text!r}"
    assert "X/Y/Z values count this generation's 10 steps" in text, text
    assert gallery_count(page) == 0, "a grid was made despite the bad value"
    log = webui_ui.log_since(mark, settle=1.0)
    assert "retouch of" not in log and not any(m in log for m in H.TRACEBACK_MARKERS), log
    # the grid ends as a refusal, not as the X/Y/Z script's own failure
    assert "Unexpected error" not in log and "X/Y/Z plot will create" not in log, log


def test_paste_switches_on_and_asks_for_the_photo_again(page, webui_ui):
    r = H.txt2img(
        webui_ui.url,
        H.lr_body(
            {
                "enabled": True,
                "reference_image": H.png_b64(H.reference_rgb()),
                "vanilla_checkpoint": webui_ui.title(TC.VANILLA),
                "concept_token": "sks",
                "class_phrase": "dog",
                "lambda1": 2,
                "lambda2": 3,
                "mask_start": 6,
                "scale_with_steps": False,
            }
        ),
    )
    lr = H.assert_retouched(r)
    set_text(page, "#txt2img_prompt textarea", r.infotexts[0])
    page.locator("#txt2img_tools #paste").click()
    notice = page.locator(f"#{SID}photo_notice").first
    notice.wait_for(state="visible")
    assert "Upload the reference photo again" in notice.inner_text()
    assert lr["LR reference"] in notice.inner_text(), (notice.inner_text(), lr["LR reference"])
    assert header_checkbox(page).is_checked(), (
        "pasting LR parameters did not switch the extension on"
    )
    assert (
        page.locator(f"#{SID}concept_token input, #{SID}concept_token textarea").first.input_value()
        == "sks"
    )


def test_send_to_txt2img_from_png_info_asks_for_the_photo_again(page, webui_ui, tmp_path):
    r = H.txt2img(
        webui_ui.url,
        H.lr_body(
            {
                "enabled": True,
                "reference_image": H.png_b64(H.reference_rgb()),
                "vanilla_checkpoint": webui_ui.title(TC.VANILLA),
                "concept_token": "sks",
                "class_phrase": "dog",
                "lambda1": 2,
                "lambda2": 3,
                "mask_start": 6,
                "scale_with_steps": False,
            }
        ),
    )
    H.assert_retouched(r)
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", r.infotexts[0])
    png = tmp_path / "result.png"
    Image.fromarray(r.image).save(png, pnginfo=meta)
    page.locator("#tabs button", has_text="PNG Info").first.click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(png))
    page.wait_for_function(
        "() => document.querySelector('#html_info_x_pnginfo, #tab_pnginfo').innerText.includes('LR lambda1')"
    )
    page.locator("#tab_pnginfo button", has_text="Send to txt2img").first.click()
    notice = page.locator(f"#{SID}photo_notice").first
    notice.wait_for(state="visible")
    assert "Upload the reference photo again" in notice.inner_text()
    assert header_checkbox(page).is_checked()


# ---------------------------------------------------------------- img2img
ISID = "script_img2img_layoutandretouch_"


def test_img2img_inpaint_upload_accordion_and_generation(page, webui_ui, photo_path, tmp_path):
    """The accordion in img2img (its own ids), with "More photos" and the "At N steps" line at the
    steps img2img runs; an inpaint-upload generation through the page is retouched and keeps the
    input outside the mask. With LR_SCREENSHOTS=<dir> it saves <dir>/ui-img2img.png (README)."""
    init_path, mask_path = tmp_path / "input.png", tmp_path / "mask.png"
    H.input_rgb().save(init_path)
    H.box_mask(box=(16, 16, 48, 48)).convert("RGBA").save(mask_path)
    page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
    page.locator("#img2img_inpaint_upload_tab").wait_for(state="attached")
    page.locator("#mode_img2img .tab-nav button", has_text="Inpaint upload").first.click()
    page.locator("#img_inpaint_base input[type=file]").set_input_files(str(init_path))
    page.locator("#img_inpaint_mask input[type=file]").set_input_files(str(mask_path))
    page.wait_for_selector("#img_inpaint_mask img")
    set_text(page, "#img2img_prompt textarea", "a photo of sks dog in a garden, img2img browser")
    set_number(page, "img2img_width", 64)
    set_number(page, "img2img_height", 64)
    set_number(page, "img2img_steps", 8)
    set_number(page, "img2img_mask_blur", 0)
    choose(page, "img2img_sampling", "DDIM")
    acc = page.locator(f"#{ISID}enabled")
    assert acc.count() == 1 and page.locator(ACC).count() == 1, (
        "the accordion is not in each tab once"
    )
    if not acc.locator(".input-accordion-checkbox").is_checked():
        acc.locator(".label-wrap").first.click()
    page.wait_for_function(
        "() => document.querySelector('#%senabled-checkbox input').checked" % ISID
    )
    page.locator(f"#{ISID}reference_image input[type=file]").set_input_files(photo_path)
    page.wait_for_selector(f"#{ISID}reference_image img")
    second = tmp_path / "second.png"
    H.reference_rgb().transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second)
    page.locator(f"#{ISID}more_photos input[type=file]").set_input_files([str(second)])
    # listed at once, but the file is uploaded to the server afterwards: its size shows when it is there
    page.wait_for_function(
        "() => /second\\.png[\\s\\S]*\\d+(\\.\\d+)?\\s*[kKM]?B/.test("
        "document.querySelector('#%smore_photos').innerText)" % ISID
    )
    choose(page, f"{ISID}vanilla_checkpoint", webui_ui.title(TC.VANILLA))
    page.locator(f"#{ISID}guess").click()
    page.wait_for_function(
        "() => document.querySelector('#%sconcept_token input, #%sconcept_token textarea').value == 'sks'"
        % (ISID, ISID)
    )
    set_number(page, f"{ISID}lambda1", 5)  # nudge the "At N steps" line
    page.wait_for_function(
        "() => document.querySelector('#%seffective').innerText.includes('img2img runs')" % ISID
    )
    effective = page.locator(f"#{ISID}effective").first.inner_text()
    assert "img2img runs 7 of 8" in effective, effective
    # two step counts: the line says which one λ1 counts (DDIM's own 5), and of which λ2/mask count
    assert "λ1=1 of DDIM's 5 steps" in effective and "of 7" in effective, effective
    shots = os.environ.get("LR_SCREENSHOTS")
    if shots:
        page.locator(f"#{ISID}enabled").scroll_into_view_if_needed()
        page.screenshot(path=os.path.join(shots, "ui-img2img.png"), full_page=True)
    log_js = "() => [...document.querySelectorAll('#html_log_img2img')].map(e => e.innerText).join('\\n')"
    before = page.evaluate(log_js)
    page.locator("#img2img_generate").click()
    t0 = time.monotonic()
    while not (page.evaluate(log_js) != before and "Time taken" in page.evaluate(log_js)):
        assert time.monotonic() - t0 < TIMEOUT / 1000, "the generation did not end"
        time.sleep(0.2)
    info = page.locator("#html_info_img2img").first.inner_text()
    assert "LR lambda1" in info and "img2img ran 7 of 8 steps" in info, (
        info,
        page.evaluate(log_js),
    )
    prints = re.search(r"LR reference: \"?([0-9a-f, ]+)", info)
    assert prints and len(prints.group(1).strip(" ,").split(", ")) == 2, (
        info
    )  # the main photo + "More photos"


# ---------------------------------------------------------------- issue 20
BANNER = "#layout_retouch_message_%s"


def small_page(browser, webui_ui, width=1280, height=800):
    ctx = browser.new_context(viewport={"width": width, "height": height})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT)
    pg.goto(webui_ui.url)
    pg.wait_for_selector("#txt2img_prompt textarea")
    pg.wait_for_function(
        "() => document.querySelector('%s .input-accordion-checkbox') !== null" % ACC
    )
    return ctx, pg


def in_viewport(pg, selector) -> bool:
    return pg.evaluate(
        """(sel) => { const e = document.querySelector(sel); if (!e) return false;
        const r = e.getBoundingClientRect();
        return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight; }""",
        selector,
    )


def test_ddim_steps_line_and_a_visible_refusal_at_1280x800(browser, webui_ui, photo_path):
    """DDIM at 10 steps runs 9: the "At N steps" line says so and flags λ1 = 9; Generate is refused
    with a styled message above the gallery, in view at 1280×800, and no infotext of a non-image.
    With LR_SCREENSHOTS=<dir> it saves <dir>/ui-error.png."""
    ctx, page = small_page(browser, webui_ui)
    try:
        setup_small(page, "a photo of sks dog at dusk", steps=10)
        setup_lr(page, photo_path, webui_ui.title(TC.VANILLA))
        # scaled with steps (the default): 45 for 50 steps is 9 at 10 (λ2 10 → 2, mask 31 → 7)
        set_number(page, f"{SID}lambda1", 45)
        # the line is redrawn once for the steps and once for λ1: wait for the second (λ1 = 9 is
        # beyond DDIM's 9 steps, so the line is the refusal Generate will give)
        page.wait_for_function(
            "() => { const t = document.querySelector('#%seffective').innerText;"
            " return t.includes('DDIM runs 9 steps for 10') && t.includes('between 0 and 8'); }"
            % SID
        )
        line = page.locator(f"#{SID}effective").first.inner_text()
        assert "⚠" in line and "between 0 and 8" in line, line
        mark = webui_ui.log_mark()
        generate(page)
        banner = BANNER % "txt2img"
        page.wait_for_selector(banner, state="visible")
        text = page.locator(banner).inner_text()
        assert "Layout-and-Retouch" in text and "DDIM runs 9 steps for 10" in text, text
        assert "between 0 and 8" in text, text
        assert in_viewport(page, banner), "the refusal is out of sight at 1280×800"
        assert not page.locator("#html_info_txt2img").first.is_visible(), (
            "the infotext of an image that was never made is shown"
        )
        color = page.evaluate(
            "(sel) => getComputedStyle(document.querySelector(sel)).borderTopColor", banner
        )
        assert color.replace(" ", "") == "rgb(221,51,51)", color
        assert gallery_count(page) == 0
        # the WebUI finishes the refused request: its progress bar ("Waiting...") goes away
        page.wait_for_selector("#txt2img_results .progressDiv", state="detached", timeout=20_000)
        shots = os.environ.get("LR_SCREENSHOTS")
        if shots:
            page.screenshot(path=os.path.join(shots, "ui-error.png"))
        log = webui_ui.log_since(mark, settle=1.0)
        assert len(H.log_refusal_lines(log)) == 1, log
        # fixed: the message goes away and the result shows with its infotext
        set_number(page, f"{SID}lambda1", 5)  # → 1
        generate(page)
        page.wait_for_selector(banner, state="detached")
        assert page.locator("#html_info_txt2img").first.is_visible()
        assert "LR steps used" in info_text(page) and "DDIM runs 9 steps for 10" in info_text(page)
    finally:
        ctx.close()


def test_img2img_refusal_is_visible(browser, webui_ui, photo_path, tmp_path):
    ctx, page = small_page(browser, webui_ui)
    try:
        init_path = tmp_path / "input.png"
        H.input_rgb().save(init_path)
        page.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
        page.locator("#img2img_image input[type=file]").set_input_files(str(init_path))
        set_text(page, "#img2img_prompt textarea", "a photo of sks dog, refused in img2img")
        set_number(page, "img2img_width", 64)
        set_number(page, "img2img_height", 64)
        set_number(page, "img2img_steps", 8)
        choose(page, "img2img_sampling", "DDIM")
        acc = page.locator(f"#{ISID}enabled")
        if not acc.locator(".input-accordion-checkbox").is_checked():
            acc.locator(".label-wrap").first.click()
        page.locator(f"#{ISID}reference_image input[type=file]").set_input_files(photo_path)
        page.wait_for_selector(f"#{ISID}reference_image img")
        choose(page, f"{ISID}vanilla_checkpoint", webui_ui.title(TC.VANILLA))
        # no concept token: refused
        before = page.evaluate("() => document.querySelector('#html_log_img2img').innerText")
        page.locator("#img2img_generate").click()
        banner = BANNER % "img2img"
        page.wait_for_selector(banner, state="visible")
        assert "Concept token" in page.locator(banner).inner_text()
        assert in_viewport(page, banner), "the img2img refusal is out of sight"
        assert not page.locator("#html_info_img2img").first.is_visible()
        assert before is not None
    finally:
        ctx.close()


def test_generate_while_more_photos_upload_waits_and_nothing_stays_stuck(
    browser, webui_ui, photo_path, tmp_path
):
    """A slow link (CDP upload throttling): Generate during the "More photos" upload is held back
    with "still uploading — wait until the file sizes show"; once the size shows, Generate works and
    uses both photos."""
    import numpy as np

    big = tmp_path / "big.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big)  # ≈ 1.5 MB
    ctx, page = small_page(browser, webui_ui)
    try:
        setup_small(page, "a photo of sks dog by a lake")
        setup_lr(page, photo_path, webui_ui.title(TC.VANILLA))
        cdp = ctx.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send(
            "Network.emulateNetworkConditions",
            {
                "offline": False,
                "latency": 20,
                "downloadThroughput": -1,
                "uploadThroughput": 100_000,
            },
        )
        page.locator(f"#{SID}more_photos input[type=file]").set_input_files([str(big)])
        page.wait_for_function(
            "() => document.querySelector('#%smore_photos').innerText.includes('big.png')" % SID
        )
        before = page.evaluate(LOG_JS)
        page.locator("#txt2img_generate").click()
        banner = BANNER % "txt2img"
        page.wait_for_selector(banner, state="visible")
        assert (
            "still uploading — wait until the file sizes show" in page.locator(banner).inner_text()
        )
        time.sleep(1.0)
        assert page.evaluate(LOG_JS) == before, "a generation started during the upload"
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
        page.wait_for_function(
            "() => /big\\.png[\\s\\S]*\\d+(\\.\\d+)?\\s*[kKM]?B/.test("
            "document.querySelector('#%smore_photos').innerText)" % SID,
            timeout=120_000,
        )
        generate(page)
        page.wait_for_selector(banner, state="detached")
        info = info_text(page)
        prints = re.search(r"LR reference: \"?([0-9a-f, ]+)", info)
        assert prints and len(prints.group(1).strip(" ,").split(", ")) == 2, info
    finally:
        ctx.close()


# ---------------------------------------------------------------- issue 26
def test_the_vanilla_list_follows_the_loaded_model_and_refresh_never_changes_it(page, webui_ui):
    """SD1 → SDXL at the top of the page: the vanilla list offers the SDXL vanillas by itself, the
    chosen SD1 vanilla is cleared with a notice; 🔄 re-reads the folder and the WebUI still
    generates with the SDXL model (`list_models()` would set `--ckpt`'s SD1 file back)."""
    url = webui_ui.url
    sd1, xl = webui_ui.title(TC.PERSONAL), webui_ui.title(TC.XL_PERSONAL)
    enable(page)
    vanilla_id = f"{SID}vanilla_checkpoint"
    choose(page, vanilla_id, webui_ui.title(TC.VANILLA))
    notice = page.locator(f"#{SID}vanilla_notice").first
    try:
        choose(page, "setting_sd_model_checkpoint", xl)
        notice.wait_for(state="visible", timeout=60_000)
        text = notice.inner_text()
        assert TC.VANILLA in text and "SDXL" in text and "SD1" in text, text
        assert page.locator(f"#{vanilla_id} input").input_value() == "", "the stale choice stays"
        offered = dropdown_options(page, vanilla_id)
        assert any(TC.XL_VANILLA in o for o in offered), offered
        assert not any(o.startswith(TC.VANILLA) or TC.PERSONAL in o for o in offered), offered
        # the model switch itself is the WebUI's: a plain request queues behind the load
        r = H.txt2img(url, H.plain_body("after the switch", steps=2))
        assert H.parse_infotext(r.infotexts[0]).get("Model") == TC.XL_PERSONAL, r.describe()
        # 🔄 after adding files: the list is re-read, the model the WebUI generates with is not
        page.locator(f"#{SID}vanilla_refresh").click()
        time.sleep(3.0)
        chosen = H.get(url, "/sdapi/v1/options")["sd_model_checkpoint"]
        assert chosen.split(" [")[0] == xl.split(" [")[0], f"🔄 changed the checkpoint to {chosen}"
        r = H.txt2img(url, H.plain_body("after the refresh", steps=2))
        assert H.parse_infotext(r.infotexts[0]).get("Model") == TC.XL_PERSONAL, (
            "the generation after 🔄 loaded another model"
        )
        assert any(TC.XL_VANILLA in o for o in dropdown_options(page, vanilla_id))
        # picking a vanilla checkpoint again puts the notice away
        choose(page, vanilla_id, webui_ui.title(TC.XL_VANILLA))
        notice.wait_for(state="hidden", timeout=20_000)
    finally:
        # the page's switch may still be queued: let it happen, then load SD1 for the next tests
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            now = H.get(url, "/sdapi/v1/options")["sd_model_checkpoint"]
            if now.split(" [")[0] == xl.split(" [")[0]:
                break
            time.sleep(0.5)
        H.txt2img(url, H.plain_body("after the switch", steps=2))
        H.set_checkpoint(url, sd1)
        H.txt2img(url, H.plain_body("back to SD1", steps=2))


def test_lambda1_has_one_bound_and_every_problem_is_in_one_message(browser, webui_ui, photo_path):
    """DDIM at 10 steps runs 9: λ1 = 10 (50 scaled) and λ1 = 9 (45 scaled) are refused with the same
    bound, 0…8 — the "At N steps" line says the same — and a request with several problems (no
    concept token, no class phrase, λ1) names them all at once, in the banner, one line each."""
    ctx, page = small_page(browser, webui_ui)
    try:
        setup_small(page, "a photo of sks dog on a roof", steps=10)
        setup_lr(page, photo_path, webui_ui.title(TC.VANILLA), guess=False)
        set_number(page, f"{SID}lambda1", 50)  # 10 at 10 steps
        page.wait_for_function(
            "() => document.querySelector('#%seffective').innerText.includes('⚠')" % SID
        )
        line = page.locator(f"#{SID}effective").first.inner_text()
        assert "between 0 and 8" in line and "between 0 and 9" not in line, line
        generate(page)
        banner = BANNER % "txt2img"
        page.wait_for_selector(banner, state="visible")
        text = page.locator(banner).inner_text()
        assert "3 problems" in text, text
        for words in ("“Concept token” is empty", "“Class phrase” is empty", "λ1 "):
            assert words in text, (words, text)
        assert "is 10 at 10 sampling steps" in text and "between 0 and 8" in text, text
        assert "between 0 and 9" not in text, text
        assert len([ln for ln in text.split("\n") if ln.strip().startswith("•")]) == 3, text
        assert gallery_count(page) == 0
        # the two missing words given, λ1 = 45 → 9: refused with the same bound, alone
        page.locator(f"#{SID}guess").click()
        page.wait_for_function(
            "() => document.querySelector('#%sconcept_token input, #%sconcept_token textarea')"
            ".value == 'sks'" % (SID, SID)
        )
        set_number(page, f"{SID}lambda1", 45)
        generate(page)
        page.wait_for_function(
            "(sel) => document.querySelector(sel) && "
            "document.querySelector(sel).innerText.includes('is 9 at 10')",
            arg=banner,
        )
        text = page.locator(banner).inner_text()
        assert "between 0 and 8" in text and "problems" not in text, text
        # at 1280 px the Guess button is whole and inside the accordion
        box = page.evaluate(
            """(sid) => { const g = document.querySelector('#' + sid + 'guess');
            const a = document.querySelector('#' + sid + 'enabled');
            return {right: g.getBoundingClientRect().right, edge: a.getBoundingClientRect().right,
                    scroll: g.scrollWidth, client: g.clientWidth}; }""",
            SID,
        )
        assert box["right"] <= box["edge"] and box["scroll"] <= box["client"], box
    finally:
        ctx.close()


def test_unticking_scale_with_steps_puts_in_the_values_in_use(browser, webui_ui, photo_path):
    """At 10 DDIM steps the paper's 5 / 10 / 31 run as 1 / 2 / 7: unticking "Scale λ1, λ2 and mask
    start" puts those in, with the ranges at 10 steps (λ1 up to 8: DDIM runs 9), so Generate runs
    them as they were; ticking it again gives back 5 / 10 / 31 and the 50-step ranges."""
    ctx, page = small_page(browser, webui_ui)
    knobs = [f"{SID}lambda1", f"{SID}lambda2", f"{SID}mask_start"]
    try:
        setup_small(page, "a photo of sks dog under a tree", steps=10)
        setup_lr(page, photo_path, webui_ui.title(TC.VANILLA))
        assert [number_value(page, k) for k in knobs] == ["5", "10", "31"]
        page.locator(f"#{SID}scale_with_steps input").uncheck()
        page.wait_for_function(
            "(id) => document.querySelector('#' + id + ' input[type=number]').value === '7'",
            arg=knobs[2],
        )
        assert [number_value(page, k) for k in knobs] == ["1", "2", "7"]
        assert [slider_max(page, k) for k in knobs] == ["8", "10", "11"]
        page.wait_for_function(
            "() => document.querySelector('#%seffective').innerText.includes('of 10')" % SID
        )
        line = page.locator(f"#{SID}effective").first.inner_text()
        assert "⚠" not in line and "λ1=1 of DDIM's 9 steps, λ2=2, mask from step 7 of 10" in line, (
            line
        )
        generate(page)
        info = H.parse_infotext(info_text(page))
        assert (info.get("LR lambda1"), info.get("LR lambda2"), info.get("LR mask start")) == (
            "1",
            "2",
            "7",
        ), info
        assert info.get("LR scale with steps") == "False", info
        page.locator(f"#{SID}scale_with_steps input").check()
        page.wait_for_function(
            "(id) => document.querySelector('#' + id + ' input[type=number]').value === '31'",
            arg=knobs[2],
        )
        assert [number_value(page, k) for k in knobs] == ["5", "10", "31"]
        assert [slider_max(page, k) for k in knobs] == ["50", "50", "51"]
    finally:
        ctx.close()


def test_paste_with_the_same_photo_loaded_does_not_ask_for_it_again(page, webui_ui, photo_path):
    """After a paste (or Send to txt2img) the panel asks for the photo only when the one used is not
    loaded: with the same photo in the panel it says so instead."""
    r = H.txt2img(
        webui_ui.url,
        H.lr_body(
            {
                "enabled": True,
                "reference_image": H.png_b64(H.reference_rgb()),
                "vanilla_checkpoint": webui_ui.title(TC.VANILLA),
                "concept_token": "sks",
                "class_phrase": "dog",
                "lambda1": 2,
                "lambda2": 3,
                "mask_start": 6,
                "scale_with_steps": False,
            }
        ),
    )
    lr = H.assert_retouched(r)
    enable(page)
    page.locator(f"#{SID}reference_image input[type=file]").set_input_files(photo_path)
    page.wait_for_selector(f"#{SID}reference_image img")
    set_text(page, "#txt2img_prompt textarea", r.infotexts[0])
    page.locator("#txt2img_tools #paste").click()
    notice = page.locator(f"#{SID}photo_notice").first
    page.wait_for_function(
        "(id) => { const n = document.querySelector('#' + id);"
        " return n && n.innerText.includes('still loaded'); }",
        arg=f"{SID}photo_notice",
        timeout=30_000,
    )
    text = notice.inner_text()
    assert "Upload" not in text and lr["LR reference"] in text, text
    assert header_checkbox(page).is_checked()


# ---------------------------------------------------------------- several subjects
def box(pg, elem_id):
    """A text control (gradio renders a one-line Textbox as an input or a textarea)."""
    return pg.locator(f"#{elem_id} input, #{elem_id} textarea").first


def subject_photo(tmp_path) -> str:
    """Subject 2's photo: another picture than subject 1's."""
    path = str(tmp_path / "subject2.png")
    Image.fromarray(255 - np.asarray(H.reference_rgb())).save(path)
    return path


def upload_photo(pg, elem_id, path):
    pg.locator(f"#{elem_id} input[type=file]").set_input_files(path)
    pg.wait_for_selector(f"#{elem_id} img")


def pick(pg, elem_id, label):
    """Choose `label` in a radio group."""
    pg.locator(f"#{elem_id} label", has_text=label).first.click()


def wait_text(pg, elem_id, text, timeout=30_000):
    pg.wait_for_function(
        "([id, t]) => { const n = document.querySelector('#' + id);"
        " return !!n && n.offsetParent !== null && n.innerText.includes(t); }",
        arg=[elem_id, text],
        timeout=timeout,
    )


def test_two_subjects_added_guessed_generated_with_their_regions_and_pasted_back(
    browser, webui_ui, photo_path, tmp_path
):
    ctx, page = small_page(browser, webui_ui)  # 1280×800
    try:
        enable(page)
        panel2 = page.locator(f"#{SID}subject2_panel")
        assert not panel2.is_visible(), "subject 2 is shown before Add subject"
        # Guess fills every subject it finds, opening subject 2's panel for the second
        setup_small(page, "a photo of sks dog and zwx cat on a sofa")
        page.locator(f"#{SID}guess").click()
        panel2.wait_for(state="visible")
        page.wait_for_function(
            "(id) => { const b = document.querySelector('#' + id + ' input, #' + id + ' textarea');"
            " return b && b.value === 'zwx'; }",
            arg=f"{SID}subject2_token",
        )
        assert box(page, f"{SID}subject2_class").input_value() == "cat"
        assert box(page, f"{SID}concept_token").input_value() == "sks"
        guessed = page.locator(f"#{SID}guess_message").first.inner_text()
        assert "subject 1 sks dog, subject 2 zwx cat" in guessed, guessed
        assert not page.locator(f"#{SID}subject3_panel").is_visible()
        # ✖ hides it (emptied); Add subject shows it again, then subject 3, then no more
        page.locator(f"#{SID}subject2_remove").click()
        panel2.wait_for(state="hidden")
        page.locator(f"#{SID}add_subject").click()
        panel2.wait_for(state="visible")
        assert box(page, f"{SID}subject2_token").input_value() == ""
        page.locator(f"#{SID}add_subject").click()
        page.locator(f"#{SID}subject3_panel").wait_for(state="visible")
        page.locator(f"#{SID}add_subject").wait_for(state="hidden")
        page.locator(f"#{SID}subject3_remove").click()
        page.locator(f"#{SID}subject3_panel").wait_for(state="hidden")
        # two TI embeddings (TC.EMBEDDING_2 comes with the run path's host tier)
        set_text(
            page,
            "#txt2img_prompt textarea",
            f"a photo of {TC.EMBEDDING} dog and {TC.EMBEDDING_2} cat",
        )
        upload_photo(page, f"{SID}reference_image", photo_path)
        pick(page, f"{SID}personalization", "Textual Inversion embedding")
        set_text(page, f"#{SID}concept_token textarea, #{SID}concept_token input", TC.EMBEDDING)
        set_text(page, f"#{SID}class_phrase textarea, #{SID}class_phrase input", "dog")
        upload_photo(page, f"{SID}subject2_reference_image", subject_photo(tmp_path))
        pick(page, f"{SID}subject2_personalization", "Textual Inversion embedding")
        set_text(page, f"#{SID}subject2_token textarea, #{SID}subject2_token input", TC.EMBEDDING_2)
        set_text(page, f"#{SID}subject2_class textarea, #{SID}subject2_class input", "cat")
        page.locator(f"#{SID}subject2_lora").first.wait_for(state="hidden")  # LoRA's only
        assert page.locator(f"#{SID}subject1_heading").first.is_visible()
        page.locator(f"#{SID}show_intermediates input").check()
        generate(page)
        assert gallery_count(page) == 5, (  # result + layout, mask, map and the subject regions
            gallery_count(page),
            page.evaluate(LOG_JS),
        )
        page.wait_for_function(
            "() => document.querySelectorAll('#txt2img_gallery .layout-retouch-caption').length >= 4",
            timeout=15_000,
        )
        captions = page.evaluate(
            "() => [...document.querySelectorAll('#txt2img_gallery .thumbnails .thumbnail-item')]"
            ".map(t => (t.querySelector('.layout-retouch-caption') || {}).textContent || '')"
        )
        assert captions == ["", "layout", "mask", "map", "regions"], captions
        text = info_text(page)
        for line in (
            "LR subject 2 personalization: textual_inversion",
            "LR subject 2 class phrase: cat",
        ):
            assert line in text, text
        assert "LR subject 2 reference" in text
        select_image(page, 4)
        assert "Layout-and-Retouch intermediate: subject regions of image 1" in info_text(page)
        if os.environ.get("LR_SCREENSHOTS"):  # the README's: the gallery down to subject 2's panel
            top, bottom = page.evaluate(
                "(ids) => { const r = ids.map(i => document.querySelector(i).getBoundingClientRect());"
                " return [Math.min(...r.map(b => b.top)) + scrollY,"
                " Math.max(...r.map(b => b.bottom)) + scrollY]; }",
                ["#txt2img_gallery", f"#{SID}subject2_panel"],
            )
            page.screenshot(
                path=os.path.join(os.environ["LR_SCREENSHOTS"], "ui-subjects.png"),
                full_page=True,
                clip={"x": 0, "y": max(top - 8, 0), "width": 1280, "height": bottom - top + 16},
            )
        # paste: with both photos still loaded, each subject's notice says so
        infotext = json.loads(page.locator("#generation_info_txt2img textarea").input_value())[
            "infotexts"
        ][0]
        set_text(page, "#txt2img_prompt textarea", infotext)
        page.locator("#txt2img_tools #paste").click()
        wait_text(page, f"{SID}photo_notice", "still loaded")
        wait_text(page, f"{SID}subject2_photo_notice", "of subject 2 used is still loaded")
    finally:
        ctx.close()
    # paste into a fresh page: subject 2 comes back with its texts and asks for its photo
    ctx, page = small_page(browser, webui_ui)
    try:
        set_text(page, "#txt2img_prompt textarea", infotext)
        page.locator("#txt2img_tools #paste").click()
        page.locator(f"#{SID}subject2_panel").wait_for(state="visible")
        wait_text(page, f"{SID}subject2_photo_notice", "Upload the reference photo of subject 2")
        assert box(page, f"{SID}subject2_class").input_value() == "cat"
        checked = page.locator(f"#{SID}subject2_personalization label:has(input:checked)").first
        assert checked.inner_text().strip() == "Textual Inversion embedding", checked.inner_text()
        assert not page.locator(f"#{SID}subject3_panel").is_visible()
        assert header_checkbox(page).is_checked()
    finally:
        ctx.close()
