"""What the nodes say, without ComfyUI: the run's info text (the WebUI's "At N steps" line, the mask
kind and the notes, shown on the node and given as its `info` output) and the log filter that keeps a
refusal's traceback out of ComfyUI's log.
"""

from __future__ import annotations

import logging
import sys
from typing import Iterable, Optional

from lib_layout_retouch import ui_text
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.schedule import Schedule


def info_text(
    schedule: Schedule,
    *,
    mask_kind: Optional[str] = None,
    notes: Iterable[str] = (),
    stage1: bool = True,
    retouch: bool = True,
) -> str:
    """ "At 4 steps: λ1=1, λ2=1, mask from step 3 of 4 (scaled from 5 / 10 / 31 for 50 steps)",
    then "Mask: SAM+CA" and "Notes: reference was 780×780: resized; …" (the WebUI's infotext
    `LR steps used`, `LR mask`, `LR notes`), one per line."""
    lines = [ui_text.steps_line(schedule, stage1=stage1, retouch=retouch)]
    if mask_kind:
        lines.append(f"Mask: {mask_kind}")
    notes = list(notes)
    if notes:
        lines.append("Notes: " + "; ".join(notes))
    return "\n".join(lines)


TRACEBACK_START = "Traceback (most recent call last)"


class RefusalTracebacks(logging.Filter):
    """ComfyUI logs a failed node as "!!! Exception during processing !!! <message>" and then the
    traceback (`execution.py`, both through the root logger, inside its `except`). For a refusal of
    ours — a LayoutRetouchError, whose message names the input and the fix — the traceback record is
    dropped, so the log keeps the one line; ComfyUI still shows the error in the page and /history.
    Every other record, and every other exception's traceback, passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(TRACEBACK_START)):
            return True
        return not isinstance(sys.exc_info()[1], LayoutRetouchError)


def install_refusal_filter(logger: Optional[logging.Logger] = None) -> None:
    """Put RefusalTracebacks on `logger` (the root logger: ComfyUI's `logging.error`) once."""
    logger = logger if logger is not None else logging.getLogger()
    if not any(type(f).__name__ == RefusalTracebacks.__name__ for f in logger.filters):
        logger.addFilter(RefusalTracebacks())
