"""Which model/prompt/phase runs at step s, and how λ1, λ2, mask_start scale with the step count."""

from __future__ import annotations

import pytest

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.schedule import (
    PAPER_LAMBDA1,
    PAPER_LAMBDA2,
    PAPER_MASK_START,
    PAPER_STEPS,
    Schedule,
)


def test_paper_constants():
    assert (PAPER_STEPS, PAPER_LAMBDA1, PAPER_LAMBDA2, PAPER_MASK_START) == (50, 5, 10, 31)


@pytest.mark.parametrize(
    "steps, expected",
    [
        (50, (5, 10, 31)),  # exactly the paper
        (20, (2, 4, 13)),  # 20 blended steps of 50 → 8 of 20
        (25, (3, 5, 16)),  # 2.5 rounds half up
        (100, (10, 20, 61)),
        (10, (1, 2, 7)),
        (4, (1, 1, 3)),  # λ1 = 0.4 would round to 0: at least 1
        (2, (1, 1, 2)),  # mask start at least 2
    ],
)
def test_scaling_table(steps, expected):
    s = Schedule.for_steps(steps)
    assert (s.steps, s.lambda1, s.lambda2, s.mask_start) == (steps, *expected)


def test_scaling_keeps_zero_and_never_blend():
    s = Schedule.for_steps(20, 0, 0, 51)
    assert (s.lambda1, s.lambda2, s.mask_start) == (0, 0, 21)
    assert not any(s.blends_mask(i) for i in range(1, 21))


def test_scaling_other_reference_steps():
    s = Schedule.for_steps(40, 5, 10, 11, reference_steps=20)
    assert (s.lambda1, s.lambda2, s.mask_start) == (10, 20, 21)


def test_unscaled_values_used_as_given():
    s = Schedule.for_steps(20, 5, 10, 15, scale=False)
    assert (s.lambda1, s.lambda2, s.mask_start) == (5, 10, 15)


def test_stage1_calls_per_step_are_exact():
    s = Schedule.for_steps(50)
    calls = [s.stage1(i) for i in range(1, 51)]
    assert calls == [("vanilla", "layout")] * 5 + [("personalized", "personalized")] * 45
    assert [s.uses_vanilla(i) for i in (1, 5, 6, 50)] == [True, True, False, False]


def test_stage2_phases():
    s = Schedule(steps=20, lambda1=2, lambda2=4, mask_start=13)
    copy = [i for i in range(1, 21) if s.copies_layout(i)]
    paint = [i for i in range(1, 21) if s.paints_identity(i)]
    blend = [i for i in range(1, 21) if s.blends_mask(i)]
    assert copy == [1, 2, 3, 4]
    assert paint == list(range(5, 21))
    assert blend == list(range(13, 21))


@pytest.mark.parametrize("bad", [0, 21, -1, 1.0, True, None])
def test_step_outside_run_is_a_programming_error(bad):
    s = Schedule.for_steps(20)
    for method in (s.uses_vanilla, s.stage1, s.copies_layout, s.paints_identity, s.blends_mask):
        with pytest.raises(ValueError) as e:
            method(bad)
        assert not isinstance(e.value, LayoutRetouchError)
        assert "1..20" in str(e.value)


def test_describe():
    assert Schedule.for_steps(20).describe() == "λ1=2, λ2=4, mask from step 13 of 20"
    assert Schedule.for_steps(50).describe() == "λ1=5, λ2=10, mask from step 31 of 50"
    assert Schedule(10, 1, 2, 11).describe() == "λ1=1, λ2=2, no mask blending in 10 steps"


def test_bounds_are_inclusive_where_allowed():
    """The extreme schedules are accepted and mean what they say (one past them: the refusals
    below)."""
    steps = range(1, 11)
    low = Schedule(10, 0, 0, 2)  # no vanilla step, no copy step, blending from step 2
    assert [s for s in steps if low.uses_vanilla(s) or low.copies_layout(s)] == []
    assert [s for s in steps if low.blends_mask(s)] == list(range(2, 11))
    high = Schedule(10, 9, 10, 11)  # vanilla up to 9, copies every step, no blending
    assert [s for s in steps if high.uses_vanilla(s)] == list(range(1, 10))
    assert all(high.copies_layout(s) and not high.paints_identity(s) for s in steps)
    assert not any(high.blends_mask(s) for s in steps)


@pytest.mark.parametrize(
    "args, parameter, pieces",
    [
        (
            (10, 10, 2, 5),
            "lambda1",
            [
                "λ1 (the number of first steps drawn by the vanilla model) is 10",
                "at 10 sampling steps",
                "between 0 and 9",
            ],
        ),
        ((10, -1, 2, 5), "lambda1", ["is -1", "between 0 and 9"]),
        (
            (10, 1, 11, 5),
            "lambda2",
            [
                "λ2 (the number of first retouch steps that copy the layout) is 11",
                "between 0 and 10",
            ],
        ),
        (
            (10, 1, 2, 1),
            "mask_start",
            [
                "mask start (the first retouch step that blends the subject mask) is 1",
                "between 2 and 11",
                "11 turns blending off",
            ],
        ),
        ((10, 1, 2, 12), "mask_start", ["is 12", "between 2 and 11"]),
        ((1, 0, 0, 2), "steps", ["the number of sampling steps is 1", "at least 2"]),
        ((10, 1.5, 2, 5), "lambda1", ["whole number", "1.5"]),
    ],
)
def test_validation_messages(args, parameter, pieces):
    with pytest.raises(LayoutRetouchError) as e:
        Schedule(*args)
    assert e.value.parameter == parameter
    for piece in pieces:
        assert piece in str(e.value)
    assert "scaled" not in str(e.value)


