"""The two stages as the nodes run them, over ComfyUI calls handed in (`calls`: glue.ComfyCalls in
ComfyUI, a stand-in in the tests), so this module imports no ComfyUI.

Stage 1 runs ComfyUI's own sampler (the user's sampler and scheduler, ComfyUI's previews and model
patches), split at λ1 like two KSamplerAdvanced nodes: steps 0…λ1 on the vanilla MODEL with y_p⁻,
λ1…steps on the personalized MODEL with y_p. The second pass continues the first exactly: its noise
is chosen so that latent + σ_λ1·noise is the first pass's output, which also keeps an inpaint mask's
outside on the input's own noisy latents. The retouch (stage 2) is the library's, on a clone of the
personalized MODEL, with the library's always-restoring attention patch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from layout_retouch_comfy import inputs, tensors, texts
from lib_layout_retouch import job as J
from lib_layout_retouch.adapters.comfy.flux import check_blocks_free, comfy_flux_model
from lib_layout_retouch.adapters.comfy.sd import (
    ComfyModel,
    check_attention_free,
    check_same_architecture,
    check_supported,
    is_flux,
)
from lib_layout_retouch.dit.flux.family import DEFAULT_GUIDANCE, stage1_layout_refusal
from lib_layout_retouch.errors import Interrupted, LayoutRetouchError
from lib_layout_retouch.params import FIELD_BY_NAME
from lib_layout_retouch.retouch.generate import to_uint8

log = logging.getLogger("layout_retouch")
FIELD_MASK_START_DEFAULT = FIELD_BY_NAME["mask_start"].default


class Progress:
    """One ComfyUI progress bar over every phase: stage 1's sampler steps, the inversions, the retouch.
    Phases are laid end to end in the order they first report."""

    def __init__(self, bar, total: int, previewer=None):
        self.bar, self.total, self.previewer = bar, max(1, total), previewer
        self.offsets: dict[str, int] = {}
        self.done = 0
        self.current = 0

    def __call__(self, phase: str, s: int, total: int) -> None:
        if phase not in self.offsets:
            self.offsets[phase] = self.done
        self.current = self.offsets[phase] + s
        self.done = max(self.done, self.offsets[phase] + total)
        self.bar.update_absolute(min(self.current, self.total), self.total)

    def sampler_callback(self, phase: str):
        """A ComfyUI sampler callback(step, x0, x, total_steps) reporting as `phase`."""

        def callback(step, x0, x, total_steps):
            self(phase, step + 1, total_steps)
            if self.previewer is not None:
                image = self.previewer.decode_latent_to_preview_image("JPEG", x0)
                self.bar.update_absolute(min(self.current, self.total), self.total, image)

        return callback

    def preview(self, z: torch.Tensor) -> None:
        if self.previewer is not None:
            image = self.previewer.decode_latent_to_preview_image("JPEG", z)
            self.bar.update_absolute(min(self.current, self.total), self.total, image)


@dataclass
class Outputs:
    retouched: dict
    layout: dict
    mask: torch.Tensor
    attention: torch.Tensor
    info: str = ""  # texts.info_text: the values used, the mask kind, the notes

    def as_tuple(self) -> tuple:
        return (self.retouched, self.layout, self.mask, self.attention, self.info)


def check_models(model, vanilla_model) -> None:
    check_supported(model, "model")
    check_free = check_blocks_free if is_flux(model) else check_attention_free
    check_free(model, "model")
    if vanilla_model is not None:
        check_same_architecture(model, vanilla_model, "vanilla_model")
        check_free(vanilla_model, "vanilla_model")


def with_guidance(conditioning, guidance: float) -> list:
    """The CONDITIONING with Flux's distilled guidance set, as the FluxGuidance node sets it
    (`node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})`)."""
    return [[t, {**d, "guidance": guidance}] for t, d in conditioning]


def encoder(calls, model, guidance: float):
    """CLIPTextEncode for `model`: Flux's conditioning carries the distilled guidance."""
    if not is_flux(model):
        return calls.encode
    return lambda clip, text: with_guidance(calls.encode(clip, text), guidance)


