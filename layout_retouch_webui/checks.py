"""What is refused, or noted, before any compute: the checks that need the WebUI (the parameters'
own checks are `LayoutRetouchParams.validate`)."""

from __future__ import annotations

import os

from layout_retouch_webui import hosts, img2img, samplers
from layout_retouch_webui.settings import (
    SAM_SEEN,
    architecture_problem,
    loaded_unet_shapes,
    sam_choices,
)
from layout_retouch_webui.vanilla import VANILLA_UNETS
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import NO_SAM, LayoutRetouchParams
from lib_layout_retouch.prompts import LORA_TAG_FIX, lora_names
from lib_layout_retouch.schedule import knob_words


def check_host(p, params: LayoutRetouchParams) -> None:
    """The checks that need the WebUI: model kind, lists of checkpoints/files."""
    from modules.processing import StableDiffusionProcessingTxt2Img

    host = hosts.current()
    if not isinstance(p, StableDiffusionProcessingTxt2Img) and not img2img.is_img2img(p):
        raise LayoutRetouchError(
            f"Layout-and-Retouch works in txt2img and img2img, not in {type(p).__name__}"
        )
    host.check_model(p)
    host.check_params(p, params)
    img2img.check(p, params)
    check_stage1_steps(p, params)
    refiner = getattr(p, "refiner_checkpoint", None)
    if (
        refiner not in (None, "", "None")
        and 0 < float(getattr(p, "refiner_switch_at", 1.0) or 0) < 1
    ):
        # The WebUI would load another model in the middle of sampling: stage 1's switch and the
        # retouch would then run on the refiner (not a personalized model).
        raise LayoutRetouchError(
            f"the WebUI's Refiner ('{refiner}') switches models during sampling, which "
            "Layout-and-Retouch cannot follow; turn Refiner off for retouched images",
            parameter="refiner_checkpoint",
        )
    name = params.sam_model
    if name != NO_SAM and (os.path.basename(name) != name or name in (".", "..") or "\\" in name):
        # A name from the list, never a path: API input must not open arbitrary files.
        raise LayoutRetouchError(
            f"SAM model '{name}' is a path; give a file name from the list of SAM "
            f"checkpoints ({', '.join(sam_choices())}) or 'none'",
            parameter="sam_model",
        )
    if name != NO_SAM and name not in sam_choices()[1:] and name not in SAM_SEEN:
        raise LayoutRetouchError(
            f"SAM model '{name}' is not in the list of SAM checkpoints "
            f"({', '.join(sam_choices())}); put the file in models/sam or choose 'none'",
            parameter="sam_model",
        )
    if params.needs_vanilla_checkpoint:
        info = host.checkpoint(params.vanilla_checkpoint)
        if info is None or not os.path.isfile(info.filename):
            raise LayoutRetouchError(
                f"vanilla checkpoint '{params.vanilla_checkpoint}' is not in the WebUI's "
                "checkpoint list; choose one from the list (refresh it after adding files)",
                parameter="vanilla_checkpoint",
            )
        # from the file's header, before its UNet is loaded (gigabytes for a real SDXL file)
        problem = architecture_problem(info.filename, loaded_unet_shapes(p))
        if problem:
            raise LayoutRetouchError(
                f"vanilla checkpoint '{params.vanilla_checkpoint}' {problem}; choose the checkpoint "
                "your DreamBooth model was trained from",
                parameter="vanilla_checkpoint",
            )


def check_stage1_steps(p, params: LayoutRetouchParams) -> None:
    """λ1 counts the steps the host's sampler really runs (DDIM at 10 steps runs 9): at least one of
    them must be left for the personalized model."""
    if not params.runs_stage1:
        return
    lambda1 = params.schedule(img2img.steps_run(p, params.layout_source)).lambda1
    if lambda1 == 0:
        return
    plan = samplers.of(p)
    if not plan.known:
        raise LayoutRetouchError(
            f"{knob_words('lambda1')} is {lambda1}, but the sampler '{plan.sampler}' decides its "
            "model calls while it runs, so its first steps cannot be given to the vanilla model: "
            "choose another sampler (the paper's is DDIM) or set it to 0",
            parameter="lambda1",
        )
    if lambda1 <= plan.steps - 1:
        return
    scaled = " (scaled with steps)" if params.scale_with_steps else ""
    where = img2img.steps_words(p, params.layout_source)
    where = f"; {where}" if where else ""
    if plan.steps < 2:
        fix = "raise the sampling steps" + (" or the denoising strength" if where else "")
        bound = "it runs no step for the personalized model"
    else:
        fix = "choose a smaller value or use more sampling steps"
        bound = f"it must be between 0 and {plan.steps - 1}"
    said = plan.words() or f"{plan.sampler} runs {plan.steps} steps"
    raise LayoutRetouchError(
        f"{knob_words('lambda1')} is {lambda1}{scaled}, but {said}{where}: {bound} "
        f"(at least one step is left for the personalized model): {fix}",
        parameter="lambda1",
    )


def check_before_sampling(p, params: LayoutRetouchParams) -> None:
    """Problems that would otherwise only show mid-sampling: refused here, before any compute."""
    host = hosts.current()
    steps = img2img.steps_run(p, params.layout_source)
    if (
        params.personalization == "lora"
        and params.runs_stage1
        and params.schedule(steps).lambda1 > 0
    ):
        prompts = p.all_prompts or [p.prompt if isinstance(p.prompt, str) else p.prompt[0]]
        if not any(lora_names(pr or "") for pr in prompts):
            raise LayoutRetouchError(
                f"personalization is 'lora' but the prompt has no LoRA tag: {LORA_TAG_FIX}",
                parameter="personalization",
            )
    if params.needs_vanilla_checkpoint:
        info = host.checkpoint(params.vanilla_checkpoint)
        VANILLA_UNETS.get(info, host.unet(p))  # loads (cached) and checks the architecture


def is_loaded_checkpoint(p, name: str) -> bool:
    host = hosts.current()
    info = host.checkpoint(name)
    loaded = host.loaded_checkpoint(p)
    return (
        info is not None
        and loaded is not None
        and info.filename == getattr(loaded, "filename", None)
    )


def host_notes(p, run) -> None:
    """Checks that only warrant a note in the infotext (the run still does what was asked)."""
    params = run.params
    img2img.notes(p, run)
    if params.needs_vanilla_checkpoint and is_loaded_checkpoint(p, params.vanilla_checkpoint):
        run.job.add_note(
            "the vanilla checkpoint is the loaded model itself: stage 1 only swaps the prompt; "
            "choose the checkpoint your DreamBooth model was trained from"
        )
    if params.personalization == "textual_inversion":
        names = hosts.current().embedding_names()
        if names is not None and params.concept_token not in names:
            known = ", ".join(names[:8]) if names else "none is installed"
            run.job.add_note(
                f"concept token '{params.concept_token}' is no installed Textual-Inversion embedding "
                f"({known}): the personalized steps read it as plain text"
            )
