"""The WebUI options (`shared.opts`) the extension reads: each one's name and default in one place.

The extension's own are added to the settings page by `settings.on_ui_settings` with these
defaults; the WebUI's own are read with the default the WebUI gives them.
"""

from __future__ import annotations

from modules import shared

from lib_layout_retouch.params import NO_SAM
from lib_layout_retouch.retouch import INVERSION_CACHE_ENTRIES

# the extension's
DEFAULT_SAM = "layout_retouch_default_sam"
REFERENCE_CACHE = "layout_retouch_reference_cache"
KV_CACHE_MB = "layout_retouch_kv_cache_mb"
VANILLA_CACHE = "layout_retouch_vanilla_cache"
VANILLA_ON_CPU = "layout_retouch_vanilla_on_cpu"
# the WebUI's
IMG2IMG_FIX_STEPS = "img2img_fix_steps"
SDXL_CROP_TOP = "sdxl_crop_top"
SDXL_CROP_LEFT = "sdxl_crop_left"

DEFAULTS = {
    DEFAULT_SAM: NO_SAM,
    REFERENCE_CACHE: INVERSION_CACHE_ENTRIES,
    KV_CACHE_MB: 0,  # off: the reference attention cache is opt-in
    VANILLA_CACHE: 1,
    VANILLA_ON_CPU: False,
    IMG2IMG_FIX_STEPS: False,
    SDXL_CROP_TOP: 0,
    SDXL_CROP_LEFT: 0,
}

_TABLE = object()


def opt(name: str, default=_TABLE):
    """The option's value, or its default (DEFAULTS, unless one is given) where it is not set."""
    if default is _TABLE:
        default = DEFAULTS[name]
    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default
