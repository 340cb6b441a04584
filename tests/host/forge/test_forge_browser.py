"""The Forge browser check: the extension's UI in Forge's real page (gradio 4.40; A1111 has
3.41), in headless Chromium (Debian's package) driven by Playwright, as tests/host/test_host_browser.py
does for A1111.

The accordion with Enable in its header, ticking it switches the extension on, the reference photo
accepts an upload, the hover hints are set (photo, Guess, concept token, header), the img2img tab has
its own accordion, and our script raises no page error; then one generation from the page with the
extension on, whose infotext under the gallery has `LR ` keys.

Uses the tier's one Forge (conftest `webui`), which is started WITH its UI when this module is
selected. Skipped with the reason when Playwright or Chromium is missing, or when an attached Forge
(LR_FORGE_URL) serves no UI (started with --nowebui).
"""

from __future__ import annotations

import os
import re
import time

import forge_checkpoints as FC
import forge_tiny_checkpoints as FFC
import host_helpers as H
import host_server as S
import numpy as np
import pytest
import requests

SID = "script_layoutandretouch_"  # txt2img: script_layoutandretouch_<name>
ISID = "script_img2img_layoutandretouch_"  # img2img
ACC = f"#{SID}enabled"
TIMEOUT = 90_000  # ms; a loaded 2-core machine is slow, Forge's gradio 4 page is heavy
GEN_TIMEOUT = 600  # s; one enabled Forge generation takes ~40-60 s here, more under load
# What our code is called in the page: a console message or page error naming one of these is ours.
OURS = re.compile(r"layout[_-]?retouch|layoutandretouch|Layout-and-Retouch", re.I)


@pytest.fixture(scope="module")
def forge_ui(request):
    """The tier's Forge, checked to serve its UI. Asks for `plain_before` first, so the session's
    plain baseline is taken before any generation from the page."""
    why = S.browser_missing()
    if why:
        pytest.skip(why)
    w = request.getfixturevalue("webui")
    request.getfixturevalue("plain_before")
    try:
        r = requests.get(w.url + "/", timeout=60)
        has_ui = r.status_code == 200 and "<html" in r.text.lower()
    except requests.RequestException:
        has_ui = False
    if not has_ui:
        pytest.skip(
            f"this Forge ({w.url}) serves no UI: started with --nowebui? "
            "(LR_FORGE_URL must point to a Forge started without it)"
        )
    return w


@pytest.fixture(scope="module")
def browser(forge_ui):
    yield from S.chromium()


class Page:
    """A page plus what the browser reported while it was open."""

    def __init__(self, pg):
        self.pg = pg
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        pg.on(
            "pageerror",
            lambda e: self.page_errors.append(f"{e.name}: {e.message}\n{e.stack or ''}"),
        )
        pg.on(
            "console",
            lambda m: (
                self.console_errors.append(f"{m.text} @ {m.location.get('url', '')}")
                if m.type == "error"
                else None
            ),
        )

    def ours(self) -> list[str]:
        return [e for e in self.page_errors + self.console_errors if OURS.search(e)]


@pytest.fixture
def page(browser, forge_ui):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT)
    p = Page(pg)
    pg.goto(forge_ui.url)
    pg.wait_for_selector("#txt2img_prompt textarea")
    # Forge's inputAccordion.js puts the visible checkbox into the header on onUiLoaded
    pg.wait_for_function(
        "(a) => document.querySelector(a + ' .input-accordion-checkbox') !== null", arg=ACC
    )
    yield p
    others = [e for e in p.page_errors + p.console_errors if e not in p.ours()]
    if others:  # Forge's own: listed (pytest -rA / -s), not failed on
        print(
            "\n[forge-browser] page/console errors not from this extension:\n  "
            + "\n  ".join(others)
        )
    ctx.close()


# ---------------------------------------------------------------- page helpers
def header_checkbox(pg, acc=ACC):
    return pg.locator(f"{acc} .input-accordion-checkbox")


def hidden_checked(pg, sid=SID) -> bool:
    """The hidden gradio checkbox the script reads (InputAccordion's `<id>-checkbox`)."""
    return pg.evaluate(
        "(s) => { const c = document.querySelector('#' + s + 'enabled-checkbox input');"
        " return c ? c.checked : null; }",
        sid,
    )