def continuation_noise(model, x1, latent_image, sigma: float) -> torch.Tensor:
    """The second pass's noise, so that it starts where the first stopped (raw latents in, the
    LATENT's dtype out). ComfyUI starts a pass at x = noise_scaling(σ, noise, latent) and returns
    inverse_noise_scaling(σ_last, x): ε-models x = latent + σ·noise, returned as is; the flow (Flux,
    `CONST`) x = σ·noise + (1−σ)·latent, returned divided by (1−σ). An all-zero LATENT (an empty
    image) is not shifted into the model's scale (`CFGGuider.inner_sample`): Flux's shift factor
    would move it."""
    base = model.model
    x = base.process_latent_in(x1.float())
    latent = latent_image.float()
    if torch.count_nonzero(latent) > 0:
        latent = base.process_latent_in(latent)
    if is_flux(model):
        noise = (1 - sigma) * (x - latent) / sigma  # x·(1−σ) = σ·noise + (1−σ)·latent
    else:
        noise = (x - latent) / sigma
    return noise.to(latent_image.dtype)


def make_job(
    values: dict,
    reference,
    *,
    prompt,
    negative_prompt,
    steps,
    cfg,
    width,
    height,
    vanilla: bool,
    img2img: bool,
) -> J.RetouchJob:
    params = inputs.make_params(values, tensors.reference_photos(reference), vanilla=vanilla)
    return J.RetouchJob(
        params,
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        width=width,
        height=height,
        guidance_scale=cfg,
        img2img=img2img,
    )


def layout_job(
    prompt, negative_prompt, concept_token, class_phrase, *, steps, lambda1, scale_with_steps=True
):
    """What stage 1 alone needs (the Layout node): the schedule's λ1 and the prompts y_p, y_p⁻.
    λ2 and the mask step are the retouch's: set so that they fit any step count."""
    from types import SimpleNamespace

    from lib_layout_retouch.params import LayoutRetouchParams
    from lib_layout_retouch.prompts import derive_prompts

    params = LayoutRetouchParams(
        lambda1=lambda1,
        lambda2=0,
        mask_start=FIELD_MASK_START_DEFAULT if scale_with_steps else steps + 1,
        scale_with_steps=scale_with_steps,
    )
    params.validate()
    return SimpleNamespace(
        schedule=params.schedule(steps),
        prompts=derive_prompts(prompt, concept_token, class_phrase),
        negative_prompt=negative_prompt,
    )


def stage1(
    calls,
    job: J.RetouchJob,
    *,
    model,
    vanilla_model,
    clip,
    vanilla_clip,
    latent: dict,
    seed,
    steps,
    cfg,
    sampler_name,
    scheduler,
    denoise,
    noise_mask,
    progress,
    guidance: float = DEFAULT_GUIDANCE,
) -> torch.Tensor:
    """The layout: raw latents (B, C, h, w). `guidance`: Flux's distilled guidance (FluxGuidance)."""
    vanilla_model = vanilla_model or model
    vanilla_clip = vanilla_clip or clip
    latent_image = calls.fix_empty_latent_channels(model, latent["samples"])
    noise = calls.prepare_noise(latent_image, seed, latent.get("batch_index"))
    encode = encoder(calls, model, guidance)
    positive = encode(clip, job.prompts.personalized)
    negative = encode(clip, job.negative_prompt)
    l1 = job.schedule.lambda1
    common = dict(noise_mask=noise_mask, seed=seed, denoise=denoise)
    if l1 == 0:
        return calls.sample(
            model,
            noise,
            steps,
            cfg,
            sampler_name,
            scheduler,
            positive,
            negative,
            latent_image,
            callback=progress.sampler_callback("layout"),
            **common,
        )
    layout_positive = encode(vanilla_clip, job.prompts.layout)
    layout_negative = encode(vanilla_clip, job.negative_prompt)
    x1 = calls.sample(
        vanilla_model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        layout_positive,
        layout_negative,
        latent_image,
        start_step=0,
        last_step=l1,
        force_full_denoise=False,
        callback=progress.sampler_callback("layout, vanilla steps"),
        **common,
    )
    # Continue from x1 on the personalized model (`continuation_noise`).
    sigma = float(calls.sigmas(model, steps, sampler_name, scheduler, denoise)[l1])
    noise2 = continuation_noise(model, x1, latent_image, sigma)
    return calls.sample(
        model,
        noise2,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        start_step=l1,
        last_step=steps,
        force_full_denoise=True,
        callback=progress.sampler_callback("layout"),
        **common,
    )