def test_scaled_error_mentions_value_before_scaling():
    with pytest.raises(LayoutRetouchError) as e:
        Schedule.for_steps(20, 49)  # 49 of 50 → 20 of 20: nothing left for the personalized model
    msg = str(e.value)
    assert e.value.parameter == "lambda1"
    assert "is 20 at 20 sampling steps (scaled from the 49 you set for 50 steps)" in msg
    assert "between 0 and 19" in msg
    assert "use more sampling steps" in msg


def test_scaled_error_turn_off_hint_only_when_unscaled_would_fit():
    with pytest.raises(LayoutRetouchError) as e:
        Schedule.for_steps(100, 50)  # → 100, but λ1 ≤ 99; the unscaled 50 would fit
    assert "turn off scaling with steps" in str(e.value)
    assert Schedule.for_steps(100, 50, scale=False).lambda1 == 50
    with pytest.raises(LayoutRetouchError) as e:
        Schedule.for_steps(20, 49)  # 49 does not fit 20 steps either
    assert "turn off scaling" not in str(e.value)


@pytest.mark.parametrize("mask_start", [1, 0, 52])
def test_scaled_mask_start_outside_reference_range(mask_start):
    with pytest.raises(LayoutRetouchError) as e:
        Schedule.for_steps(20, 5, 10, mask_start)
    assert e.value.parameter == "mask_start"
    assert f"is {mask_start}" in str(e.value) and "between 2 and 51" in str(e.value)


@pytest.mark.parametrize("steps", [0, 1, -5, 20.0, "20"])
def test_for_steps_bad_steps(steps):
    with pytest.raises(LayoutRetouchError) as e:
        Schedule.for_steps(steps)
    assert e.value.parameter == "steps"


def test_frozen_and_equality_ignores_origin():
    a = Schedule.for_steps(20)
    assert a == Schedule(20, 2, 4, 13)
    with pytest.raises(AttributeError):
        a.lambda1 = 3  # type: ignore[misc]


# -- img2img: the steps the WebUI's img2img sampler runs (A1111 v1.10 setup_img2img_steps: t_enc + 1) --
@pytest.mark.parametrize(
    "steps, strength, fix, expected",
    [
        (20, 0.75, False, 16),  # t_enc = int(0.75·20) = 15
        (20, 1.0, False, 20),  # min(1.0, 0.999)·20 = 19.98 → 19
        (50, 0.5, False, 26),
        (30, 0.3, False, 10),  # int(0.3·30) = 9
        (10, 0.29, False, 3),  # 0.29·10 = 2.9 → 2: truncated, as A1111 does
        (20, 0.0, False, 1),
        (20, 0.75, True, 20),  # img2img_fix_steps: exactly the slider's steps
        (7, 0.1, True, 7),
    ],
)
def test_img2img_steps_as_a1111_runs_them(steps, strength, fix, expected):
    from lib_layout_retouch.schedule import img2img_steps

    assert img2img_steps(steps, strength, fix_steps=fix) == expected


def test_img2img_steps_refuses_a_strength_outside_0_1():
    from lib_layout_retouch.schedule import img2img_steps

    with pytest.raises(LayoutRetouchError, match="denoising strength"):
        img2img_steps(20, 1.5)


@pytest.mark.parametrize(
    "steps, strength, expected",
    [
        # effective T = 16 (20 × 0.75): λ1 = round(5·16/50) = round(1.6) = 2, λ2 = round(3.2) = 3,
        # blended = round(20·16/50) = round(6.4) = 6 → mask from 16 + 1 − 6 = 11
        (20, 0.75, (16, 2, 3, 11, "λ1=2, λ2=3, mask from step 11 of 16")),
        # T = 26 (50 × 0.5): λ1 = round(2.6) = 3, λ2 = round(5.2) = 5, blended = round(10.4) = 10 → 17
        (50, 0.5, (26, 3, 5, 17, "λ1=3, λ2=5, mask from step 17 of 26")),
    ],
)
def test_schedule_at_the_img2img_step_count(steps, strength, expected):
    from lib_layout_retouch.schedule import img2img_steps

    T = img2img_steps(steps, strength)
    s = Schedule.for_steps(T)
    assert (s.steps, s.lambda1, s.lambda2, s.mask_start, s.describe()) == expected


# -- λ1's bound is the sampler's: one check, every problem in one message ------------------------------
def _ddim(steps):
    from lib_layout_retouch.sampler_steps import DDIM_LIKE, sampler_steps

    return sampler_steps("DDIM", DDIM_LIKE, steps)


