"""X/Y/Z plot axes (registered at import and on_before_ui: with --nowebui the API builds its UI
first). The axes themselves are data (`lib_layout_retouch.axes`); a cell's value is checked like a
UI or API value, and every value of an axis before the grid starts (`confirm`): a refused value
ends the grid before it starts (API: HTTP 422; UI: the message under the gallery, no image)."""

from __future__ import annotations

import os

from modules import scripts

from layout_retouch_webui import api, hosts, img2img
from layout_retouch_webui.checks import check_request
from layout_retouch_webui.settings import TITLE, sam_choices
from lib_layout_retouch import axes, logs, ui_text
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import FIELD_BY_NAME, LayoutRetouchParams

logger = logs.attach_console()


def grid_base_params(p) -> LayoutRetouchParams:
    """The grid's own Layout-and-Retouch parameters (what the UI/API sent with the X/Y/Z request)."""
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", []) or []:
        if getattr(script, "title", lambda: None)() == TITLE:
            return api.parse_params(p, list(p.script_args[script.args_from : script.args_to]))
    return LayoutRetouchParams()


class GridRefused(Exception):
    """Raised by an axis's `confirm` in the UI: `guard_grid` ends the X/Y/Z run with no cell and the
    refusal under the gallery. (Emptying the values instead makes the X/Y/Z script print
    "Unexpected error: Processing could not begin, you may need to refresh the tab".)"""


def axis_confirm(spec):
    """The X/Y/Z `confirm(p, xs)` hook: validate every value before the grid starts."""

    def confirm(p, xs):
        try:
            base = grid_base_params(p)
            steps = img2img.steps_run(p, base.layout_source)
            axes.check_axis_values(
                base,
                spec.field,
                xs,
                steps,
                label=spec.label,
                host_check=lambda params: check_request(p, params),
            )
        except LayoutRetouchError as e:
            logger.info(f"refused: {e}")
            if getattr(p, "is_api", False):
                raise api.http_422(e) from None
            # The UI: no exception reaches the WebUI (it would print a traceback and an argument
            # dump); the message is shown under the gallery and the grid makes no cell.
            p.comment(ui_text.refusal(e))
            raise GridRefused() from None

    return confirm


def guard_grid(script_class) -> None:
    """Wrap the X/Y/Z script's `run` once: a `GridRefused` from our `confirm` ends it with an empty
    result (no image, the refusal in the comments) before the grid prints or computes anything."""
    run = script_class.run
    if getattr(run, "_layout_retouch_guard", False):
        return

    def guarded_run(self, p, *args, **kwargs):
        try:
            return run(self, p, *args, **kwargs)
        except GridRefused:
            from modules.processing import Processed

            return Processed(p, [])

    guarded_run._layout_retouch_guard = True
    guarded_run.__wrapped__ = run
    script_class.run = guarded_run


def register_axes() -> None:
    xyz = None
    for data in scripts.scripts_data:
        if (
            data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid")
            or os.path.basename(data.path) == "xyz_grid.py"
        ):
            xyz = data.module
            break
    if xyz is None:
        return
    guard_grid(data.script_class)
    existing = {getattr(o, "label", None) for o in xyz.axis_options}
    choices = {
        "bool": lambda: ["True", "False"],
        "checkpoints": lambda: hosts.current().checkpoint_titles(),
        "sam": sam_choices,
        "layer_presets": lambda: list(FIELD_BY_NAME["layer_preset"].choices),
    }
    for spec in axes.AXES:
        if spec.label in existing:
            continue
        xyz.axis_options.append(
            xyz.AxisOption(
                spec.label,
                spec.value_type,
                axes.axis_apply(spec.field),
                confirm=axis_confirm(spec),
                choices=choices.get(spec.choices),
            )
        )
