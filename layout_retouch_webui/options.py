"""Reading the WebUI's options (`shared.opts`), with a default where the WebUI has none yet."""

from __future__ import annotations

from modules import shared


def opt(name: str, default):
    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default
