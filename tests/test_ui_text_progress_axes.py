"""Library side of the WebUI experience: truthful sweeps, axis values checked before a
grid starts, UI messages in control labels, the panel's grouping, one progress bar."""

import pytest
from PIL import Image

from lib_layout_retouch import axes, ui_text
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import FIELD_BY_NAME, FIELDS, LayoutRetouchParams
from lib_layout_retouch.progress import PHASES, ProgressPlan


def _ready(**kw):
    base = dict(
        enabled=True,
        reference_image=Image.new("RGB", (16, 16), (200, 10, 10)),
        vanilla_checkpoint="v1-5.safetensors",
        concept_token="sks",
        class_phrase="dog",
    )
    base.update(kw)
    return LayoutRetouchParams(**base)


# ---- sweeps that tell the truth ----------------------------------------------------------------
def test_swept_lambda1_runs_the_value_its_label_claims_at_the_step_count():
    base = _ready()  # scale_with_steps on, paper values 5/10/31 for 50 steps
    cells = [axes.apply_overrides(base, {"lambda1": v}, steps=10) for v in (1, 2, 3)]
    assert [c.schedule(10).lambda1 for c in cells] == [1, 2, 3]  # not all 1 (scaled 1,2,3 → 0/0/1)
    for c in cells:  # the knobs not swept keep their effective values; the record is literal
        assert not c.scale_with_steps
        assert (c.lambda2, c.mask_start) == (
            base.schedule(10).lambda2,
            base.schedule(10).mask_start,
        )
        info = c.to_infotext(10)
        assert info["LR scale with steps"] == "False" and info["LR lambda1"] == str(c.lambda1)
    assert len({c.to_infotext(10)["LR steps used"] for c in cells}) == 3


def test_overrides_without_steps_or_of_other_fields_keep_scaling():
    base = _ready()
    assert axes.apply_overrides(base, {"lambda1": 3}).scale_with_steps
    assert axes.apply_overrides(base, {"ca_threshold": 0.2}, steps=10).scale_with_steps
    literal = _ready(scale_with_steps=False, lambda2=4, mask_start=7)
    c = axes.apply_overrides(literal, {"lambda1": 2}, steps=10)
    assert (c.lambda1, c.lambda2, c.mask_start) == (2, 4, 7)


def test_check_axis_values_refuses_a_bad_value_before_the_grid_with_the_axis_and_value():
    base = _ready()
    assert len(axes.check_axis_values(base, "mask_start", [6, 8], steps=10)) == 2
    with pytest.raises(LayoutRetouchError) as e:
        axes.check_axis_values(base, "mask_start", [6, 60], steps=10)
    msg = str(e.value)
    assert "[L&R] Mask start = 60" in msg and "between" in msg and "no image was generated" in msg
    assert e.value.parameter == "mask_start"
    with pytest.raises(LayoutRetouchError, match="Lambda1 = 10"):
        axes.check_axis_values(base, "lambda1", [1, 10], steps=10)


def test_check_axis_values_enable_true_needs_a_complete_setup_false_does_not():
    incomplete = LayoutRetouchParams()  # no photo, token, class, vanilla checkpoint
    axes.check_axis_values(incomplete, "enabled", ["False"], steps=10)
    with pytest.raises(LayoutRetouchError) as e:
        axes.check_axis_values(incomplete, "enabled", ["False", "True"], steps=10)
    msg = str(e.value)  # every missing piece at once, not one per try
    assert "Enable = True: 4 problems: (1) no reference_image" in msg, msg
    for name in ("concept_token", "class_phrase", "vanilla_checkpoint"):
        assert f"{name} is empty" in msg, msg


def test_an_unswept_knob_out_of_range_is_said_once_by_the_cells_check():
    """The knobs an axis does not sweep keep their effective values unchecked
    (`apply_overrides`); the cell's check names the problem, with the host's bound when given."""
    base = _ready(lambda1=50)  # 10 at 10 steps: out of range for λ1
    cell = axes.apply_overrides(base, {"lambda2": 2}, steps=10)
    assert (cell.lambda1, cell.lambda2, cell.mask_start, cell.scale_with_steps) == (10, 2, 7, False)
    with pytest.raises(LayoutRetouchError) as e:
        axes.check_axis_values(base, "lambda2", [2], steps=10)
    assert "λ1 (the number of first steps drawn by the vanilla model) is 10" in str(e.value)
    assert "between 0 and 9" in str(e.value) and e.value.parameter == "lambda1"


def test_check_axis_values_runs_the_host_check_for_enabled_cells_only():
    seen = []

    def host(params):
        seen.append(params.vanilla_checkpoint)
        if params.vanilla_checkpoint == "nope":
            raise LayoutRetouchError(
                "vanilla checkpoint 'nope' is not in the list", parameter="vanilla_checkpoint"
            )

    with pytest.raises(LayoutRetouchError, match="Vanilla checkpoint = nope"):
        axes.check_axis_values(
            _ready(), "vanilla_checkpoint", ["a", "nope"], steps=10, host_check=host
        )
    assert seen == ["a", "nope"]
    seen.clear()
    axes.check_axis_values(_ready(enabled=False), "lambda1", [1], steps=10, host_check=host)
    assert seen == []


# ---- UI text -------------------------------------------------------------------------------------
def test_ui_messages_use_control_labels_api_names_stay_in_the_api_message():
    with pytest.raises(LayoutRetouchError) as e:
        _ready(vanilla_checkpoint="").validate()
    api = str(e.value)
    assert "vanilla_checkpoint" in api
    ui = ui_text.for_ui(api)
    assert "vanilla_checkpoint" not in ui and "“Vanilla checkpoint”" in ui
    assert "“DreamBooth checkpoint”" in ui  # 'dreambooth' → its radio label
    assert ui_text.for_ui("concept_token is empty") == "“Concept token” is empty"
    assert (
        ui_text.for_ui("LR concept token: sks") == "LR concept token: sks"
    )  # no name inside words
    assert (
        ui_text.refusal("concept_token is empty")
        == "⚠ Layout-and-Retouch: “Concept token” is empty"
    )


def test_a_refusal_with_several_problems_is_one_marked_line_and_one_item_line_each():
    with pytest.raises(LayoutRetouchError) as e:
        _ready(concept_token="", ca_threshold=2.0).validate()
    lines = ui_text.refusal(e.value).split("\n")
    texts = ui_text.page_texts()
    assert lines[0].startswith(texts["refusalMark"]) and "2 problems" in lines[0], lines
    assert [line.split(" ")[0] for line in lines[1:]] == [texts["refusalItem"]] * 2, lines
    assert "“Cross-attention mask threshold”" in lines[1] and "“Concept token”" in lines[2], lines
    # one problem: one line, as before
    assert ui_text.refusal(LayoutRetouchError("x is bad")) == "⚠ Layout-and-Retouch: x is bad"


def test_every_field_is_in_exactly_one_group_and_the_basic_group_is_the_first_time_needs():
    basic = [f.name for f in ui_text.basic_fields()]
    advanced = [f.name for f in ui_text.advanced_fields()]
    assert sorted(basic + advanced) == sorted(f.name for f in FIELDS)
    for need in (
        "enabled",
        "reference_image",
        "personalization",
        "vanilla_checkpoint",
        "concept_token",
        "class_phrase",
        "lambda1",
        "lambda2",
        "mask_start",
    ):
        assert need in basic
    for fold in (
        "sam_model",
        "ca_threshold",
        "layout_source",
        "reset_reference",
        "reference_prompt",
    ):
        assert fold in advanced


def test_guess_message_says_what_it_could_not_find():
    assert "empty" in ui_text.guess_message("", None)
    msg = ui_text.guess_message("a dog on a beach", None, ["<cat-toy>"])
    assert "no concept token" in msg and "<cat-toy>" in msg and "type" in msg
    assert "no class phrase" in ui_text.guess_message("a <cat-toy>", ("<cat-toy>", ""))
    assert "`sks`" in ui_text.guess_message("a sks dog", ("sks", "dog"))
    # Markdown would read a bare <lora:…> as an HTML tag and drop it: it is in a code span
    assert "`<lora:…>`" in ui_text.guess_message("a dog", None)


def test_photo_notice_shows_the_fingerprint():
    assert "abc123" in ui_text.photo_notice(
        "abc123"
    ) and "Upload the reference photo again" in ui_text.photo_notice(None)
    several = ui_text.photo_notice("0123456789abcdef, fedcba9876543210")
    assert "Upload the 2 reference photos again" in several and "`fedcba9876543210`" in several


def test_intermediate_labels():
    assert ui_text.intermediate_label("layout", 0) == "stage-1 layout of image 1"
    assert (
        ui_text.intermediate_label("attention map", 1) == "subject cross-attention map of image 2"
    )
    assert not ui_text.INTERMEDIATE_KEY.startswith("LR ")


