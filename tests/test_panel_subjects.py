"""The WebUI panel's several subjects, host-free: the panels' values → the `subjects` argument the
parameters parse, a pasted infotext → the panels, Guess over several subjects, the messages that
name a subject, and the regions picture among the intermediates."""

import pytest
from PIL import Image

from lib_layout_retouch import panel_subjects as ps
from lib_layout_retouch import ui_text
from lib_layout_retouch.images import image_fingerprint
from lib_layout_retouch.params import MAX_SUBJECTS, LayoutRetouchParams
from lib_layout_retouch.prompts import guess_concept, guess_subjects

RED = Image.new("RGB", (16, 16), (200, 10, 10))
BLUE = Image.new("RGB", (16, 16), (10, 10, 200))
GREEN = Image.new("RGB", (16, 16), (10, 200, 10))
TI = ps.KIND_LABELS["textual_inversion"]
PHOTO = ps.KIND_LABELS["photo"]


def _subject_one(**kw):
    base = dict(
        enabled=True,
        reference_image=RED,
        personalization="textual_inversion",
        concept_token="<dog>",
        class_phrase="dog",
    )
    base.update(kw)
    return base


# ---- the panels → the `subjects` argument -------------------------------------------------------
def test_only_the_shown_panels_are_subjects_and_the_labels_become_api_values():
    rows = [
        ps.SubjectRow([BLUE], TI, " <cat> ", "cat ", ""),
        ps.SubjectRow([GREEN, RED], PHOTO, "", "bird", ""),
    ]
    assert ps.subjects_value(1, rows) == []
    one = ps.subjects_value(2, rows)
    assert one == [
        {
            "reference_image": BLUE,
            "personalization": "textual_inversion",
            "concept_token": "<cat>",
            "class_phrase": "cat",
            "lora": "",
        }
    ]
    two = ps.subjects_value(3, rows)
    assert two[1]["reference_image"] == [GREEN, RED] and two[1]["personalization"] == "photo"
    params = LayoutRetouchParams(**_subject_one(subjects=two))
    assert params.problems() == []
    subjects = params.all_subjects()
    assert [s.concept_token for s in subjects] == ["<dog>", "<cat>", ""]
    assert [s.personalization for s in subjects] == [
        "textual_inversion",
        "textual_inversion",
        "photo",
    ]
    assert [len(s.references) for s in subjects] == [1, 1, 2]


def test_a_shown_panel_without_photo_or_class_is_refused_naming_the_subject():
    value = ps.subjects_value(2, [ps.SubjectRow([], TI, "<cat>", "", "")])
    assert value[0]["reference_image"] is None
    problems = LayoutRetouchParams(**_subject_one(subjects=value)).problems()
    messages = [e.message for e in problems]
    assert len(problems) == 2, messages
    assert all(m.startswith("subject 2: ") for m in messages), messages
    assert {e.parameter for e in problems} == {"subjects"}


def test_the_counter_is_clamped_to_the_subjects_there_are():
    rows = [ps.SubjectRow([BLUE], TI, "<cat>", "cat")] * (MAX_SUBJECTS - 1)
    assert len(ps.subjects_value(99, rows)) == MAX_SUBJECTS - 1
    assert ps.subjects_value(None, rows) == [] and ps.subjects_value("x", rows) == []
    assert ps.shown_count(0) == 1 and ps.shown_count(2.0) == 2


def test_a_lora_subject_keeps_its_lora_name():
    value = ps.subjects_value(2, [ps.SubjectRow([BLUE], "LoRA", "zwx", "cat", " my_cat ")])
    assert value[0]["personalization"] == "lora" and value[0]["lora"] == "my_cat"
    assert LayoutRetouchParams(**_subject_one(subjects=value)).subjects[0].lora == "my_cat"


def test_removing_a_subject_moves_the_ones_after_it_up_and_empties_the_last():
    a, b = ps.SubjectRow([BLUE], TI, "<a>", "cat"), ps.SubjectRow([GREEN], PHOTO, "", "bird")
    assert ps.removed([a, b], 0) == [b, ps.SubjectRow()]
    assert ps.removed([a, b], 1) == [a, ps.SubjectRow()]
    assert ps.SubjectRow().personalization == ps.DEFAULT_KIND == "lora"


def test_an_unknown_kind_reaches_the_parameters_check():
    value = ps.subjects_value(2, [ps.SubjectRow([BLUE], "Magic", "zwx", "cat")])
    with pytest.raises(Exception, match="subject 2"):
        LayoutRetouchParams(**_subject_one(subjects=value))


