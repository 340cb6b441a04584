"""The WebUI experience through the API: no `LR ` leaks, sweeps that tell the truth, axis
values refused before a grid starts, one-line refusals, one progress bar, labelled intermediates.

As everywhere in this tier: assertions are on what only a working run produces (infotext keys, cells
that differ, log lines), never on HTTP 200 alone."""

from __future__ import annotations

import host_helpers as H
import numpy as np
import pytest
import tiny_checkpoints as TC


def _xyz(webui, lr_args, label, values, dropdown=False, **kw):
    choices = H.xyz_axis_choices(webui.url)
    assert label in choices, [c for c in choices if "L&R" in c]
    body = H.lr_body(lr_args, **kw)
    args = (
        H.xyz_args_dropdown(choices.index(label), values)
        if dropdown
        else H.xyz_args(choices.index(label), ",".join(map(str, values)))
    )
    body.update(script_name="x/y/z plot", script_args=args)
    return H.txt2img(webui.url, body)


def test_xyz_enable_true_false_the_false_cell_carries_no_lr_key(webui, lr, plain_before):
    r = _xyz(webui, lr(), "[L&R] Enable", ["True", "False"], dropdown=True)
    assert r.ok, r.describe()
    assert r.images[0].shape[:2] == (H.SIZE, 2 * H.SIZE), "no 1×2 grid"
    on, off = r.infotexts[1], r.infotexts[2]
    assert H.lr_params(on).get("LR lambda1") == "2", on
    assert H.lr_params(off) == {}, (
        f"the un-retouched cell carries LR keys (pasting it would turn L&R on): {off}"
    )
    assert np.array_equal(r.images[2], plain_before.image), "the False cell is not the plain image"
    assert H.differs(r.images[1], r.images[2])
    # the other way round: the first cell plain, the second its own values only
    r2 = _xyz(webui, lr(), "[L&R] Enable", ["False", "True"], dropdown=True)
    assert H.lr_params(r2.infotexts[1]) == {} and H.lr_params(r2.infotexts[2]) == H.lr_params(on)


def test_xyz_cells_carry_exactly_their_own_values(webui, lr):
    r = _xyz(webui, lr(), "[L&R] CA threshold", [0.05, 0.3])
    assert r.ok, r.describe()
    got = [H.lr_params(t) for t in r.infotexts[1:3]]
    assert [g.get("LR CA threshold") for g in got] == ["0.05", "0.3"], got
    single = H.txt2img(webui.url, H.lr_body(lr(ca_threshold=0.3)))
    assert H.lr_params(r.infotexts[2]) == single.lr, "the cell's LR keys differ from a single run's"


def test_sweep_with_scaling_on_produces_the_values_its_labels_claim(webui, lr):
    """λ1 = 1,2,3 at 10 steps with scaling on: before, every cell became λ1=1 (identical cells)."""
    r = _xyz(
        webui,
        lr(scale_with_steps=True, lambda1=5, lambda2=10, mask_start=31),
        "[L&R] Lambda1",
        [1, 2, 3],
        steps=10,
    )
    assert r.ok, r.describe()
    cells, infos = r.images[1:4], [H.lr_params(t) for t in r.infotexts[1:4]]
    assert [i.get("LR lambda1") for i in infos] == ["1", "2", "3"], infos
    assert [H.ints_in(i["LR steps used"])[1] for i in infos] == [1, 2, 3], (
        infos
    )  # "λ1=1, …" is the effective value
    assert all(i.get("LR scale with steps") == "False" for i in infos), infos
    assert H.differs(cells[0], cells[1]) and H.differs(cells[1], cells[2]), (
        "sweep cells are identical"
    )
    # pasting a cell reproduces it: its infotext's values as a plain request give the same image
    i = infos[1]
    again = H.txt2img(
        webui.url,
        H.lr_body(
            lr(
                lambda1=int(i["LR lambda1"]),
                lambda2=int(i["LR lambda2"]),
                mask_start=int(i["LR mask start"]),
                scale_with_steps=False,
            ),
            steps=10,
        ),
    )
    assert np.array_equal(again.image, cells[1])


