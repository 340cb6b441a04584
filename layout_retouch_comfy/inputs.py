"""The nodes' inputs, derived from `lib_layout_retouch.params.FIELDS` (one home per fact): each
advanced parameter keeps its API name, default, range, choices and hint; what the WebUI takes as a
field but ComfyUI takes as a socket (the reference photo, the vanilla checkpoint, its text encoder,
the SAM model) or does not offer (the gallery option) is left out here and named in
`SOCKETS`/`NOT_OFFERED`. `check_before_run` is what the nodes' VALIDATE_INPUTS asks: the checks
that need no model, so ComfyUI refuses the prompt before anything loads.
No ComfyUI import: the specs are plain tuples, the sampler lists are passed in.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import (
    FIELD_BY_NAME,
    FIELDS,
    NO_SAM,
    LayoutRetouchParams,
    SubjectParams,
)
from lib_layout_retouch.prompts import NO_CLASS_PHRASE, NO_CONCEPT_TOKEN, derive_prompts
from lib_layout_retouch.schedule import Schedule

CATEGORY = "Layout-and-Retouch"
MAX_INT = 10000
# FIELDS that are sockets on the node: field name → input name
SOCKETS = {
    "reference_image": "reference",
    "vanilla_checkpoint": "vanilla_model",
    "stage1_text_encoder": "vanilla_clip",
    "personalization": "vanilla_model",
    "sam_model": "sam",  # a SAM loader node's output
    "subjects": "subjects",  # chained Layout-and-Retouch Subject nodes
}
# FIELDS ComfyUI does not offer: the gallery option (the layout, mask and map are outputs), the
# switch (the node is the switch).
NOT_OFFERED = ("enabled", "show_intermediates")
# What ComfyUI offers of a choice field, where it is less than the WebUI's, and the hint that
# says it in ComfyUI's words. 'stage1' reads the library's DDIM trajectory, which ComfyUI's
# sampler does not give (docs/comfyui.md).
CHOICES = {"layout_source": ("inversion", "input")}
HINTS = {
    "personalization": "How this subject was learned: 'lora' = its LoRA file below (acting only "
    "in its region); 'textual_inversion' = an embedding in the prompt; 'dreambooth' = a token of the "
    "connected (multi-concept) MODEL, with its base checkpoint on the Sampler's vanilla_model; "
    "'photo' = no trained model: the identity comes from the photos alone (no concept token; the "
    "class phrase names it in the prompt).",
    "layout_source": "Where the layout path's latents come from: 'inversion' = DDIM inversion of "
    "the stage-1 layout (paper); 'input' = no stage 1: the connected 'latent' (e.g. VAE Encode of "
    "your picture) is inverted and retouched as it is, putting your subject into that picture.",
}
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
    opts: dict[str, Any] = {"default": f.default, "tooltip": HINTS.get(name, f.hint)}
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
        return (list(CHOICES.get(name, f.choices)), opts)
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


def own_personalization(vanilla: bool) -> str:
    """How the node's own subject was learned, from its sockets: a vanilla MODEL connected means a
    personalized MODEL (DreamBooth, or the MODEL after a LoRA loader); none, an embedding in the
    prompt on the loaded model (Textual Inversion)."""
    return "dreambooth" if vanilla else "textual_inversion"


def make_params(
    values: Mapping[str, Any], subjects: Sequence[SubjectParams], *, vanilla: bool
) -> LayoutRetouchParams:
    """The library's params from the node's inputs (FIELDS names) and its subjects (subject 1
    first, each with its photos)."""
    first, *rest = subjects
    own = {k: getattr(first, k) for k in SUBJECT_OWN}
    named = {
        k: v
        for k, v in values.items()
        if k in FIELD_BY_NAME and k not in SOCKETS and k not in SUBJECT_OWN
    }
    return LayoutRetouchParams(
        enabled=True,
        **own,
        subjects=tuple(rest),
        vanilla_checkpoint="vanilla_model" if vanilla else "",
        sam_model=NO_SAM,
        stage1_text_encoder="vanilla",
        **named,
    )


# Subject 1's own fields of the params (the node's widgets, or the first Subject node's).
SUBJECT_OWN = ("reference_image", "personalization", "concept_token", "class_phrase")


def node_error(error: LayoutRetouchError, input_name: str | None = None) -> LayoutRetouchError:
    """The library's message, with the node input it is about (the WebUI names its own field);
    `input_name`: the input, where the node calls it otherwise."""
    name = input_name or INPUT_OF_PARAMETER.get(error.parameter or "", error.parameter)
    message = str(error)
    if name and error.parameter and name != error.parameter:
        message = message.replace(error.parameter, name)  # "no reference_image" → "no reference"
    if name and f"'{name}'" not in message:
        message += f" [input '{name}']"
    return LayoutRetouchError(message, parameter=name)


# A VALIDATE_INPUTS argument whose socket is not connected (ComfyUI passes None for a connected
# one: its value is not known before the run).
UNCONNECTED = object()


def check_before_run(
    *,
    prompt=None,
    concept_token=None,
    class_phrase=None,
    steps=None,
    lambdas: Mapping[str, Any],
    scale_with_steps=True,
    layout_source=None,
    latent=UNCONNECTED,
) -> str | None:
    """The refusal the node's run would give for these widget values, or None: what needs no model
    (the concept words, the prompt, λ1 / λ2 / mask start at this step count, the layout source).
    None values are inputs fed by another node (unknown before the run): not checked. `lambdas`:
    the node's own of λ1, λ2, mask start (the Layout node has λ1 only, the Retouch node no λ1)."""
    try:
        _check_values(prompt, concept_token, class_phrase, steps, lambdas, scale_with_steps)
        _check_layout_source(layout_source, latent)
    except LayoutRetouchError as e:
        return str(node_error(e))
    return None


