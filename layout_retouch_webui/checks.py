"""What is refused, or noted, before any compute. `check_request` runs every check and names every
problem in one message (the parameters' own checks are `LayoutRetouchParams.problems`)."""

from __future__ import annotations

import os
from typing import Callable

from layout_retouch_webui import hosts, img2img, samplers
from layout_retouch_webui.settings import (
    SAM_SEEN,
    architecture_problem,
    loaded_unet_shapes,
    sam_choices,
)
from layout_retouch_webui.vanilla import VANILLA_UNETS
from lib_layout_retouch.errors import LayoutRetouchError, combine
from lib_layout_retouch.params import NO_SAM, LayoutRetouchParams
from lib_layout_retouch.prompts import (
    LORA_TAG_FIX,
    derive_prompts,
    lora_names,
    strip_extra_networks,
)
from lib_layout_retouch.subjects import subject_loras


def check_request(p, params: LayoutRetouchParams) -> None:
    """Everything that can be checked before any compute, in ONE error naming every problem: the
    parameters' own (`LayoutRetouchParams.problems`), then what needs the WebUI (one per
    parameter: a λ1 out of range is said once, with the sampler's bound)."""
    problems = params.problems()
    if params.enabled:
        problems += host_problems(p, params)
    if problems:
        raise combine(problems)


def check_host(p, params: LayoutRetouchParams) -> None:
    """The checks that need the WebUI, in one error."""
    problems = host_problems(p, params)
    if problems:
        raise combine(problems)


def host_problems(p, params: LayoutRetouchParams) -> list[LayoutRetouchError]:
    """What the WebUI's state refuses: the kind of generation and model first (alone: nothing else
    can be judged on a model the retouch does not run on), then each independent check."""
    host = hosts.current()
    try:
        check_processing(p)
        host.check_model(p)
    except LayoutRetouchError as e:
        return [e]
    return collect(
        lambda: host.check_params(p, params),
        lambda: check_schedule(p, params),
        lambda: img2img.check(p, params),
        lambda: check_refiner(p),
        lambda: check_sam(params),
        lambda: check_vanilla_checkpoint(p, params),
        lambda: check_prompt(p, params),
    )


def collect(*checks: Callable[[], None]) -> list[LayoutRetouchError]:
    """The problems the checks raise, each check run (a LayoutRetouchError stops only its own)."""
    problems = []
    for check in checks:
        try:
            check()
        except LayoutRetouchError as e:
            problems.extend(e.problems)
    return problems


def check_processing(p) -> None:
    from modules.processing import StableDiffusionProcessingTxt2Img

    if not isinstance(p, StableDiffusionProcessingTxt2Img) and not img2img.is_img2img(p):
        raise LayoutRetouchError(
            f"Layout-and-Retouch works in txt2img and img2img, not in {type(p).__name__}"
        )


def check_schedule(p, params: LayoutRetouchParams) -> None:
    """λ1, λ2 and mask start at the steps both stages run, in one check. λ1 counts the steps the
    host's sampler really runs (DDIM at 10 steps runs 9: λ1 ≤ 8) — its one bound; in img2img the
    message says how many steps img2img runs."""
    steps = img2img.steps_run(p, params.layout_source)
    sampler = samplers.of(p) if params.runs_stage1 else None
    try:
        params.schedule(steps, sampler=sampler)
    except LayoutRetouchError as e:
        where = img2img.steps_words(p, params.layout_source)
        if not where:
            raise
        fix = (
            ""
            if params.layout_source == "input"
            else ": raise the denoising strength or the steps, or lower the value"
        )
        raise combine(
            [
                LayoutRetouchError(f"{part.message} — {where}{fix}", part.parameter)
                for part in e.problems
            ]
        ) from None


def check_refiner(p) -> None:
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


def check_sam(params: LayoutRetouchParams) -> None:
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


def check_vanilla_checkpoint(p, params: LayoutRetouchParams) -> None:
    if not (params.needs_vanilla_checkpoint and params.vanilla_checkpoint):
        return  # empty: the parameters' own check says so
    info = hosts.current().checkpoint(params.vanilla_checkpoint)
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


def check_prompt(p, params: LayoutRetouchParams) -> None:
    """The concept token must be in the prompt (the run itself would say so, after the others)."""
    if not (params.concept_token and params.class_phrase):
        return  # empty: the parameters' own check says so
    prompt = p.prompt if isinstance(p.prompt, str) else p.prompt[0]
    derive_prompts(
        strip_extra_networks(prompt or ""),
        params.concept_token,
        params.class_phrase,
        params.reference_prompt or None,
    )


def check_before_sampling(p, params: LayoutRetouchParams) -> None:
    """Problems that would otherwise only show mid-sampling: refused here, before any compute."""
    host = hosts.current()
    steps = img2img.steps_run(p, params.layout_source)
    if params.several_subjects:
        # each LoRA subject's tag in the prompt (the run maps them to the loaded networks)
        prompt = p.prompt if isinstance(p.prompt, str) else p.prompt[0]
        subject_loras(params.all_subjects(), lora_names(prompt or ""))
    elif (
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
