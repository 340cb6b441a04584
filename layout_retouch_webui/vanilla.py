"""DreamBooth's vanilla model for stage 1: its UNet and text encoder, loaded once and cached.

Built from a checkpoint file as copies of the loaded model's modules with the vanilla weights, so
they share nothing with the loaded model but the class (VAE stays the loaded model's)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import os
import threading
from collections import OrderedDict

import torch

from layout_retouch_webui import hosts, options
from layout_retouch_webui.options import opt
from lib_layout_retouch import logs
from lib_layout_retouch.checkpoints import unet_family
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.unet import text_encoders

logger = logs.attach_console()
UNET_PREFIX = "model.diffusion_model."


def release_freed_memory() -> None:
    """Give the checkpoint tensors just freed back to the OS: glibc keeps large freed blocks in the
    process otherwise, and a CPU host (or the CPU copy of a --medvram model) would look gigabytes
    bigger after every vanilla load."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (Windows, macOS, musl): nothing to do
        pass


@contextlib.contextmanager
def loading_phase(what: str):
    """Name a load in the WebUI's progress text (it would show "Waiting..." for seconds, or
    minutes with a real checkpoint); the text is cleared afterwards."""
    try:
        from modules import shared

        state = shared.state
    except (ImportError, AttributeError):
        state = None
    if state is not None:
        state.textinfo = f"Layout-and-Retouch: {what}"
    try:
        yield
    finally:
        if state is not None:
            state.textinfo = None


class VanillaUNets:
    """Bounded cache of vanilla UNets (setting "Vanilla UNets kept loaded")."""

    WHAT = "UNet"

    def __init__(self):
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    @staticmethod
    def _dtype(like) -> torch.dtype:
        return next(like.parameters()).dtype

    def get(self, info, like):
        key = (info.filename, os.path.getmtime(info.filename), self._dtype(like))
        with self._lock:
            item = self._items.get(key)
            if item is None:
                with loading_phase(f"loading the vanilla {self.WHAT} from {info.title}"):
                    item = self._load(info, like)
                self._items[key] = item
                self.loads += 1
            self._items.move_to_end(key)
            while len(self._items) > max(1, int(opt(options.VANILLA_CACHE))):
                self._items.popitem(last=False)
            return item

    @staticmethod
    def _load(info, personal_unet):
        logger.info(f"loading vanilla UNet from {os.path.basename(info.filename)}")
        state = hosts.current().read_weights(info.filename, [UNET_PREFIX])
        unet_state = {
            k[len(UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(UNET_PREFIX)
        }
        del state
        own = personal_unet.state_dict()
        loaded_family = unet_family(own)
        if not unet_state:
            raise LayoutRetouchError(
                f"vanilla checkpoint '{info.title}' has no SD UNet weights "
                f"(model.diffusion_model.*): choose an {loaded_family} checkpoint",
                parameter="vanilla_checkpoint",
            )
        family = unet_family(unet_state)
        if family != loaded_family:
            raise LayoutRetouchError(
                f"vanilla checkpoint '{info.title}' is an {family} model but the loaded model is {loaded_family}; "
                f"choose the {loaded_family} checkpoint your DreamBooth model was trained from",
                parameter="vanilla_checkpoint",
            )
        mismatch = [k for k in own if k not in unet_state or unet_state[k].shape != own[k].shape]
        if mismatch or len(unet_state) != len(own):
            raise LayoutRetouchError(
                f"vanilla checkpoint '{info.title}' is an {family} model of another size than the loaded one "
                f"({len(mismatch)} UNet weights differ); choose the checkpoint your DreamBooth model was "
                "trained from",
                parameter="vanilla_checkpoint",
            )
        unet = copy.deepcopy(personal_unet)
        for m in unet.modules():  # a patched instance forward must not be copied along
            m.__dict__.pop("forward", None)
        unet.load_state_dict(unet_state)
        unet.eval().requires_grad_(False)
        del unet_state
        release_freed_memory()
        return unet

    def clear(self):
        with self._lock:
            self._items.clear()


class VanillaTextEncoders(VanillaUNets):
    """Bounded cache of the vanilla checkpoints' text transformers (copies of the loaded model's
    with the vanilla weights), for stage 1's y_p⁻ in DreamBooth mode."""

    WHAT = "text encoder"

    @staticmethod
    def _dtype(slots) -> torch.dtype:
        holder, attr, _ = slots[0]
        return next(getattr(holder, attr).parameters()).dtype

    @staticmethod
    def _load(info, slots):
        logger.info(f"loading the vanilla text encoder from {os.path.basename(info.filename)}")
        state = hosts.current().read_weights(info.filename, [prefix for _, _, prefix in slots])
        copies = [
            text_encoders.copy_with_weights(getattr(h, a), state, prefix, info.title)
            for h, a, prefix in slots
        ]
        del state
        release_freed_memory()
        return copies


VANILLA_UNETS = VanillaUNets()
VANILLA_TEXT_ENCODERS = VanillaTextEncoders()
