"""X/Y/Z plot axes as data: the glue turns each into the WebUI's `AxisOption`.

An axis writes its value into the generation's overrides (`p.layout_retouch_overrides`); the
script applies the overrides to the parsed parameters before validating them, so an axis value is
checked exactly like a UI or API value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, MutableMapping, Optional

from .params import FIELD_BY_NAME, LayoutRetouchParams

OVERRIDES_ATTR = "layout_retouch_overrides"


@dataclass(frozen=True)
class AxisSpec:
    label: str
    field: str
    value_type: type             # what the X/Y/Z grid parses the typed values into
    choices: Optional[str] = None  # "bool" | "checkpoints" | "sam" | "layer_presets" — the glue supplies the lists


AXES: tuple[AxisSpec, ...] = (
    AxisSpec("[L&R] Enable", "enabled", str, "bool"),
    AxisSpec("[L&R] Lambda1", "lambda1", int),
    AxisSpec("[L&R] Lambda2", "lambda2", int),
    AxisSpec("[L&R] Mask start", "mask_start", int),
    AxisSpec("[L&R] CA threshold", "ca_threshold", float),
    AxisSpec("[L&R] Vanilla checkpoint", "vanilla_checkpoint", str, "checkpoints"),
    AxisSpec("[L&R] SAM model", "sam_model", str, "sam"),
    AxisSpec("[L&R] Layer preset", "layer_preset", str, "layer_presets"),
)


def set_override(target: Any, field: str, value: Any) -> None:
    """What an axis does: record `field = value` on the processing object `target`."""
    if field not in FIELD_BY_NAME:
        raise KeyError(field)
    overrides = getattr(target, OVERRIDES_ATTR, None)
    if overrides is None:
        overrides = {}
        setattr(target, OVERRIDES_ATTR, overrides)
    overrides[field] = value


def apply_overrides(params: LayoutRetouchParams, overrides: Optional[MutableMapping[str, Any]]) -> LayoutRetouchParams:
    """Parameters with the axis values applied (coerced and checked like API values)."""
    if not overrides:
        return params
    merged = {name: getattr(params, name) for name in FIELD_BY_NAME}
    merged.update(overrides)
    return LayoutRetouchParams.from_dict(merged)


def axis_apply(field: str) -> Callable[[Any, Any, Any], None]:
    """The `apply(p, x, xs)` callable of an X/Y/Z AxisOption."""
    def apply(p, x, xs):
        set_override(p, field, x)
    return apply
