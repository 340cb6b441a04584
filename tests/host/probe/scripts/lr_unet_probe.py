"""Test-only WebUI extension (the host tier links it into the test data dir's extensions/): counts
the UNet's model calls and which weights ran each, independently of Layout-and-Retouch's own logs.

GET /lr-probe/unet-calls → {"calls": [fingerprint, …]} since the last GET (and clears the list). A
fingerprint is the first weight of the UNet's input conv: the personalized and the vanilla tiny
checkpoints (different seeds) differ there."""

import threading

import ldm.modules.diffusionmodules.openaimodel as ldm_unet
from modules import script_callbacks

_CALLS = []
_LOCK = threading.Lock()


def _fingerprint(unet) -> str:
    return f"{float(unet.input_blocks[0][0].weight.detach().flatten()[0]):.6g}"


def _wrap(cls):
    if getattr(cls.forward, "_lr_probe", False):
        return
    original = cls.forward

    def forward(self, *args, **kwargs):
        with _LOCK:
            _CALLS.append(_fingerprint(self))
        return original(self, *args, **kwargs)

    forward._lr_probe = True
    cls.forward = forward


_wrap(ldm_unet.UNetModel)


def _routes(demo, app):
    def unet_calls():
        with _LOCK:
            calls = list(_CALLS)
            _CALLS.clear()
        return {"calls": calls}

    app.add_api_route("/lr-probe/unet-calls", unet_calls, methods=["GET"])


script_callbacks.on_app_started(_routes)
