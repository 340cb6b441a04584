"""Script args → validated parameters; the generation's own infotext; how errors reach the user.

The API sends the script's args as one dict of named parameters (or, for old clients, positionally
in `FIELDS` order); `LayoutRetouchParams` owns their validation and (de)serialisation. A user error
never becomes a traceback: the API answers HTTP 422 with the message, the UI shows it under the
gallery, and the generation computes nothing.
"""

from __future__ import annotations

import os

from layout_retouch_webui import options
from layout_retouch_webui.options import opt
from lib_layout_retouch import axes, logs, ui_text
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import INFOTEXT_PREFIX, NO_SAM, LayoutRetouchParams

logger = logs.attach_console()


def parse_params(p, args) -> LayoutRetouchParams:
    args, more = split_args(args)
    params = LayoutRetouchParams.from_script_args(args)
    if more:
        params = with_more_photos(p, params, more)
    from layout_retouch_webui.img2img import (
        steps_run,  # late: img2img imports the WebUI's processing lazily too
    )

    params = axes.apply_overrides(
        params, getattr(p, axes.OVERRIDES_ATTR, None), steps_run(p, params.layout_source)
    )
    # The settings' default SAM is the UI dropdown's initial value; for the API it fills an omitted name.
    if params.enabled and params.sam_model == NO_SAM and _named_without(args, "sam_model"):
        default_sam = opt(options.DEFAULT_SAM)
        if default_sam and default_sam != NO_SAM:
            params = axes.apply_overrides(params, {"sam_model": default_sam})
    return params


# --- several reference photos -------------------------------------------------------------------------
# The UI's components are the API's positional args in `FIELDS` order; the "More photos" upload (the
# 2nd…4th reference photo) is one extra component AFTER them (`EXTRA_ARGS`), so old positional clients
# are unchanged. API clients send several photos as `reference_image: [b64, …]` instead.
EXTRA_ARGS = ("more_reference_images",)


def split_args(args):
    """Script args → (the `FIELDS` args, the "More photos" value or None)."""
    from lib_layout_retouch.params import FIELDS

    if not isinstance(args, (list, tuple)):
        return args, None
    args = list(args)
    n = len(FIELDS)
    if len(args) > n + len(EXTRA_ARGS):
        raise LayoutRetouchError(
            f"got {len(args)} positional arguments but Layout-and-Retouch takes at most "
            f"{n} (its parameters) + {len(EXTRA_ARGS)} (the UI's 'More photos'); send one "
            "dict of named parameters instead, with several photos as a list in reference_image"
        )
    more = args[n] if len(args) > n else None
    return args[:n], more


def _upload_path(item):
    """A file of gradio's upload: gradio 3 gives tempfile wrappers (`.name`), gradio 4 paths or dicts."""
    if isinstance(item, dict):
        return item.get("path") or item.get("name")
    return getattr(item, "name", item)


def with_more_photos(p, params: LayoutRetouchParams, more) -> LayoutRetouchParams:
    """The UI's 'More photos' added after the main photo (together at most MAX_REFERENCES)."""
    from PIL import Image

    items = [
        m for m in (more if isinstance(more, (list, tuple)) else [more]) if m not in (None, "")
    ]
    if not items:
        return params
    if getattr(p, "is_api", False):
        # Only the UI's own uploads are files; an API value here would be a path on the server.
        raise LayoutRetouchError(
            "the 'More photos' argument is for the UI's uploads; in the API send several "
            "photos as a list of base64 strings in reference_image",
            parameter="reference_image",
        )
    photos = []
    for i, item in enumerate(items):
        path = _upload_path(item)
        name = os.path.basename(
            str(getattr(item, "orig_name", None) or path)
        )  # never a server path
        try:
            if os.path.getsize(path) == 0:
                # gradio sends a file whose upload has not finished as an empty one
                raise LayoutRetouchError(
                    f"{ui_text.MORE_PHOTOS_UPLOADING} ('{name}' has not arrived yet)",
                    parameter="reference_image",
                )
            with Image.open(path) as img:
                img.load()
                photos.append(img.copy())
        except LayoutRetouchError:
            raise
        except Exception as e:  # not an image, or gone
            why = type(e).__name__ if isinstance(e, OSError) else "cannot read it as an image"
            raise LayoutRetouchError(
                f"more photos: '{name}' (file {i + 1} of {len(items)}) is not an image ({why}): "
                "remove it with × and add an image file",
                parameter="reference_image",
            ) from None
    values = params.references + photos
    # Re-coerced: the limit and each photo's checks, with messages naming photo k of n.
    return axes.apply_overrides(params, {"reference_image": values})


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
    p.comment(ui_text.refusal(err))
    p.n_iter = 0  # process_images' batch loop runs no batch: nothing is sampled, nothing is raised
    p.init = _skip_init  # nor is img2img's input encoded (it draws from the global torch RNG)


def _skip_init(*args, **kwargs) -> None:
    """`p.init` of a refused generation: it runs before the batch loop, and img2img's encodes the
    input with a draw from the global torch RNG, which would change the next img2img with that seed."""


def fail_generation(p, err: LayoutRetouchError, logged: bool = False) -> None:
    """Make the generation fail with `err`: hooks' exceptions are swallowed by the WebUI, so raise
    from `p.sample` instead. The API answers 422 with the message; the UI shows it."""
    exc = request_error(p, err, logged=logged)

    def sample(*args, **kwargs):
        raise exc

    # `p.init` is the first thing the WebUI runs after the scripts' `process`: raising there stops
    # the generation before any compute (img2img's init encodes the input with a draw from the
    # global torch RNG; the next img2img with the same seed would differ).
    p.init = sample
    p.sample = sample


def fail_internal(p, exc: Exception) -> None:
    """An unexpected error while preparing an enabled run. The WebUI would print it and then sample
    a plain image as if nothing had been asked — a silent no-op. Instead: the traceback in the log,
    and the generation fails with a message (API: HTTP 500)."""
    logger.exception(f"internal error, the generation is stopped: {exc}")
    message = (
        f"Layout-and-Retouch could not prepare the run ({type(exc).__name__}: {exc}); no image was made. "
        "This is a bug or an unsupported host: please report it with the console log"
    )

    def sample(*args, **kwargs):
        if getattr(p, "is_api", False):
            from fastapi import HTTPException

            raise HTTPException(status_code=500, detail=message)
        raise RuntimeError(message)

    p.init = sample  # before any compute, as for a refusal
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
    p.extra_generation_params = {
        k: v
        for k, v in (p.extra_generation_params or {}).items()
        if not str(k).startswith(INFOTEXT_PREFIX)
    }


def intermediate_infotext(p, label: str, index: int) -> str:
    """An intermediate's own infotext: the generation's prompt and settings without `LR ` keys (it is
    not a retouched image; pasting it makes a plain generation) and a label saying what it is."""
    from modules.processing import create_infotext

    saved = p.extra_generation_params
    p.extra_generation_params = {
        k: v for k, v in saved.items() if not str(k).startswith(INFOTEXT_PREFIX)
    }
    p.extra_generation_params[ui_text.INTERMEDIATE_KEY] = ui_text.intermediate_label(label, index)
    try:
        n = len(p.all_prompts or [])
        i = min(index, n - 1) if n else 0
        return create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=i)
    finally:
        p.extra_generation_params = saved


def has_lr_keys(d) -> bool:
    return any(str(k).startswith(INFOTEXT_PREFIX) for k in d)
