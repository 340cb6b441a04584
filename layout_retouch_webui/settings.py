"""The extension's section in the WebUI settings, and the lists the UI offers (SAM files, checkpoints)."""

from __future__ import annotations

import os

import gradio as gr
from modules import shared

from layout_retouch_webui import hosts, options
from layout_retouch_webui.options import opt  # noqa: F401  (re-exported: the UI reads options through settings)
from lib_layout_retouch import NAME
from lib_layout_retouch import checkpoints as checkpoint_files
from lib_layout_retouch import retouch as pipeline
from lib_layout_retouch.params import NO_SAM
from lib_layout_retouch.schedule import PAPER_STEPS
from lib_layout_retouch.segmentation import find_sam_checkpoints

TITLE = NAME
EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sam_folders() -> list[str]:
    models = getattr(shared, "models_path", os.path.join(EXT_ROOT, "models"))
    return [
        os.path.join(models, "sam"),
        # where the popular sd-webui-segment-anything extension keeps its checkpoints
        os.path.join(os.path.dirname(EXT_ROOT), "sd-webui-segment-anything", "models", "sam"),
    ]


SAM_SEEN: set[str] = set()  # names ever listed: one that vanished later is "missing", not "unknown"


def sam_choices() -> list[str]:
    names = list(find_sam_checkpoints(sam_folders()))
    SAM_SEEN.update(names)
    return [NO_SAM] + names


def checkpoint_choices(selected: str | None = None) -> list[str]:
    """Vanilla checkpoint candidates: the WebUI's list without the model that generates (the
    personalized one: `selected`, the title chosen at the top of the page, or the WebUI's checkpoint
    option) and without the files whose header shows a UNet of another architecture (SDXL files
    while an SD1 model is chosen): picking one would load gigabytes only to be refused."""
    host = hosts.current()
    target = generating_checkpoint(selected)
    own = checkpoint_unet_shapes(target)
    out = []
    for title in host.checkpoint_titles():
        if not_offered(title, target, own) is None:
            out.append(title)
    return out


def generating_checkpoint(selected: str | None = None):
    """The checkpoint the next generation uses: `selected` (the page's checkpoint dropdown), else the
    WebUI's checkpoint option (A1111 loads it at once, Forge at the next generation), else the
    loaded model's."""
    host = hosts.current()
    info = host.checkpoint(selected) if selected else None
    if info is None:
        info = host.checkpoint(str(getattr(shared.opts, "sd_model_checkpoint", "") or ""))
    return info if info is not None else host.loaded_checkpoint()


def checkpoint_unet_shapes(info) -> dict:
    """{UNet key: shape} of checkpoint `info`: from its file's header (.safetensors), or from the
    loaded model when it is that checkpoint; {} when unknown (nothing is filtered then)."""
    if info is None:
        return {}
    shapes = checkpoint_files.unet_shapes(info.filename)
    if shapes:
        return shapes
    loaded = hosts.current().loaded_checkpoint()
    if loaded is not None and getattr(loaded, "filename", None) == info.filename:
        return loaded_unet_shapes()
    return {}


def not_offered(title: str, target, own: dict) -> str | None:
    """Why checkpoint `title` is no vanilla candidate for the checkpoint `target` (whose UNet shapes
    are `own`), in words after the title ("is an SD1 model but the loaded model is SDXL"); None when
    it is one."""
    info = hosts.current().checkpoint(title) if title else None
    if info is None or not os.path.isfile(info.filename):
        return "is no longer in the WebUI's checkpoint list"
    if target is not None and info.filename == getattr(target, "filename", None):
        return "is now the loaded model itself"
    problem = architecture_problem(info.filename, own) if own else ""
    return problem or None


def same_checkpoint(title: str, choices: list[str]) -> str | None:
    """The entry of `choices` that names the file `title` names (a title gains its hash once the
    WebUI has computed it), or None."""
    host = hosts.current()
    info = host.checkpoint(title) if title else None
    if info is None:
        return None
    if title in choices:
        return title
    for choice in choices:
        other = host.checkpoint(choice)
        if other is not None and other.filename == info.filename:
            return choice
    return None


def loaded_unet_shapes(p=None) -> dict:
    """{UNet key: shape} of the loaded model's UNet, {} when none is loaded (or it is unknown)."""
    import types

    model = getattr(p, "sd_model", None) if p is not None else shared.__dict__.get("sd_model")
    if model is None:
        try:
            model = shared.sd_model  # may load it; an error leaves the list unfiltered
        except Exception:
            return {}
    try:
        unet = hosts.current().unet(p if p is not None else types.SimpleNamespace(sd_model=model))
        return {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    except Exception:
        return {}


def architecture_problem(filename: str, own: dict) -> str:
    """Why checkpoint `filename`'s UNet cannot be the loaded model's vanilla ("" when it can, or the
    file's header cannot tell: only .safetensors headers are read)."""
    shapes = checkpoint_files.unet_shapes(filename)
    if shapes is None or not own:
        return ""
    return checkpoint_files.unet_mismatch(shapes, own)


def _settings_page() -> list[tuple]:
    """(option, label, component, its arguments) of each setting, in page order."""
    return [
        (
            options.DEFAULT_SAM,
            "Default Segment-Anything model",
            gr.Dropdown,
            lambda: {"choices": sam_choices()},
        ),
        (
            options.REFERENCE_CACHE,
            f"Reference inversions kept in memory (≈{pipeline.INVERSION_ENTRY_MB:.1f} MB each at "
            f"512², {PAPER_STEPS} steps)",
            gr.Slider,
            {"minimum": 0, "maximum": 32, "step": 1},
        ),
        (
            options.KV_CACHE_MB,
            f"Reference attention cache, MB of VRAM (0 = off; one SD1 512² {PAPER_STEPS}-step "
            f"reference ≈ {round(pipeline.KV_REFERENCE_MB, -2):.0f} MB): "
            "repeat generations with the same reference skip the reference path",
            gr.Slider,
            {"minimum": 0, "maximum": 16384, "step": 64},
        ),
        (
            options.VANILLA_CACHE,
            "Vanilla UNets kept loaded for DreamBooth mode (≈1.7 GB each in fp16)",
            gr.Slider,
            {"minimum": 0, "maximum": 4, "step": 1},
        ),
        (
            options.VANILLA_ON_CPU,
            "Keep the vanilla UNet on the CPU between its steps (saves VRAM, costs a transfer per "
            "image)",
            None,
            None,
        ),
    ]


def on_ui_settings():
    section = ("layout_retouch", TITLE)
    for name, label, component, args in _settings_page():
        default = options.DEFAULTS[name]
        if component is None:
            info = shared.OptionInfo(default, label, section=section)
        else:
            info = shared.OptionInfo(default, label, component, args, section=section)
        shared.opts.add_option(name, info)
