"""The extension's log: Python `logging` (the WebUI's convention), one named logger.

The WebUI configures the root logger only when asked (--loglevel / SD_WEBUI_LOG_LEVEL); by default
an INFO record would be dropped. So the logger has its own console handler writing
"[Layout-and-Retouch] <message>" lines to stdout (where users and the host tests read them), and does
not propagate (no second copy when the WebUI does configure logging). `attach_console` is idempotent:
the WebUI re-imports scripts on "Reload UI" and must not double every line.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Optional

LOGGER_NAME = "layout_retouch"
LOG_PREFIX = "[Layout-and-Retouch]"

logger = logging.getLogger(LOGGER_NAME)


def attach_console(stream: Optional[IO[str]] = None) -> logging.Logger:
    """Give the logger its "[Layout-and-Retouch] message" handler on `stream` (default: stdout), once."""
    for h in list(logger.handlers):
        if getattr(h, "_layout_retouch_console", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(logging.Formatter(f"{LOG_PREFIX} %(message)s"))
    handler._layout_retouch_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger
