"""The errors this library raises at its users.

Every error a person can cause (a bad prompt, a step count that does not fit, a missing file) is a
`LayoutRetouchError`: its message names the problem and the fix, and `parameter` names the
parameter at fault so the WebUI/API can point at it. Anything else escaping the library is a bug.
"""

from __future__ import annotations


class LayoutRetouchError(ValueError):
    """A problem the user can fix. `str(err)` is written for a person."""

    def __init__(self, message: str, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter

    def __str__(self) -> str:  # "Layout-and-Retouch: <message>" reads well in a UI toast
        msg = super().__str__()
        return msg if msg.startswith("Layout-and-Retouch") else f"Layout-and-Retouch: {msg}"


class Interrupted(Exception):
    """Raised inside the sampling loop when the caller's `should_stop()` says so.

    Not a user error: the caller asked us to stop. Every patch is restored before it propagates.
    """
