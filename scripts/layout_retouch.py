"""Layout-and-Retouch in the WebUI: the AlwaysOn script and its callbacks — nothing else.

Each concern lives in `layout_retouch_webui` (see its `__init__`): the host adapters, UI, API and
infotext, checks, stage 1, stage 2, X/Y/Z. The algorithm is `lib_layout_retouch`. Callbacks are
registered here, in the script file, because the WebUI clears them and re-runs script files on a
reload; the packages stay imported.
"""

from __future__ import annotations

import os
import sys

_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_ROOT not in sys.path:
    sys.path.insert(0, _EXT_ROOT)

from modules import script_callbacks, scripts  # noqa: E402

from layout_retouch_webui import api, checks, sampling, settings, stage1, ui, xyz  # noqa: E402
from layout_retouch_webui import run as lr_run  # noqa: E402
from lib_layout_retouch import logs  # noqa: E402
from lib_layout_retouch.errors import LayoutRetouchError  # noqa: E402

logger = logs.attach_console()  # "[Layout-and-Retouch] ..." lines on the WebUI's stdout

# The host's prompt, steps, sampler (and img2img's denoising strength) boxes, by tab, for the accordion's live
# hints. Each tab has its own script instance, so each instance keeps its own tab's boxes.
_HOST_BOXES = {
    "txt2img_prompt": ("txt2img", "prompt"),
    "txt2img_steps": ("txt2img", "steps"),
    "txt2img_sampling": ("txt2img", "sampler"),
    "img2img_prompt": ("img2img", "prompt"),
    "img2img_steps": ("img2img", "steps"),
    "img2img_sampling": ("img2img", "sampler"),
    "img2img_denoising_strength": ("img2img", "denoising_strength"),
}


class LayoutRetouchScript(scripts.Script):
    def __init__(self):
        super().__init__()
        self.host_components = {}

    def title(self):
        return settings.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible  # txt2img and img2img (incl. inpaint)

    def elem_id(self, item_id):
        """txt2img keeps the ids it had when the script showed in txt2img only (CSS, tests, user
        scripts); img2img's are prefixed with the tab, so every id is unique on the page."""
        return f"script_{'img2img_' if self.is_img2img else ''}layoutandretouch_{item_id}"

    def ui(self, is_img2img):
        return ui.build(self, is_img2img)

    def after_component(self, component, **kwargs):
        where = _HOST_BOXES.get(kwargs.get("elem_id"))
        if where is not None and (where[0] == "img2img") == bool(self.is_img2img):
            self.host_components[where[1]] = component

    def process(self, p, *args):
        lr_run.clear(p)
        api.own_infotext(p)  # before anything: an image that is not retouched carries no `LR ` key
        params = None
        try:
            params = api.parse_params(p, args)
            if not params.enabled:
                return
            checks.check_request(
                p, params
            )  # every problem, the user's values and the WebUI's, at once
            checks.check_before_sampling(p, params)
            run = lr_run.Run(p, params)
            checks.host_notes(p, run)
        except LayoutRetouchError as e:
            api.refuse(p, e)
            return
        except Exception as e:  # a bug of ours or a host we do not know: never a silent plain image
            if params is None or not params.enabled:
                logger.exception("could not read the parameters of a run that may be disabled")
                return
            api.fail_internal(p, e)
            return
        sampling.install(p, run)
        p.extra_generation_params.update(run.job.infotext())
        logger.info(
            f"enabled: {run.job.schedule.describe()}, personalization {params.personalization}"
        )

    def postprocess(self, p, processed, *args):
        run = lr_run.of(p)
        if run is None:
            return
        for label, index, img in run.intermediates:
            text = api.intermediate_infotext(p, label, index)
            img.info["parameters"] = text
            processed.images.append(img)
            processed.infotexts.append(text)
        run.intermediates = []
        lr_run.clear(p)
        # The images' infotexts are made: whatever builds another one from this `p` later — the
        # X/Y/Z grid takes its first cell's — describes no retouched image and gets no `LR ` key.
        api.own_infotext(p)


script_callbacks.on_ui_settings(settings.on_ui_settings)
try:
    xyz.register_axes()
except Exception as e:  # the grid script may not be loaded yet; on_before_ui tries again
    logger.info(f"X/Y/Z axes not registered yet: {e}")
script_callbacks.on_before_ui(xyz.register_axes)
script_callbacks.on_after_component(ui.on_after_component)  # the vanilla list follows the model
script_callbacks.on_cfg_denoiser(stage1.on_cfg_denoiser)
script_callbacks.on_cfg_denoiser(stage1.on_progress_denoiser)
