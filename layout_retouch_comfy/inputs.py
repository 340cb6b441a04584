"""The nodes' inputs, derived from `lib_layout_retouch.params.FIELDS` (one home per fact): each
advanced parameter keeps its API name, default, range, choices and hint; what the WebUI takes as a
field but ComfyUI takes as a socket (the reference photo, the vanilla checkpoint, its text encoder)
or does not offer (SAM, the gallery option) is left out here and named in `SOCKETS`/`NOT_OFFERED`.
No ComfyUI import: the specs are plain tuples, the sampler lists are passed in.
"""

from __future__ import annotations

from typing import Any, Mapping

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import FIELD_BY_NAME, FIELDS, NO_SAM, LayoutRetouchParams

CATEGORY = "Layout-and-Retouch"
MAX_INT = 10000
# FIELDS that are sockets on the node: field name → input name
SOCKETS = {
    "reference_image": "reference",
    "vanilla_checkpoint": "vanilla_model",
    "stage1_text_encoder": "vanilla_clip",
    "personalization": "vanilla_model",
    "subjects": "subjects",  # chained Layout-and-Retouch Subject nodes
}
# FIELDS ComfyUI does not offer: SAM checkpoints (the cross-attention mask only), the gallery
# option (the layout, mask and map are outputs), the switch (the node is the switch).
NOT_OFFERED = ("enabled", "sam_model", "show_intermediates")
# the concept fields are required inputs, the rest are advanced
CONCEPT = ("concept_token", "class_phrase")
LAMBDAS = ("lambda1", "lambda2", "mask_start")
ADVANCED = tuple(
    f.name
    for f in FIELDS
    if f.name not in SOCKETS and f.name not in NOT_OFFERED and f.name not in CONCEPT + LAMBDAS
)
# What a library error's `parameter` is called on the node (the others keep their names).
INPUT_OF_PARAMETER = {
    **SOCKETS,
    "personalization": "vanilla_model",
    "sd_model": "model",
    "width": "width",
    "prompt": "prompt",
}


def field_input(name: str) -> tuple:
    """One FIELDS entry as a ComfyUI input spec (type, options)."""
    f = FIELD_BY_NAME[name]
    opts: dict[str, Any] = {"default": f.default, "tooltip": f.hint}
    if name in ADVANCED:
        opts["advanced"] = True
    if f.kind == "bool":
        return ("BOOLEAN", opts)
    if f.kind == "int":
        return ("INT", {**opts, "min": int(f.minimum), "max": MAX_INT, "step": 1})
    if f.kind == "float":
        low, high = f.slider_range()
        return ("FLOAT", {**opts, "min": low, "max": high, "step": f.step})
    if f.kind == "choice":
        return (list(f.choices), opts)
    if f.kind == "str":
        return ("STRING", {**opts, "multiline": False})
    raise AssertionError(f"no ComfyUI input for field kind {f.kind!r}")


def sampler_inputs(samplers, schedulers) -> dict[str, tuple]:
    """KSampler's own inputs (its names, defaults and ranges)."""
    return {
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
        "steps": ("INT", {"default": 20, "min": 1, "max": MAX_INT}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": (list(samplers), {"default": "ddim" if "ddim" in samplers else None}),
        "scheduler": (list(schedulers), {"default": "ddim_uniform"}),
    }


def prompt_inputs() -> dict[str, tuple]:
    return {
        "prompt": (
            "STRING",
            {
                "multiline": True,
                "dynamicPrompts": True,
                "tooltip": "y_p: the "
                "prompt with the concept token, e.g. 'a photo of sks dog on a beach'.",
            },
        ),
        "negative_prompt": ("STRING", {"multiline": True, "dynamicPrompts": True}),
        **{name: field_input(name) for name in CONCEPT},
    }


def advanced_inputs(names=ADVANCED) -> dict[str, tuple]:
    return {name: field_input(name) for name in names}


def make_params(values: Mapping[str, Any], references, *, vanilla: bool) -> LayoutRetouchParams:
    """The library's params from the node's inputs (FIELDS names) and the reference photos."""
    named = {k: v for k, v in values.items() if k in FIELD_BY_NAME and k not in SOCKETS}
    return LayoutRetouchParams(
        enabled=True,
        reference_image=list(references) or None,
        personalization="dreambooth" if vanilla else "textual_inversion",
        vanilla_checkpoint="vanilla_model" if vanilla else "",
        sam_model=NO_SAM,
        stage1_text_encoder="vanilla",
        **named,
    )


def node_error(error: LayoutRetouchError) -> LayoutRetouchError:
    """The library's message, with the node input it is about (the WebUI names its own field)."""
    name = INPUT_OF_PARAMETER.get(error.parameter or "", error.parameter)
    message = str(error)
    if name and error.parameter and name != error.parameter:
        message = message.replace(error.parameter, name)  # "no reference_image" → "no reference"
    if name and f"'{name}'" not in message:
        message += f" [input '{name}']"
    return LayoutRetouchError(message, parameter=name)