@pytest.mark.parametrize(
    "label,values,names",
    [
        ("[L&R] Mask start", [6, 60], ("mask start", "mask_start")),
        ("[L&R] Lambda1", [1, 8], ("lambda1", "λ1")),
        ("[L&R] CA threshold", [0.1, 1.5], ("ca_threshold", "threshold")),
    ],
)
def test_bad_axis_value_is_refused_before_the_grid_starts(webui, lr, label, values, names):
    mark = webui.log_mark()
    r = _xyz(webui, lr(), label, values)
    log = webui.log_since(mark)
    H.assert_error_names(r, *names)
    assert r.status == 422, r.describe()
    assert f"{label} = {values[1]}" in H.error_text(r), H.error_text(r)
    assert "X/Y/Z plot will create" not in log and "retouch of" not in log, (
        f"the grid started:\n{log}"
    )
    assert len(H.log_refusal_lines(log)) == 1, log
    assert not any(m in log for m in H.TRACEBACK_MARKERS), f"a refusal printed a traceback:\n{log}"


def test_enable_axis_without_a_photo_is_refused_before_the_grid(webui, lr):
    r = _xyz(
        webui,
        lr(reference_image=None, enabled=False),
        "[L&R] Enable",
        ["False", "True"],
        dropdown=True,
    )
    H.assert_error_names(r, "reference")
    assert "Enable = True" in H.error_text(r)


def test_a_refusal_is_one_log_line_without_traceback(webui, lr):
    mark = webui.log_mark()
    r = H.txt2img(webui.url, H.lr_body(lr(concept_token="zzz")))
    log = webui.log_since(mark)
    H.assert_error_names(r, "concept")
    assert len(H.log_refusal_lines(log)) == 1, log
    assert not any(m in log for m in H.TRACEBACK_MARKERS), f"a refusal printed a traceback:\n{log}"


def test_lora_mode_without_a_lora_tag_is_refused_before_sampling(webui, lr):
    mark = webui.log_mark()
    r = H.txt2img(webui.url, H.lr_body(lr(personalization="lora")))
    log = webui.log_since(mark)
    H.assert_error_names(r, "personalization")
    assert "<lora:" in H.error_text(r)
    assert "stage 1:" not in log and not any(m in log for m in H.TRACEBACK_MARKERS), log


def test_intermediates_are_labelled_and_carry_no_lr_keys(webui, lr):
    r = H.txt2img(webui.url, H.lr_body(lr(show_intermediates=True)))
    H.assert_retouched(r)
    assert len(r.images) == 4 and len(r.infotexts) == 4, r.describe()
    labels = [H.parse_infotext(t).get("Layout-and-Retouch intermediate") for t in r.infotexts[1:]]
    assert labels == [
        "stage-1 layout of image 1",
        "blend mask of image 1",
        "subject cross-attention map of image 1",
    ], r.infotexts[1:]
    assert all(H.lr_params(t) == {} for t in r.infotexts[1:]), r.infotexts[1:]
    assert H.PROMPT in r.infotexts[1]  # still the generation's prompt and settings


def test_textual_inversion_and_lora_do_not_record_a_vanilla_checkpoint(webui, lr):
    ti = H.txt2img(
        webui.url,
        H.lr_body(
            lr(personalization="textual_inversion", concept_token=TC.EMBEDDING),
            prompt=f"a photo of {TC.EMBEDDING} dog",
        ),
    )
    lr_ti = H.assert_retouched(ti)
    assert (
        lr_ti["LR personalization"] == "textual_inversion" and "LR vanilla checkpoint" not in lr_ti
    ), lr_ti
    lo = H.txt2img(
        webui.url, H.lr_body(lr(personalization="lora"), prompt=H.PROMPT + " <lora:tiny-lora:1>")
    )
    lr_lo = H.assert_retouched(lo)
    assert "LR vanilla checkpoint" not in lr_lo, lr_lo
    db = H.txt2img(webui.url, H.lr_body(lr()))
    assert "LR vanilla checkpoint" in H.assert_retouched(db)