def library_model(calls, model, clip, vae, scheduler: str, guidance: float):
    """The library's model of a (cloned) MODEL: ComfyModel (SD1.x/SDXL: ε, the library's DDIM) or
    the Flux adapter, whose flow sampler runs on ComfyUI's σ list for `scheduler`."""
    if not is_flux(model):
        return ComfyModel(model, clip, vae, load_model=calls.load)

    def sigmas(steps, latent_hw):
        return [float(s) for s in calls.sigmas(model, steps, "euler", scheduler, 1.0)]

    return comfy_flux_model(
        model, clip, vae, load_model=calls.load, sigmas=sigmas, guidance=guidance
    )


def with_layout_source(values: dict, layout_given: bool, flux: bool) -> dict:
    """The values with the layout source the nodes can serve: 'input' for a given layout; 'stage1'
    (DDIM's trajectory, which ComfyUI's sampler does not give) inverted on SD, refused on Flux."""
    values = dict(values)
    if layout_given:
        values["layout_source"] = "input"
    elif values.get("layout_source") == "stage1" and flux:
        raise stage1_layout_refusal()
    elif values.get("layout_source") == "stage1":
        log.warning(
            "Layout-and-Retouch: layout_source 'stage1' needs the library's DDIM stage 1; "
            "ComfyUI's sampler drew the layout, so it is inverted"
        )
        values["layout_source"] = "inversion"
    return values


def check_flow_schedule(lib_model, steps: int, latent_hw, scheduler: str) -> None:
    """The flow sampler needs σ strictly falling to 0: refuse a scheduler whose list is not."""
    try:
        lib_model.schedule(steps, latent_hw)
    except ValueError as e:
        raise LayoutRetouchError(
            f"the scheduler '{scheduler}' gives Flux a σ list the flow retouch cannot step ({e}); "
            "use 'simple' (Flux's default) or 'beta'",
            parameter="scheduler",
        ) from e


def subject_rows(lib_model, job) -> list[int]:
    """The conditioning rows of the concept token and class phrase in y_p, as the model's family
    reads them (CLIP's 77-token chunks for SD, T5's SentencePiece pieces for Flux)."""
    phrases = [job.prompts.concept_token, job.prompts.class_phrase]
    return lib_model.family.subject_tokens(lib_model, job.prompts.personalized, phrases)


def layout_and_retouch(
    calls,
    *,
    model,
    clip,
    vae,
    reference,
    prompt,
    negative_prompt,
    seed,
    steps,
    cfg,
    sampler_name,
    scheduler,
    width=512,
    height=512,
    batch_size=1,
    vanilla_model=None,
    vanilla_clip=None,
    latent=None,
    denoise=1.0,
    mask=None,
    layout: Optional[dict] = None,
    guidance: float = DEFAULT_GUIDANCE,
    sam=None,
    subject_mask=None,
    **values: Any,
) -> Outputs:
    """Both stages (or, with `layout` given, the retouch of that layout only). Errors a user can fix
    raise LayoutRetouchError naming the node input; Cancel raises ComfyUI's interrupt. `sam`: a
    SubjectSegmenter (the SAM loader node's) for the SAM+CA mask; `subject_mask`: a MASK that bounds
    the retouch but not stage 1 (txt2img: where the subject is)."""
    try:
        return _run(
            calls,
            model=model,
            clip=clip,
            vae=vae,
            reference=reference,
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            width=width,
            height=height,
            batch_size=batch_size,
            vanilla_model=vanilla_model,
            vanilla_clip=vanilla_clip,
            latent=latent,
            denoise=denoise,
            mask=mask,
            layout=layout,
            guidance=guidance,
            sam=sam,
            subject_mask=subject_mask,
            values=values,
        )
    except LayoutRetouchError as e:
        raise inputs.node_error(e) from e
    except Interrupted as e:
        raise calls.interrupt_exception() from e