def _check_values(prompt, concept_token, class_phrase, steps, lambdas, scale_with_steps) -> None:
    known = {k: v for k, v in lambdas.items() if v is not None}
    if scale_with_steps is not None:
        params = LayoutRetouchParams(scale_with_steps=scale_with_steps, **known)
        params.validate()  # the ranges that need no step count
        if steps is not None and len(known) == len(lambdas):
            schedule_of(steps, params, lambdas)
    if None not in (prompt, concept_token, class_phrase):
        derive_prompts(prompt, concept_token, class_phrase)  # the words, and the token in y_p
        return
    for name, value, message in (
        ("concept_token", concept_token, NO_CONCEPT_TOKEN),
        ("class_phrase", class_phrase, NO_CLASS_PHRASE),
    ):
        if value is not None and not value.strip():
            raise LayoutRetouchError(message, parameter=name)


def schedule_of(steps, params: LayoutRetouchParams, lambdas) -> Schedule:
    """The schedule the run would use, of a node with the knobs named in `lambdas` (the values are
    `params`'); a knob the node has not fits any step count."""
    unused_mask = FIELD_BY_NAME["mask_start"].default if params.scale_with_steps else steps + 1
    return Schedule.for_steps(
        steps,
        params.lambda1 if "lambda1" in lambdas else 0,
        params.lambda2 if "lambda2" in lambdas else 0,
        params.mask_start if "mask_start" in lambdas else unused_mask,
        scale=params.scale_with_steps,
    )


def _check_layout_source(layout_source, latent) -> None:
    if layout_source is None:
        return
    offered = CHOICES["layout_source"]
    if layout_source not in offered:
        raise LayoutRetouchError(
            f"layout_source '{layout_source}' is not offered in ComfyUI: choose "
            + " or ".join(f"'{c}'" for c in offered),
            parameter="layout_source",
        )
    if layout_source == "input" and latent is UNCONNECTED:
        raise LayoutRetouchError(INPUT_WITHOUT_LATENT, parameter="layout_source")


INPUT_WITHOUT_LATENT = (
    "layout_source 'input' retouches the connected 'latent' itself (no stage 1), but no latent is "
    "connected: connect one (e.g. VAE Encode of your picture), or choose 'inversion'"
)