def test_textual_inversion_token_that_is_no_embedding_gets_a_note(webui, lr):
    r = H.txt2img(
        webui.url, H.lr_body(lr(personalization="textual_inversion"))
    )  # token "sks": no embedding
    notes = H.assert_retouched(r).get("LR notes", "")
    assert "no installed Textual-Inversion embedding" in notes and TC.EMBEDDING in notes, notes


def test_vanilla_checkpoint_that_is_the_loaded_model_gets_a_note(webui, lr):
    r = H.txt2img(webui.url, H.lr_body(lr(vanilla_checkpoint=webui.title(TC.PERSONAL))))
    assert "vanilla checkpoint is the loaded model itself" in H.assert_retouched(r).get(
        "LR notes", ""
    ), r.lr


def test_batches_each_image_carries_its_own_values_and_plain_afterwards_none(webui, lr):
    r = H.txt2img(webui.url, H.lr_body(lr(), batch_size=2, n_iter=2))
    assert len(r.infotexts) >= 4
    per_image = [H.lr_params(t) for t in r.infotexts[-4:]]
    assert all(p.get("LR lambda1") == "2" for p in per_image), per_image
    plain = H.txt2img(webui.url, H.plain_body())
    assert plain.lr == {}, plain.infotexts


def test_progress_is_one_bar_through_both_stages(webui, lr):
    steps = 40
    body = H.lr_body(
        lr(lambda1=4, lambda2=8, mask_start=25, reference_image=H.png_b64(H.reference_rgb(48, 48))),
        steps=steps,
    )
    seen = []

    def poll(j):
        st = j.get("state") or {}
        if st.get("job_count"):
            seen.append(
                (
                    j.get("progress") or 0,
                    j.get("textinfo") or "",
                    st.get("sampling_step"),
                    st.get("sampling_steps"),
                )
            )
        return False

    r = H.txt2img_while_polling(webui.url, body, poll)
    H.assert_retouched(r)
    texts = [s[1] for s in seen]
    assert any("stage 2: retouch" in x for x in texts), (
        f"no retouch phase in the progress: {set(texts)}"
    )
    assert any("stage 1" in x for x in texts), set(texts)
    progress = [s[0] for s in seen]
    assert all(b >= a - 1e-9 for a, b in zip(progress, progress[1:])), (
        f"the bar went backwards: {seen}"
    )
    totals = {s[3] for s in seen if "stage" in s[1]}
    assert len(totals) == 1 and totals.pop() > steps, (
        f"the bar's length changed or excludes stage 2: {seen}"
    )


def test_live_previews_show_the_retouch(webui, lr):
    """With the WebUI's live previews on (its default), the preview during stage 2 is the retouch's
    current latent, not the stale stage-1 image."""
    body = H.lr_body(
        lr(lambda1=4, lambda2=8, mask_start=25), steps=40, prompt=H.PROMPT + " preview"
    )
    seen = []

    def poll(j):
        seen.append((j.get("textinfo") or "", j.get("current_image")))
        return False

    r = H.txt2img_while_polling(webui.url, body, poll, interval=0.02, current_image=True)
    H.assert_retouched(r)
    stage1 = [img for info, img in seen if "stage 1" in info and img]
    retouch = [img for info, img in seen if "stage 2: retouch" in info and img]
    assert retouch, f"no preview during the retouch; phases seen: {sorted({i for i, _ in seen})}"
    last_stage1 = stage1[-1] if stage1 else None
    assert any(img != last_stage1 for img in retouch), (
        "the preview stayed on the stage-1 image during the retouch"
    )