# ---- paste --------------------------------------------------------------------------------------
def test_a_pasted_infotext_restores_every_subject_but_the_photos():
    subjects = [
        {"reference_image": [BLUE, GREEN], "personalization": "textual_inversion",
         "concept_token": "<cat>", "class_phrase": "cat"},
        {"reference_image": RED, "personalization": "lora", "concept_token": "zwx",
         "class_phrase": "bird", "lora": "my_bird"},
    ]  # fmt: skip
    params = LayoutRetouchParams(**_subject_one(subjects=subjects))
    info = params.to_infotext(20)
    pasted = ps.pasted_subjects(LayoutRetouchParams.from_infotext(info))
    assert [(p.personalization, p.concept_token, p.class_phrase, p.lora) for p in pasted] == [
        (TI, "<cat>", "cat", ""),
        ("LoRA", "zwx", "bird", "my_bird"),
    ]
    assert pasted[0].fingerprints == [image_fingerprint(BLUE), image_fingerprint(GREEN)]
    assert pasted[1].fingerprints == [image_fingerprint(RED)]
    # the shown labels map back to the values a generation used
    rows = [
        ps.SubjectRow([BLUE, GREEN], p.personalization, p.concept_token, p.class_phrase, p.lora)
        for p in pasted
    ]
    again = LayoutRetouchParams(**_subject_one(subjects=ps.subjects_value(3, rows)))
    assert [s.to_dict(images=False) for s in again.subjects] == [
        s.to_dict(images=False) for s in params.subjects
    ]


def test_a_pasted_infotext_of_one_subject_or_none_shows_no_more_panels():
    one = LayoutRetouchParams(**_subject_one()).to_infotext(20)
    assert ps.pasted_subjects(LayoutRetouchParams.from_infotext(one)) == []
    assert ps.pasted_subjects(LayoutRetouchParams.from_infotext({"Steps": "20"})) == []


def test_the_photo_notice_names_the_subject_after_the_first():
    fp = image_fingerprint(BLUE)
    assert "of subject" not in ui_text.photo_notice(fp)
    two = ui_text.photo_notice(fp, subject=2)
    assert "Upload the reference photo of subject 2 again" in two and fp in two
    several = ui_text.photo_notice(f"{fp}, {image_fingerprint(RED)}", subject=3)
    assert "Upload the 2 reference photos of subject 3 again" in several
    assert "The reference photo of subject 2 used is still loaded" in ui_text.photos_still_loaded(
        [fp], subject=2
    )
    assert ui_text.photos_still_loaded([fp]).startswith("✓ The reference photo used is still")


# ---- Guess --------------------------------------------------------------------------------------
PROMPTS = [
    "a photo of sks dog and zwx cat on a sofa <lora:my_dog:1> <lora:my_cat:0.8>",
    "<cat> and <dog> on a sofa with sks",
    "ohwx man next to <lora:style:1>",
    "x <lora:a:1> <lora:b:0.5>",
    "a sks on the beach",
    "nothing here",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_guess_finds_subject_1_as_the_one_subject_guess_does(prompt):
    found = guess_subjects(prompt, ["<dog>", "<cat>"])
    one = guess_concept(prompt, ["<dog>", "<cat>"])
    assert (found[0] if found else None) == one


def test_guess_finds_every_subject_of_the_prompt():
    assert guess_subjects(PROMPTS[0]) == [("sks", "dog"), ("zwx", "cat")]
    # embeddings first (in prompt order), then rare tokens; each token once; at most `limit`
    assert guess_subjects("<cat> and <dog> with sks dog, sks", ["<dog>", "<cat>"]) == [
        ("<cat>", ""),
        ("<dog>", ""),
        ("sks", "dog"),
    ]
    assert len(guess_subjects("sks dog, zwx cat, ohwx bird, <a>", ["<a>"], limit=3)) == 3
    assert guess_subjects("x <lora:a:1> <lora:b:0.5> <lora:a:1>") == [("a", ""), ("b", "")]
    assert guess_subjects("a <lora:sks:1> cat") == [("sks", "")]  # a tag's text is no token
    assert guess_subjects("") == []


def test_guess_message_for_several_subjects():
    text = ui_text.guess_message("p", [("sks", "dog"), ("<cat>", "")])
    assert text.startswith("Guess: subject 1 `sks` dog, subject 2 `<cat>`.")
    assert "No class phrase found after `<cat>`" in text
    assert ui_text.guess_message("p", [("sks", "dog")]) == ui_text.guess_message(
        "p", ("sks", "dog")
    )
    assert ui_text.guess_message("p", []).startswith("⚠ Guess found no concept token")
    assert ps.guessed_count(1, [1, 2]) == 2 and ps.guessed_count(3, [1]) == 3
    assert ps.guessed_count(1, [1, 2, 3, 4]) == MAX_SUBJECTS


# ---- the regions picture's caption -----------------------------------------------------------------
def test_the_regions_picture_is_named_and_captioned():
    assert ui_text.intermediate_label("regions", 1) == "subject regions of image 2"
    assert ui_text.page_texts()["intermediateShort"]["subject regions"] == "regions"


def test_the_panel_pastes_every_key_a_generation_writes_for_its_subjects():
    subjects = [
        {"reference_image": BLUE, "personalization": "lora", "concept_token": "zwx",
         "class_phrase": "cat", "lora": "my_cat"},
        {"reference_image": GREEN, "personalization": "photo", "class_phrase": "bird"},
    ]  # fmt: skip
    info = LayoutRetouchParams(**_subject_one(subjects=subjects)).to_infotext(20)
    written = {k for k in info if k.startswith("LR subject")}
    assert len(written) == 5 + 3 and written <= set(ps.paste_keys())