def wait_enabled(pg, sid=SID):
    pg.wait_for_function(
        "(s) => { const c = document.querySelector('#' + s + 'enabled-checkbox input');"
        " return c && c.checked; }",
        arg=sid,
    )


def set_number(pg, elem_id, value):
    """Type into a slider's number box; again if something (Forge's UI preset, applied on page load)
    set it back meanwhile."""
    box = pg.locator(f"#{elem_id} input[type=number]")
    for _ in range(5):
        box.fill(str(value))
        box.press("Enter")
        time.sleep(0.5)
        if box.input_value() == str(value):
            return
    assert box.input_value() == str(value), f"{elem_id} does not keep {value}"


def set_text(pg, selector, value):
    box = pg.locator(selector).first
    box.fill(value)
    box.press("Tab")


def choose(pg, elem_id, value, contains=False):
    """Pick an option of a gradio 4 dropdown (an <input> that opens a ul.options list of
    li[aria-label]; gradio 3 had no such attribute): the one equal to `value`, or containing it
    with contains=True."""
    pg.locator(f"#{elem_id} input").first.click()
    op = "*=" if contains else "="
    pg.locator(f'#{elem_id} ul.options li[aria-label{op}"{value}"]').first.click()
    pg.wait_for_function(
        "([id, v]) => document.querySelector('#' + id + ' input').value.includes(v)",
        arg=[elem_id, value],
    )


TITLES_JS = """(sid) => {
    const q = (s) => document.querySelector(s);
    const out = {};
    const photo = q('#' + sid + 'reference_image [data-testid=block-label]');
    out.photo = photo ? photo.title : null;
    out.photo_block = (q('#' + sid + 'reference_image') || {}).title || null;
    out.guess = (q('#' + sid + 'guess') || {}).title || null;
    const head = q('#' + sid + 'enabled .label-wrap span');
    out.header = (head && head.title) || (q('#' + sid + 'enabled .label-wrap') || {}).title || null;
    out.token = [...document.querySelectorAll('#' + sid + 'concept_token span')].map(s => s.title).join('') || null;
    return out; }"""


def wait_titles(pg, sid):
    try:
        pg.wait_for_function(
            f"(sid) => Object.values(({TITLES_JS})(sid)).every(Boolean)", arg=sid, timeout=90_000
        )
    except Exception:  # noqa: BLE001 - the caller's assertion names what is missing
        pass
    return pg.evaluate(TITLES_JS, sid)


# ---------------------------------------------------------------- tests
def test_forge_accordion_enable_upload_and_hints_in_txt2img(page, forge_ui, photo_path):
    pg = page.pg
    assert pg.locator(ACC).count() == 1, "no Layout-and-Retouch accordion in txt2img"
    cb = header_checkbox(pg)
    assert cb.count() == 1, "no Enable checkbox in the accordion's header"
    assert not cb.is_checked() and hidden_checked(pg) is False, "the extension starts switched on"
    cb.click()  # ticking it switches the extension on (it does not open the accordion)
    wait_enabled(pg)
    pg.locator(f"{ACC} .label-wrap").first.click()  # open it: the checkbox stays ticked
    pg.locator(f"#{SID}concept_token").wait_for(state="visible")
    assert cb.is_checked() and hidden_checked(pg), (
        "opening the accordion after ticking switched it off"
    )
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
    ):
        assert pg.locator(f"#{SID}{name}").is_visible(), (
            f"{name} is not shown in the opened accordion"
        )
    # the reference photo takes an upload
    pg.locator(f"#{SID}reference_image input[type=file]").set_input_files(photo_path)
    pg.wait_for_selector(f"#{SID}reference_image img")
    # hover hints, set by javascript/layout_retouch.js (onUiLoaded + Forge's hints.js `titles`)
    titles = wait_titles(pg, SID)
    assert all(titles.values()), f"controls without a hover hint: {titles}"
    assert not page.ours(), "errors from this extension in the page:\n" + "\n".join(page.ours())


