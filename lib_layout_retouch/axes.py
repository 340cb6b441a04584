"""X/Y/Z plot axes as data: the glue turns each into the WebUI's `AxisOption`.

An axis writes its value into the generation's overrides (`p.layout_retouch_overrides`); the
script applies the overrides to the parsed parameters before validating them, so an axis value is
checked exactly like a UI or API value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, MutableMapping, Optional

from .params import FIELD_BY_NAME, FIELDS, LayoutRetouchParams

OVERRIDES_ATTR = "layout_retouch_overrides"


@dataclass(frozen=True)
class AxisSpec:
    label: str
    field: str
    value_type: type             # what the X/Y/Z grid parses the typed values into
    choices: Optional[str] = None  # "bool" | "checkpoints" | "sam" | "layer_presets" — the glue supplies the lists


_AXIS_VALUE_TYPES = {"bool": str, "int": int, "float": float, "str": str, "choice": str}

# Made from the parameter table: every field with an `axis` label, in the table's order.
AXES: tuple[AxisSpec, ...] = tuple(
    AxisSpec(f"[L&R] {f.axis}", f.name, _AXIS_VALUE_TYPES[f.kind], f.axis_choices) for f in FIELDS if f.axis
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
