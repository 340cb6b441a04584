"""Stage 1: the host samples the layout; we switch prompt, UNet and LoRA per step.

For steps s ≤ λ1 the vanilla denoiser ε with the prompt y_p⁻ (no concept token), then the
personalized ε* with y_p. The switch happens in the CFG-denoiser callback, which the host calls
before every model call with the conditioning it is about to use; it acts only for a `p` that
carries a live run (`run.of(p)`), and `end` undoes everything in the sampling wrapper's `finally`.
"""

from __future__ import annotations

import math

import torch
from modules import shared

from layout_retouch_webui import options
from layout_retouch_webui import run as lr_run
from layout_retouch_webui.options import opt
from layout_retouch_webui.vanilla import VANILLA_TEXT_ENCODERS, VANILLA_UNETS
from lib_layout_retouch import conditioning as lr_cond
from lib_layout_retouch import logs
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.progress import STAGE1_PERSONAL, STAGE1_VANILLA, ProgressPlan
from lib_layout_retouch.prompts import LORA_TAG_FIX
from lib_layout_retouch.subjects import subject_loras
from lib_layout_retouch.unet import text_encoders

logger = logs.attach_console()


def on_cfg_denoiser(params):
    """Stage 1: (ε, y_p⁻) for s ≤ λ1, then (ε*, y_p)."""
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    run = lr_run.of(p)
    if run is None or not run.stage1_active:
        return
    # the sampler step of the model call about to run, 1-based (denoiser.step counts model calls
    # exactly, unlike sampling_step; a second-order step makes two)
    s = run.sampler.step_of(int(denoiser.step) + 1)
    if run.params.layout_source == "stage1" and len(run.trajectory) < s:
        run.trajectory.append(run.host.stage1_latent(p, params).detach().clone())
    if run.loras_off_in_stage1 and run.lora_nets and run.lora_restore is None:
        # several subjects: their LoRAs stay off for the whole of stage 1 (each acts in its own
        # region in the retouch); here, not in `begin` (see below)
        run.lora_restore = run.host.loras_off_in_unet(p, run.lora_nets)
    if run.job.uses_vanilla(s):
        tc = params.text_cond
        if isinstance(tc, (torch.Tensor, dict)):  # SD1: a tensor; SDXL: {"crossattn", "vector"}
            cond = lr_cond.expand(lr_cond.like(run.layout_cond, tc), lr_cond.batch_size(tc))
            if isinstance(tc, dict) and type(tc) is not dict:
                cond = type(tc)(
                    cond
                )  # the WebUI's DictWithShape: it reads `.shape` right after the hook
            params.text_cond = cond
        if run.vanilla_unet is not None:
            run.host.set_unet(p, run.vanilla_unet)
        if run.lora_nets and run.lora_restore is None:
            # Here, not in `begin`: a host may (re)merge LoRA weights when sampling loads the model.
            run.lora_restore = run.host.loras_off_in_unet(p, run.lora_nets)
    elif run.switched_at is None:
        run.switched_at = s
        restore(p, run, loras=not run.loras_off_in_stage1)
        logger.info(
            f"stage 1: switched to personalized UNet at step {s} "
            f"(after {int(denoiser.step)} model calls)"
        )


def on_progress_denoiser(params):
    """One progress bar over both stages: during stage 1 the bar's length includes stage 2 (the
    sampler set it to its own step count at launch), and the text names the phase. Note: while an
    enabled run samples, `CFGDenoiserParams.total_sampling_steps` reports this length too."""
    p = getattr(getattr(params, "denoiser", None), "p", None)
    run = lr_run.of(p)
    if run is None or not run.stage1_active:
        return
    shared.state.sampling_steps = math.ceil(run.progress.total)  # whole steps (console bar)
    s = run.sampler.step_of(int(params.denoiser.step) + 1)
    shared.state.textinfo = ProgressPlan.text(
        STAGE1_VANILLA if run.job.uses_vanilla(s) else STAGE1_PERSONAL
    )


