"""The errors this library raises at its users.

Every error a person can cause (a bad prompt, a step count that does not fit, a missing file) is a
`LayoutRetouchError`: its message names the problem and the fix, and `parameter` names the
parameter at fault so the WebUI/API can point at it. Anything else escaping the library is a bug.
"""

from __future__ import annotations

import math

from . import NAME


class LayoutRetouchError(ValueError):
    """A problem the user can fix. `str(err)` is written for a person."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter

    def __str__(self) -> str:  # "Layout-and-Retouch: <message>" reads well in a UI toast
        msg = super().__str__()
        return msg if msg.startswith(NAME) else f"{NAME}: {msg}"


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
