"""The errors this library raises at its users.

Every error a person can cause (a bad prompt, a step count that does not fit, a missing file) is a
`LayoutRetouchError`: its message names the problem and the fix, and `parameter` names the
parameter at fault so the WebUI/API can point at it. Anything else escaping the library is a bug.
"""

from __future__ import annotations

import math
from typing import Iterable

from . import NAME

PREFIX = "Layout-and-Retouch: "


class LayoutRetouchError(ValueError):
    """A problem the user can fix. `str(err)` is written for a person. Several problems of one
    request are one error (`combine`): `problems` lists them (each with its `parameter`)."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter
        self.problems: list[LayoutRetouchError] = [self]

    @property
    def message(self) -> str:
        """The message without the "Layout-and-Retouch: " prefix."""
        text = str(self)
        return text[len(PREFIX) :] if text.startswith(PREFIX) else text

    def __str__(self) -> str:  # "Layout-and-Retouch: <message>" reads well in a UI toast
        msg = super().__str__()
        return msg if msg.startswith(NAME) else f"{NAME}: {msg}"


def combine(errors: Iterable[LayoutRetouchError]) -> LayoutRetouchError:
    """One error naming every problem of a request, so a person fixes them all at once instead of
    meeting them one Generate at a time: "3 problems: (1) …; (2) …; (3) …". One problem per
    parameter (the first); `parameter` is the first problem's; one problem is returned as it is."""
    parts: list[LayoutRetouchError] = []
    seen: set = set()
    for error in errors:
        for part in error.problems:
            if part.parameter is not None and part.parameter in seen:
                continue
            seen.add(part.parameter)
            parts.append(part)
    if not parts:
        raise ValueError("combine() needs at least one error")
    if len(parts) == 1:
        return parts[0]
    listed = "; ".join(f"({i}) {part.message}" for i, part in enumerate(parts, 1))
    error = LayoutRetouchError(f"{len(parts)} problems: {listed}", parameter=parts[0].parameter)
    error.problems = parts
    return error


class Interrupted(Exception):
    """Raised inside the sampling loop when the caller's `should_stop()` says so.

    Not a user error: the caller asked us to stop. Every patch is restored before it propagates.
    """


def check_range(
    name: str,
    value: float,
    low: float,
    high: float | None = None,
    *,
    exclusive: bool = False,
    symbol: str = "",
    meaning: str = "",
    fix: str = "",
) -> float:
    """`value`, or a LayoutRetouchError naming the parameter, its meaning and its range (`high`
    None: `low` or more; `exclusive`: both ends excluded)."""
    ok = (
        not math.isnan(value)
        and (value > low if exclusive else value >= low)
        and (high is None or (value < high if exclusive else value <= high))
    )
    if ok:
        return value
    if high is None:
        rule = f"{low:g} or more"
    else:
        rule = f"between {low:g} and {high:g}" + (" (exclusive)" if exclusive else "")
    raise LayoutRetouchError(
        f"{name} ({symbol + ', ' if symbol else ''}{meaning}) is {value} "
        f"but must be {rule}" + (f": {fix}" if fix else ""),
        parameter=name,
    )