@pytest.mark.parametrize("lambda1", [10, 9])
def test_lambda1_has_one_bound_the_samplers(lambda1):
    """DDIM at 10 steps runs 9: λ1 = 10 and λ1 = 9 are refused with the SAME bound (0…8), never the
    step count's 0…9 first and the sampler's after."""
    with pytest.raises(LayoutRetouchError) as e:
        Schedule(10, lambda1, 2, 7, sampler=_ddim(10))
    msg = str(e.value)
    assert e.value.parameter == "lambda1"
    assert f"is {lambda1}, but DDIM runs 9 steps for 10" in msg, msg
    assert "between 0 and 8" in msg and "between 0 and 9" not in msg, msg
    assert Schedule(10, 8, 2, 7, sampler=_ddim(10)).lambda1 == 8
    with pytest.raises(LayoutRetouchError) as e:  # scaled: 45 for 50 steps is 9 at 10
        Schedule.for_steps(10, 45, sampler=_ddim(10))
    assert "is 9 at 10 sampling steps (scaled from the 45 you set for 50 steps)" in str(e.value)
    assert "between 0 and 8" in str(e.value)


def test_lambda1_bound_without_sampler_or_with_one_that_runs_more_steps():
    from lib_layout_retouch.sampler_steps import FIRST_ORDER, UNKNOWN, sampler_steps
    from lib_layout_retouch.schedule import knob_bounds

    assert knob_bounds(10)["lambda1"] == (0, 9)
    assert knob_bounds(10, _ddim(10)) == {
        "lambda1": (0, 8),
        "lambda2": (0, 10),
        "mask_start": (2, 11),
    }
    assert knob_bounds(10, sampler_steps("Euler", FIRST_ORDER, 10))["lambda1"] == (0, 9)
    # DDIM at 60 steps runs 62 (timesteps 16 apart): the step count's bound still holds
    assert _ddim(60).steps == 62 and knob_bounds(60, _ddim(60))["lambda1"] == (0, 59)
    adaptive = sampler_steps("DPM adaptive", UNKNOWN, 10)
    assert knob_bounds(10, adaptive)["lambda1"] == (0, 0)
    assert Schedule(10, 0, 2, 7, sampler=adaptive).lambda1 == 0
    with pytest.raises(LayoutRetouchError) as e:
        Schedule(10, 1, 2, 7, sampler=adaptive)
    assert "decides its model calls while it runs" in str(e.value) and "set it to 0" in str(e.value)


def test_every_knob_out_of_range_is_named_in_one_error():
    with pytest.raises(LayoutRetouchError) as e:
        Schedule(10, 10, 12, 15, sampler=_ddim(10))
    err = e.value
    assert [p.parameter for p in err.problems] == ["lambda1", "lambda2", "mask_start"]
    assert err.parameter == "lambda1"
    msg = str(err)
    assert msg.startswith("Layout-and-Retouch: 3 problems: (1) λ1"), msg
    assert "; (2) λ2 (the number of first retouch steps that copy the layout) is 12" in msg, msg
    assert "; (3) mask start (the first retouch step that blends the subject mask) is 15" in msg
    assert msg.count("Layout-and-Retouch") == 1, msg
    with pytest.raises(LayoutRetouchError) as e:  # two values that are no whole numbers: both
        Schedule.for_steps(10, 1.5, 2, "x")
    assert [p.parameter for p in e.value.problems] == ["lambda1", "mask_start"]


def test_describe_says_which_steps_lambda1_counts():
    assert Schedule(10, 1, 2, 7, sampler=_ddim(10)).describe() == (
        "λ1=1 of DDIM's 9 steps, λ2=2, mask from step 7 of 10"
    )
    assert Schedule(10, 0, 2, 7, sampler=_ddim(10)).describe().startswith("λ1=0, ")
    assert Schedule(10, 1, 2, 7).describe() == "λ1=1, λ2=2, mask from step 7 of 10"


def test_effective_values_are_the_schedules_and_unscaled_values_go_back_exactly_up_to_50():
    from lib_layout_retouch.schedule import effective_values, unscaled_values

    for steps in (2, 4, 10, 20, 33, 50, 100):
        s = Schedule.for_steps(steps, 7, 13, 40)
        assert effective_values(steps, 7, 13, 40) == (s.lambda1, s.lambda2, s.mask_start)
    assert effective_values(10, 7, 13, 40, scale=False) == (7, 13, 40)
    assert effective_values(10, 50, 50, 51) == (10, 10, 11)  # unchecked: λ1 = 10 of 10 steps
    for steps in range(2, 51):
        for v in range(steps + 1):
            for mask in range(2, steps + 2):
                back = unscaled_values(steps, v, v, mask)
                assert effective_values(steps, *back) == (v, v, mask), (steps, v, mask, back)
                assert 0 <= back[0] <= 50 and 2 <= back[2] <= 51
    assert unscaled_values(10, 1, 2, 7) == (5, 10, 31)  # the paper's values at 10 steps