def restore(p, run, loras: bool = True) -> None:
    """The personalized UNet and (`loras`) the LoRA back in place."""
    if run.personal_unet is not None:
        run.host.set_unet(p, run.personal_unet)
    if loras and run.lora_restore is not None:
        restore_loras, run.lora_restore = run.lora_restore, None
        restore_loras()


def begin(p, run) -> None:
    host = run.host
    run.personal_unet = host.unet(p)
    # DreamBooth (several subjects: any of them, one multi-concept checkpoint): the vanilla UNet
    dreambooth = run.params.needs_vanilla_checkpoint
    info = None
    if dreambooth:
        info = host.checkpoint(run.params.vanilla_checkpoint)
        run.vanilla_unet = VANILLA_UNETS.get(info, run.personal_unet)
        host.place_vanilla_unet(p, run.vanilla_unet)
    nets = stage1_loras(p, run)
    # y_p⁻ for the vanilla steps: DreamBooth through the vanilla checkpoint's text encoder (unless asked
    # otherwise), LoRA with the network off in the text encoder.
    slots, vanilla_te = [], []
    if dreambooth and run.params.stage1_text_encoder == "vanilla":
        slots = host.text_encoder_slots(p)
        if slots:
            vanilla_te = VANILLA_TEXT_ENCODERS.get(info, slots)
        else:
            run.job.add_note(host.text_encoder_note(p))
    host.text_encoders_to(p, vanilla_te, "device")
    try:
        with host.loras_off_in_text_encoder(p, nets), text_encoders.swapped(slots, vanilla_te):
            run.layout_cond = host.encode_prompt(p, run.job.prompts.layout)
        if vanilla_te:
            logger.info("stage 1: y_p⁻ encoded with the vanilla checkpoint's text encoder")
    finally:
        host.text_encoders_to(p, vanilla_te, "cpu")
    run.lora_nets = nets  # switched off in the UNet at the first vanilla step
    run.stage1_active = True
    run.switched_at = None
    run.trajectory = []


def stage1_loras(p, run) -> list:
    """The LoRA networks stage 1 switches off. One subject learned as a LoRA: every active one,
    for the vanilla steps. Several subjects: the LoRA subjects' own (`run.subject_loras`, one per
    subject, None for the others), for the whole of stage 1; other LoRAs (a style) stay on."""
    host, params = run.host, run.params
    if run.job.several_subjects:
        run.subject_loras = subject_networks(p, run)
        run.loras_off_in_stage1 = any(n is not None for n in run.subject_loras)
        return [n for n in run.subject_loras if n is not None]
    lora_off = params.personalization == "lora" and run.job.schedule.lambda1 > 0
    nets = host.active_loras(p) if lora_off else []
    if lora_off and not nets:
        raise LayoutRetouchError(
            f"personalization is 'lora' but no LoRA is active: {LORA_TAG_FIX}",
            parameter="personalization",
        )
    return nets


def subject_networks(p, run) -> list:
    """Each subject's LoRA network as the host holds it (None: the subject has none), by the
    names of the prompt's active LoRA tags (`subjects.subject_loras` says which is whose)."""
    tags = run.host.lora_tags(p)
    loaded = [name for name, _ in tags]
    try:
        names = subject_loras(run.params.all_subjects(), loaded)
    except LayoutRetouchError as e:  # the prompt's tags passed the check: one was not loaded
        raise LayoutRetouchError(
            f"{e.message} (the LoRAs the WebUI loaded for this image: {', '.join(loaded) or 'none'};"
            " a tag whose file is not in the LoRA folder is not loaded)",
            parameter=e.parameter,
        ) from None
    handles = dict(tags)
    return [None if name is None else handles[name] for name in names]


def end(p, run) -> None:
    run.stage1_active = False
    run.lora_nets = []
    restore(p, run)
    if run.vanilla_unet is not None:
        run.host.release_vanilla_unet(
            p, run.vanilla_unet, keep_on_cpu=bool(opt(options.VANILLA_ON_CPU))
        )