def test_generated_hints_cover_the_photo_guess_and_accordion_header():
    import os
    import sys

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    )
    import gen_hints

    js = gen_hints.render()
    for text in (
        FIELD_BY_NAME["reference_image"].label,
        ui_text.GUESS_LABEL,
        ui_text.ACCORDION_LABEL,
        ui_text.ADVANCED_LABEL,
    ):
        assert f'"{text}":' in js
    assert "label-wrap" in js  # block labels and accordion headers get their title


# ---- one progress bar ----------------------------------------------------------------------------
def test_progress_plan_is_one_monotonic_bar_over_both_stages():
    plan = ProgressPlan(steps=20, batch=2)
    positions = [float(s) for s in range(21)]  # stage 1: the sampler's steps
    for phase in PHASES:
        positions += [plan.position(phase, s, 20) for s in range(21)]
    assert positions == sorted(positions)
    assert positions[-1] == pytest.approx(plan.total)
    # rows as work: one retouch step (2·(1+2B) = 10 rows) weighs 2.5 stage-1 steps (2B = 4 rows)
    assert plan.units["retouch"] == pytest.approx(20 * 10 / 4)


def test_progress_plan_without_reference_or_layout_inversion():
    plan = ProgressPlan(steps=10, batch=1, reference_cached=True, invert_layout=False)
    assert plan.units["reference inversion"] == 0 and plan.units["layout inversion"] == 0
    assert plan.position("retouch", 0, 10) == pytest.approx(10)
    assert ProgressPlan.text("retouch") == "Layout-and-Retouch: stage 2: retouch"
    with pytest.raises(ValueError):
        plan.position("painting", 1, 10)


def test_progress_plan_for_several_references_and_no_stage1():
    one = ProgressPlan(steps=10, batch=1)
    three = ProgressPlan(steps=10, batch=1, references=3, references_to_invert=2)
    assert three.units["reference inversion"] == pytest.approx(2 * one.units["reference inversion"])
    assert three.units["retouch"] == pytest.approx(10 * 2 * (3 + 2) / 2)
    assert (
        ProgressPlan(steps=10, batch=1, references=3, reference_cached=True).units[
            "reference inversion"
        ]
        == 0
    )
    no_stage1 = ProgressPlan(steps=10, batch=1, stage1_steps=0)
    assert no_stage1.total == pytest.approx(one.total - 10)
    assert no_stage1.position("reference inversion", 0, 10) == 0


def test_axis_units_in_refusals_and_hints():
    """A swept λ1 / λ2 / mask start counts steps at the generation's count: a refusal says so and
    gives the paper value's equivalent; the axis's hover hint says so too."""
    base = LayoutRetouchParams(enabled=False)
    with pytest.raises(LayoutRetouchError) as e:
        axes.check_axis_values(base, "mask_start", [6, 31], 10, label="[L&R] Mask start")
    msg = str(e.value)
    assert "[L&R] Mask start = 31" in msg, msg
    assert "X/Y/Z values count this generation's 10 steps and are used as given" in msg, msg
    assert "if you meant 31 of 50 steps, as on the slider, enter 7" in msg, msg
    with pytest.raises(LayoutRetouchError) as e:  # λ1 = 10 at 10 steps: 10 of 50 would be 2
        axes.check_axis_values(base, "lambda1", [10], 10, label="[L&R] Lambda1")
    assert "if you meant 10 of 50 steps, as on the slider, enter 2" in str(e.value)
    with pytest.raises(LayoutRetouchError) as e:  # at 50 steps the two scales are one: no hint
        axes.check_axis_values(base, "lambda1", [50], 50, label="[L&R] Lambda1")
    assert "if you meant" not in str(e.value) and "used as given" in str(e.value)
    for a in axes.AXES:
        if a.field in ("lambda1", "lambda2", "mask_start"):
            assert "steps at this generation's step count" in ui_text.EXTRA_HINTS[a.label]
    texts = ui_text.page_texts()
    assert ui_text.refusal("x").startswith(texts["refusalMark"])
    # a LayoutRetouchError's str already names the extension: the banner says it once
    assert ui_text.refusal(str(LayoutRetouchError("x is bad"))) == "⚠ Layout-and-Retouch: x is bad"
    assert "still uploading" in texts["moreUploading"]
