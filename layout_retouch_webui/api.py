"""Script args → validated parameters; the generation's own infotext; how errors reach the user.

The API sends the script's args as one dict of named parameters (or, for old clients, positionally
in `FIELDS` order); `LayoutRetouchParams` owns their validation and (de)serialisation. A user error
never becomes a traceback: the API answers HTTP 422 with the message, the UI shows it under the
gallery, and the generation computes nothing.
"""
from __future__ import annotations

from lib_layout_retouch import axes, logs, ui_text
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import INFOTEXT_PREFIX, NO_SAM, LayoutRetouchParams

from .settings import opt

logger = logs.attach_console()


def parse_params(p, args) -> LayoutRetouchParams:
    params = LayoutRetouchParams.from_script_args(args)
    params = axes.apply_overrides(params, getattr(p, axes.OVERRIDES_ATTR, None), p.steps)
    # The settings' default SAM is the UI dropdown's initial value; for the API it fills an omitted name.
    if params.enabled and params.sam_model == NO_SAM and _named_without(args, "sam_model"):
        default_sam = opt("layout_retouch_default_sam", NO_SAM)
        if default_sam and default_sam != NO_SAM:
            params = axes.apply_overrides(params, {"sam_model": default_sam})
    return params


def _named_without(args, name) -> bool:
    return bool(args) and isinstance(args[0], dict) and name not in args[0]


# --- errors ------------------------------------------------------------------------------------------
def refuse(p, err: LayoutRetouchError) -> None:
    """A refused input is an expected event: ONE log line, no traceback, and the generation stops
    before any compute. The API answers 422 with the message (parameter names); the UI shows it
    under the gallery (control labels) and makes no image."""
    logger.info(f"refused: {err}")
    if getattr(p, "is_api", False):
        fail_generation(p, err, logged=True)
        return
    p.comment(ui_text.refusal(str(err)))
    p.n_iter = 0  # process_images' batch loop runs no batch: nothing is sampled, nothing is raised


def fail_generation(p, err: LayoutRetouchError, logged: bool = False) -> None:
    """Make the generation fail with `err`: hooks' exceptions are swallowed by the WebUI, so raise
    from `p.sample` instead. The API answers 422 with the message; the UI shows it."""
    exc = request_error(p, err, logged=logged)

    def sample(*args, **kwargs):
        raise exc
    p.sample = sample


def request_error(p, err: LayoutRetouchError, logged: bool = False) -> Exception:
    """What to raise for a user error: for the API an HTTPException, which reaches the client as a
    plain 422 {"detail": msg} without a server traceback; in the UI the error itself (a toast)."""
    if not logged:
        logger.info(f"refused: {err}")
    if getattr(p, "is_api", False):
        from fastapi import HTTPException
        return HTTPException(status_code=422, detail=str(err))
    return LayoutRetouchError(ui_text.for_ui(str(err)), parameter=err.parameter)


def http_422(err: LayoutRetouchError) -> Exception:
    from fastapi import HTTPException
    return HTTPException(status_code=422, detail=str(err))


# --- infotext ----------------------------------------------------------------------------------------
def own_infotext(p) -> None:
    """Give this generation its own `extra_generation_params` without `LR ` keys.

    The X/Y/Z plot (and anything else that copies a job with `copy(p)`) shares one dict between
    the copies; writing our keys into the shared dict leaked them into cells that were not
    retouched. A fresh dict per processed job keeps each image's infotext to its own values."""
    p.extra_generation_params = {k: v for k, v in (p.extra_generation_params or {}).items()
                                 if not str(k).startswith(INFOTEXT_PREFIX)}


def intermediate_infotext(p, label: str, index: int) -> str:
    """An intermediate's own infotext: the generation's prompt and settings without `LR ` keys (it is
    not a retouched image; pasting it makes a plain generation) and a label saying what it is."""
    from modules.processing import create_infotext
    saved = p.extra_generation_params
    p.extra_generation_params = {k: v for k, v in saved.items() if not str(k).startswith(INFOTEXT_PREFIX)}
    p.extra_generation_params[ui_text.INTERMEDIATE_KEY] = ui_text.intermediate_label(label, index)
    try:
        n = len(p.all_prompts or [])
        i = min(index, n - 1) if n else 0
        return create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=i)
    finally:
        p.extra_generation_params = saved


def has_lr_keys(d) -> bool:
    return any(str(k).startswith(INFOTEXT_PREFIX) for k in d)