def _run(
    calls,
    *,
    model,
    clip,
    vae,
    reference,
    prompt,
    negative_prompt,
    seed,
    steps,
    cfg,
    sampler_name,
    scheduler,
    width,
    height,
    batch_size,
    vanilla_model,
    vanilla_clip,
    latent,
    denoise,
    mask,
    layout,
    guidance,
    values,
    sam=None,
    subject_mask=None,
) -> Outputs:
    check_models(model, vanilla_model)
    flux = is_flux(model)
    source = latent if layout is None else layout
    if source is None:
        samples = torch.zeros(batch_size, 4, height // 8, width // 8)
        source = {"samples": samples}
    samples = source["samples"]
    n, (h, w) = samples.shape[0], tuple(samples.shape[-2:])
    values = with_layout_source(values, layout is not None, flux)
    job = make_job(
        values,
        reference,
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        cfg=cfg,
        width=8 * w,
        height=8 * h,
        vanilla=vanilla_model is not None,
        img2img=latent is not None or layout is not None,
    )
    noise_mask = source.get("noise_mask")
    if mask is not None:
        noise_mask = mask
    user_mask = tensors.retouch_mask(noise_mask, subject_mask, n, (h, w))

    # Never the user's MODEL objects: clones (the weights are shared; the attention patch restores).
    model = model.clone()
    vanilla_model = vanilla_model.clone() if vanilla_model is not None else None
    runs_stage1 = job.params.runs_stage1
    refs = len(job.references)
    work = steps * (1 + refs + 1) + (steps if runs_stage1 else 0)
    progress = Progress(calls.progress_bar(work), work, calls.previewer(model))
    if runs_stage1:
        layout_raw = stage1(
            calls,
            job,
            model=model,
            vanilla_model=vanilla_model,
            clip=clip,
            vanilla_clip=vanilla_clip,
            latent=source,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            denoise=denoise,
            noise_mask=noise_mask,
            progress=progress,
            guidance=guidance,
        )
    else:
        layout_raw = samples
    # the retouch's σ list (Flux): the stage-1 scheduler's, "simple" for a layout from elsewhere
    retouch_scheduler = scheduler if runs_stage1 else "simple"
    lib_model = library_model(calls, model, clip, vae, retouch_scheduler, guidance)
    if flux:
        check_flow_schedule(lib_model, steps, (h, w), retouch_scheduler)
    calls.load(model)
    subject = subject_rows(lib_model, job)
    layout_latents = lib_model.model_latents(layout_raw.to(lib_model.device))
    # SAM segments the decoded layout (the WebUI's stage 2 does the same)
    layout_images = to_uint8(lib_model.decode(layout_latents)) if sam is not None else None
    result = job.retouch(
        lib_model,
        layout_latents,
        subject_tokens=subject,
        model_key=lib_model.model_key(),
        progress=progress,
        should_stop=calls.interrupted,
        user_mask=None if user_mask is None else user_mask.to(layout_latents),
        segmenter=sam,
        layout_images=layout_images,
    )
    for note in job.notes:
        log.info("Layout-and-Retouch: %s", note)
    info = texts.info_text(
        job.schedule, mask_kind=result.mask_kind, notes=job.notes, stage1=runs_stage1
    )
    hw = (8 * h, 8 * w)
    out = {"samples": lib_model.raw_latents(result.latents).cpu()}
    return Outputs(
        retouched=out,
        layout={"samples": layout_raw.cpu()},
        mask=tensors.maps_to_mask(result.masks, n, hw),
        attention=tensors.mask_to_image(tensors.maps_to_mask(result.ca_maps, n, hw)),
        info=info,
    )