def test_forge_opening_the_accordion_enables_it(page):
    pg = page.pg
    assert not header_checkbox(pg).is_checked()
    pg.locator(f"{ACC} .label-wrap").first.click()  # opening it switches it on (WebUI convention)
    wait_enabled(pg)
    assert header_checkbox(pg).is_checked()
    pg.locator(f"{ACC} .label-wrap").first.click()  # closing switches it off again
    pg.wait_for_function(
        "(s) => !document.querySelector('#' + s + 'enabled-checkbox input').checked", arg=SID
    )
    assert not page.ours(), "\n".join(page.ours())


def test_forge_img2img_tab_has_its_own_accordion(page, photo_path):
    pg = page.pg
    pg.locator("#tabs > .tab-nav button", has_text="img2img").first.click()
    iacc = f"#{ISID}enabled"
    pg.locator(iacc).wait_for(state="visible")
    assert pg.locator(iacc).count() == 1 and pg.locator(ACC).count() == 1, (
        "the accordion is not in each tab once"
    )
    cb = header_checkbox(pg, iacc)
    assert cb.count() == 1 and not cb.is_checked()
    cb.click()
    wait_enabled(pg, ISID)
    pg.locator(f"{iacc} .label-wrap").first.click()
    pg.locator(f"#{ISID}concept_token").wait_for(state="visible")
    assert hidden_checked(pg, SID) is False, "ticking img2img's accordion switched txt2img's on"
    pg.locator(f"#{ISID}reference_image input[type=file]").set_input_files(photo_path)
    pg.wait_for_selector(f"#{ISID}reference_image img")
    titles = wait_titles(pg, ISID)
    assert all(titles.values()), f"img2img controls without a hover hint: {titles}"
    assert not page.ours(), "\n".join(page.ours())


LOG_JS = (
    "() => [...document.querySelectorAll('#html_log_txt2img')].map(e => e.innerText).join('\\n')"
)


def select_checkpoint(pg, forge_ui, stem: str, timeout: float = 60) -> None:
    """Pick `stem` in Forge's Checkpoint dropdown (the page's own control; an options POST from
    outside is undone by the open page's dropdown) and wait until the server's options say so."""
    pg.locator(".model_selection input").first.click()
    pg.locator(f'.model_selection ul.options li[aria-label*="{stem}"]').first.click()
    t0 = time.monotonic()
    while True:
        got = H.get(forge_ui.url, "/sdapi/v1/options")["sd_model_checkpoint"]
        if got.startswith(stem):
            return
        assert time.monotonic() - t0 < timeout, f"the checkpoint is still {got!r}, not {stem}"
        time.sleep(0.5)


def generate(pg, forge_ui) -> tuple[str, str]:
    """Click Generate, wait for "Time taken" under the gallery; (the infotext there, Forge's log
    since the click)."""
    before = pg.evaluate(LOG_JS)
    mark = forge_ui.log_mark()
    pg.locator("#txt2img_generate").click()
    t0 = time.monotonic()
    while True:
        now = pg.evaluate(LOG_JS)
        if now != before and "Time taken" in now:
            break
        assert time.monotonic() - t0 < GEN_TIMEOUT, (
            f"the generation did not end in {GEN_TIMEOUT}s: {now!r}"
        )
        time.sleep(0.5)
    return pg.locator("#html_info_txt2img").first.inner_text(), forge_ui.log_since(mark, settle=1.0)


