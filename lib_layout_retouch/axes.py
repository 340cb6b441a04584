"""X/Y/Z plot axes as data: the glue turns each into the WebUI's `AxisOption`.

An axis writes its value into the generation's overrides (`p.layout_retouch_overrides`); the
script applies the overrides to the parsed parameters before validating them, so an axis value is
checked exactly like a UI or API value.

Sweeps tell the truth: the values of the λ1 / λ2 / mask start axes are the values AT THE
GENERATION'S STEP COUNT, used as given — a `[L&R] Lambda1` cell labelled 2 runs λ1 = 2 and its
infotext says `LR lambda1: 2`. When the UI's "scale with steps" is on, the knobs the grid does not
sweep keep their scaled (effective) values and the cell records `LR scale with steps: False` with
the effective numbers, so pasting a cell reproduces it. `check_axis_values` (the grid's `confirm`
hook) refuses a bad value before the grid starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, MutableMapping, Optional

from .errors import LayoutRetouchError
from .params import FIELD_BY_NAME, FIELDS, LayoutRetouchParams
from .schedule import PAPER_STEPS, effective_values, scale_count, scale_mask_start

OVERRIDES_ATTR = "layout_retouch_overrides"


@dataclass(frozen=True)
class AxisSpec:
    label: str
    field: str
    value_type: type  # what the X/Y/Z grid parses the typed values into
    choices: Optional[str] = (
        None  # "bool" | "checkpoints" | "sam" | "layer_presets" — the glue supplies the lists
    )


_AXIS_VALUE_TYPES = {"bool": str, "int": int, "float": float, "str": str, "choice": str}

# Several subjects: how many of the given subjects are retouched — the first N (no parameter of
# its own: a cell keeps the first N subjects; the others are drawn as the prompt says, unretouched).
SUBJECTS_RETOUCHED = "subjects_retouched"

# Made from the parameter table: every field with an `axis` label, in the table's order; then the
# number of subjects retouched.
AXES: tuple[AxisSpec, ...] = tuple(
    AxisSpec(f"[L&R] {f.axis}", f.name, _AXIS_VALUE_TYPES[f.kind], f.axis_choices)
    for f in FIELDS
    if f.axis
) + (AxisSpec("[L&R] Subjects retouched", SUBJECTS_RETOUCHED, int),)


def set_override(target: Any, field: str, value: Any) -> None:
    """What an axis does: record `field = value` on the processing object `target`."""
    if field not in FIELD_BY_NAME and field != SUBJECTS_RETOUCHED:
        raise KeyError(field)
    overrides = getattr(target, OVERRIDES_ATTR, None)
    if overrides is None:
        overrides = {}
        setattr(target, OVERRIDES_ATTR, overrides)
    overrides[field] = value


SCHEDULE_FIELDS = ("lambda1", "lambda2", "mask_start")


def apply_overrides(
    params: LayoutRetouchParams,
    overrides: Optional[MutableMapping[str, Any]],
    steps: Optional[int] = None,
) -> LayoutRetouchParams:
    """Parameters with the axis values applied (coerced and checked like API values).

    With `steps` and an override of λ1 / λ2 / mask start, the schedule is taken literally at that
    step count: the swept value as given, the others at their effective (scaled) values, and
    `scale_with_steps` off — so what the grid's label says is what runs and what the infotext records.
    """
    if not overrides:
        return params
    overrides = dict(overrides)
    if SUBJECTS_RETOUCHED in overrides:
        subjects = first_subjects(params, overrides.pop(SUBJECTS_RETOUCHED))
        overrides.setdefault("subjects", subjects)
    merged = {name: getattr(params, name) for name in FIELD_BY_NAME}
    if (
        steps is not None
        and params.scale_with_steps
        and any(k in SCHEDULE_FIELDS for k in overrides)
    ):
        # the un-swept knobs' effective values, unchecked: the cell's check (with the sampler's
        # bound for λ1) names any problem, once
        lambda1, lambda2, mask_start = effective_values(
            int(steps), params.lambda1, params.lambda2, params.mask_start
        )
        merged.update(
            lambda1=lambda1, lambda2=lambda2, mask_start=mask_start, scale_with_steps=False
        )
    merged.update(overrides)
    return LayoutRetouchParams.from_dict(merged)


def first_subjects(params: LayoutRetouchParams, value: Any) -> tuple:
    """`params.subjects` (subjects 2 …) for a cell that retouches the first `value` subjects."""
    given = len(params.all_subjects())
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if not 1 <= n <= given:
        raise LayoutRetouchError(
            f"subjects retouched is {value}, but {given} subject(s) are given: use values from 1 "
            f"to {given} (add subjects in the panel, or the API's subjects, to retouch more)",
            parameter="subjects",
        )
    return tuple(params.subjects[: n - 1])


def check_axis_values(
    base: LayoutRetouchParams,
    field: str,
    values: Iterable[Any],
    steps: int,
    label: Optional[str] = None,
    host_check: Optional[Callable[[LayoutRetouchParams], None]] = None,
) -> list[LayoutRetouchParams]:
    """The X/Y/Z `confirm` hook's work: every value of one axis, applied to the UI/API parameters
    of the grid, must make a generation the script accepts at `steps` steps. Raises one
    LayoutRetouchError naming the axis, the value and the fix for the first that does not; returns
    the parameters of each cell. `host_check` checks an enabled cell completely (its parameters
    and what needs the WebUI, the sampler's bound for λ1 included: one message); without it, or for
    a disabled cell, the parameters and the schedule at `steps`."""
    label = label or next((a.label for a in AXES if a.field == field), field)
    cells = []
    for value in values:
        try:
            params = apply_overrides(base, {field: value}, steps)
            if params.enabled and host_check is not None:
                host_check(params)
            else:
                params.validate()
                params.schedule(int(steps))
        except LayoutRetouchError as e:
            raise LayoutRetouchError(
                f"X/Y/Z plot: {label} = {value}: {e.message}{axis_units(field, value, steps)} "
                "(no image was generated)",
                parameter=e.parameter or field,
            ) from None
        cells.append(params)
    return cells


def axis_units(field: str, value: Any, steps: int) -> str:
    """For a refused λ1 / λ2 / mask start value: what the axis counts, and the value to enter if
    the user meant the panel's scale (given for 50 steps), e.g. "; X/Y/Z values count this
    generation's 10 steps and are used as given (not scaled like the panel's sliders): if you meant
    31 of 50 steps, as on the slider, enter 7"."""
    if field not in SCHEDULE_FIELDS or not isinstance(value, int) or isinstance(value, bool):
        return ""
    text = (
        f"; X/Y/Z values count this generation's {steps} steps and are used as given (not "
        "scaled like the panel's sliders)"
    )
    try:
        if field == "mask_start" and 2 <= value <= PAPER_STEPS + 1:
            same = scale_mask_start(value, int(steps))
        elif field != "mask_start" and 0 <= value <= PAPER_STEPS:
            same = scale_count(value, int(steps))
        else:
            return text
    except (TypeError, ValueError):
        return text
    if same == value:
        return text
    return f"{text}: if you meant {value} of {PAPER_STEPS} steps, as on the slider, enter {same}"


def axis_apply(field: str) -> Callable[[Any, Any, Any], None]:
    """The `apply(p, x, xs)` callable of an X/Y/Z AxisOption."""

    def apply(p, x, xs):
        set_override(p, field, x)

    return apply