def test_forge_generation_from_the_page_has_lr_keys(page, forge_ui, photo_path):
    """64×64, DDIM, 8 steps, forge-vanilla as vanilla, Guess → token/class; Generate; the infotext
    under the gallery has the `LR ` keys (λ1 etc. the UI's defaults, scaled to 8 steps)."""
    pg = page.pg
    set_text(pg, "#txt2img_prompt textarea", "a photo of sks dog in the snow, forge browser")
    set_number(pg, "txt2img_width", 64)
    set_number(pg, "txt2img_height", 64)
    set_number(pg, "txt2img_steps", 8)
    choose(pg, "txt2img_sampling", "DDIM")
    pg.locator(f"{ACC} .label-wrap").first.click()  # opening switches it on
    wait_enabled(pg)
    pg.locator(f"#{SID}reference_image input[type=file]").set_input_files(photo_path)
    pg.wait_for_selector(f"#{SID}reference_image img")
    choose(pg, f"{SID}vanilla_checkpoint", FC.VANILLA, contains=True)
    pg.locator(f"#{SID}guess").click()
    pg.wait_for_function(
        "(s) => { const b = document.querySelector('#' + s + 'concept_token input, #' + s +"
        " 'concept_token textarea'); return b && b.value == 'sks'; }",
        arg=SID,
    )
    info, log = generate(pg, forge_ui)
    assert "LR lambda1" in info and "LR vanilla checkpoint" in info, (
        f"no LR keys in the infotext under the gallery:\n{info}\nmessage: {pg.evaluate(LOG_JS)!r}\nlog:\n{log[-3000:]}"
    )
    assert "Sampler: DDIM" in info and "Size: 64x64" in info, info
    assert "[Layout-and-Retouch] retouch of 1 image(s)" in log, log[-3000:]
    assert pg.locator("#txt2img_gallery img").count() >= 1, "no image in the gallery"
    assert not page.ours(), "\n".join(page.ours())


def test_forge_flux_run_from_the_page(page, forge_ui, photo_path, plain_before):
    """Flux.1 from the page: the tier's tiny `flux-personal` loaded, its LoRA in the prompt,
    personalization LoRA, Euler / Simple, CFG 1; Generate; the infotext under the gallery has the
    `LR ` keys, `Model: flux-personal` and the distilled CFG. With LR_SCREENSHOTS=<dir> it saves
    <dir>/forge-flux.png (the README's). `forge-personal` is loaded again afterwards."""
    pg = page.pg
    select_checkpoint(pg, forge_ui, FFC.PERSONAL)  # as a user does: Forge's Checkpoint dropdown
    try:
        set_text(
            pg, "#txt2img_prompt textarea", f"a photo of sks dog on a beach <lora:{FFC.LORA}:1>"
        )
        set_number(pg, "txt2img_width", 64)
        set_number(pg, "txt2img_height", 64)
        set_number(pg, "txt2img_steps", 8)
        set_number(pg, "txt2img_cfg_scale", 1)
        choose(pg, "txt2img_sampling", "Euler")
        choose(pg, "txt2img_scheduler", "Simple")
        pg.locator(f"{ACC} .label-wrap").first.click()  # opening switches it on
        wait_enabled(pg)
        pg.locator(f"#{SID}reference_image input[type=file]").set_input_files(photo_path)
        pg.wait_for_selector(f"#{SID}reference_image img")
        pg.locator(f"#{SID}personalization label").filter(has_text="LoRA").first.click()
        pg.locator(f"#{SID}guess").click()
        pg.wait_for_function(
            "(s) => { const b = document.querySelector('#' + s + 'concept_token input, #' + s +"
            " 'concept_token textarea'); return b && b.value == 'sks'; }",
            arg=SID,
        )
        info, log = generate(pg, forge_ui)
        assert "LR lambda1" in info and "LR personalization: lora" in info, (
            f"no LR keys in the infotext under the gallery:\n{info}\nlog:\n{log[-3000:]}"
        )
        assert f"Model: {FFC.PERSONAL}" in info and "Distilled CFG Scale" in info, info
        assert "[Layout-and-Retouch] retouch of 1 image(s)" in log, log[-3000:]
        assert pg.locator("#txt2img_gallery img").count() >= 1, "no image in the gallery"
        assert not page.ours(), "\n".join(page.ours())
        shots = os.environ.get("LR_SCREENSHOTS")
        if shots:
            pg.screenshot(path=os.path.join(shots, "forge-flux.png"), full_page=True)
    finally:
        select_checkpoint(pg, forge_ui, FC.PERSONAL)
        # Forge loads a chosen checkpoint at the next generation: make one, so SD1.5 is really back
        # (and unchanged) for the tests after this one
        back = H.txt2img(forge_ui.url, H.plain_body())
        assert np.array_equal(back.image, plain_before.image), (
            "after the Flux run from the page, the SD1.5 plain image differs from the baseline"
        )
