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
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch

from layout_retouch_comfy import inputs, tensors, texts
from layout_retouch_comfy import subjects as S
from lib_layout_retouch import job as J
from lib_layout_retouch.adapters.comfy import GUIDANCE_DEFAULT, ModelFamily, model_family
from lib_layout_retouch.adapters.comfy import check_models as check_model_inputs
from lib_layout_retouch.errors import Interrupted, LayoutRetouchError
from lib_layout_retouch.params import FIELD_BY_NAME, LayoutRetouchParams
from lib_layout_retouch.progress import ProgressPlan
from lib_layout_retouch.prompts import RetouchPrompts, SubjectWords
from lib_layout_retouch.retouch import to_uint8
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.subjects import derive_subject_prompts, subject_error

log = logging.getLogger("layout_retouch")
FIELD_MASK_START_DEFAULT = FIELD_BY_NAME["mask_start"].default
# ComfyUI's bar counts whole ticks: TICKS per stage-1 step (the plan's unit), so that the
# inversions' half-unit steps move it too.
TICKS = 10


class Progress:
    """One ComfyUI progress bar over every phase, weighted as the WebUI's bar (`ProgressPlan`: each
    phase by the rows its model calls run, measured in stage-1 steps): stage 1's sampler passes,
    then the inversions and the retouch. Without a plan (the Layout node) the bar is stage 1's."""

    def __init__(self, bar, stage1_steps: int, plan: Optional[ProgressPlan] = None, previewer=None):
        self.bar, self.previewer = bar, previewer
        self.stage1_steps = stage1_steps
        self.current = 0
        self.replan(plan)

    def replan(self, plan: Optional[ProgressPlan]) -> None:
        """Another plan (e.g. once the cached inversions are known): the bar's length changes,
        the position does not go back."""
        self.plan = plan
        length = plan.total if plan is not None else self.stage1_steps
        self.total = max(1, round(length * TICKS))

    def _at(self, position: float, image=None) -> None:
        self.current = max(self.current, min(round(position * TICKS), self.total))
        if image is None:
            self.bar.update_absolute(self.current, self.total)
        else:
            self.bar.update_absolute(self.current, self.total, image)

    def __call__(self, phase: str, s: int, total: int) -> None:
        """The library's report: step `s` of `total` of a stage-2 phase (ProgressPlan.PHASES)."""
        if self.plan is not None:
            self._at(self.plan.position(phase, s, total))

    def sampler_callback(self, start: int = 0):
        """A ComfyUI sampler callback(step, x0, x, total_steps) of a stage-1 pass that starts at
        stage-1 step `start`."""

        def callback(step, x0, x, total_steps):
            image = self._preview_image(x0) if self.previewer is not None else None
            self._at(start + step + 1, image)

        return callback

    def _preview_image(self, z: torch.Tensor):
        return self.previewer.decode_latent_to_preview_image("JPEG", z)

    def preview(self, z: torch.Tensor) -> None:
        if self.previewer is not None:
            self.bar.update_absolute(self.current, self.total, self._preview_image(z))


@dataclass
class Outputs:
    retouched: dict
    layout: dict
    mask: torch.Tensor
    attention: torch.Tensor
    info: str = ""  # texts.info_text: the values used, the mask kind, the notes
    regions: Optional[torch.Tensor] = None  # IMAGE: each subject's region in its colour

    def as_tuple(self) -> tuple:
        return (self.retouched, self.layout, self.mask, self.attention, self.info, self.regions)


@dataclass
class Request:
    """One run of the Sampler or the Retouch node: the sockets and widgets it has by name, and the
    FIELDS values (`values`: the concept words, λ1/λ2/mask start, the advanced inputs)."""

    model: Any
    clip: Any
    vae: Any
    reference: Any
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    width: int = 512
    height: int = 512
    batch_size: int = 1
    vanilla_model: Any = None
    vanilla_clip: Any = None
    latent: Optional[dict] = None
    denoise: float = 1.0
    mask: Optional[torch.Tensor] = None
    layout: Optional[dict] = None  # given: the retouch of this layout only (no stage 1)
    guidance: float = GUIDANCE_DEFAULT
    sam: Any = None  # a SubjectSegmenter (the SAM loader node's): the SAM+CA mask
    subject_mask: Optional[torch.Tensor] = None  # bounds the retouch, not stage 1
    subjects: Optional[tuple] = None  # the chained Subject nodes' (subjects.Subject)
    values: dict = field(default_factory=dict)

    @classmethod
    def of(cls, **kw: Any) -> "Request":
        """The node's keyword arguments: its named inputs, the rest are `values`."""
        named = {f.name for f in fields(cls)} - {"values"}
        values = {k: v for k, v in kw.items() if k not in named}
        return cls(**{k: v for k, v in kw.items() if k in named}, values=values)


def check_models(model, vanilla_model) -> ModelFamily:
    """Refuse MODELs the retouch cannot run on (naming the input); the family of `model`."""
    return check_model_inputs(model, vanilla_model)


def encoder(calls, model, guidance: float):
    """CLIPTextEncode for `model`, as its family's sampler reads it (Flux: with the guidance)."""
    return model_family(model).encoder(calls.encode, guidance)


def continuation_noise(model, x1, latent_image, sigma: float) -> torch.Tensor:
    """The second pass's noise, so that it starts where the first stopped (raw latents in, the
    LATENT's dtype out): ComfyUI starts a pass at x = noise_scaling(σ, noise, latent) and returns
    inverse_noise_scaling(σ_last, x), the family's (`ModelFamily.continuation_noise`). An all-zero
    LATENT (an empty image) is not shifted into the model's scale (`CFGGuider.inner_sample`):
    Flux's shift factor would move it."""
    base = model.model
    x = base.process_latent_in(x1.float())
    latent = latent_image.float()
    if torch.count_nonzero(latent) > 0:
        latent = base.process_latent_in(latent)
    noise = model_family(model).continuation_noise(x, latent, sigma)
    return noise.to(latent_image.dtype)


def run_subjects(request: Request) -> list[S.Subject]:
    """Every subject of the request: the node's own (its `reference` and concept words) when its
    `reference` is connected, then the chained Subject nodes' (`subjects.run_subjects`)."""
    own = None
    if request.reference is not None:
        own = S.Subject(
            request.reference,
            inputs.own_personalization(request.vanilla_model is not None),
            request.values.get("concept_token", ""),
            request.values.get("class_phrase", ""),
        )
    return S.run_subjects(own, request.subjects)


def subject_params(subjects) -> list:
    """The library's subjects, each with its photos (a refusal names the subject, after the
    first)."""
    out = []
    for k, subject in enumerate(subjects):
        try:
            photos = tensors.reference_photos(subject.reference)
        except LayoutRetouchError as e:
            raise subject_error(e.args[0], k, e.parameter or "reference_image") from e
        out.append(subject.params(photos))
    return out


def make_job(values: dict, subjects, request: Request, latent_hw) -> J.RetouchJob:
    """The library's job of a request whose latents are `latent_hw` (h, w)."""
    params = inputs.make_params(
        values, subject_params(subjects), vanilla=request.vanilla_model is not None
    )
    h, w = latent_hw
    return J.RetouchJob(
        params,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        width=8 * w,
        height=8 * h,
        guidance_scale=request.cfg,
        img2img=request.latent is not None or request.layout is not None,
    )


@dataclass(frozen=True)
class LayoutJob:
    """What stage 1 alone needs (the Layout node): the schedule's λ1 and the prompts y_p, y_p⁻
    (`stage1` reads a RetouchJob's same three)."""

    schedule: Schedule
    prompts: RetouchPrompts
    negative_prompt: str


def layout_job(
    prompt,
    negative_prompt,
    concept_token,
    class_phrase,
    *,
    steps,
    lambda1,
    scale_with_steps=True,
    subjects=None,
) -> LayoutJob:
    """The Layout node's job. λ2 and the mask step are the retouch's: set so that they fit any step
    count. `subjects`: chained Subject nodes, whose words y_p⁻ also replaces (the node's own words
    first, unless a Subject node has its concept token)."""
    params = LayoutRetouchParams(
        lambda1=lambda1,
        lambda2=0,
        mask_start=FIELD_MASK_START_DEFAULT if scale_with_steps else steps + 1,
        scale_with_steps=scale_with_steps,
    )
    params.validate()
    own = SubjectWords(concept_token, class_phrase)
    chain = [s.words for s in subjects or ()]
    tokens = {w.concept_token.lower() for w in chain}
    words = chain if (concept_token or "").strip().lower() in tokens else [own, *chain]
    return LayoutJob(
        schedule=params.schedule(steps),
        prompts=derive_subject_prompts(prompt, words),
        negative_prompt=negative_prompt,
    )


def stage1(
    calls,
    job,
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
    guidance: float = GUIDANCE_DEFAULT,
) -> torch.Tensor:
    """The layout: raw latents (B, C, h, w). `job`: a RetouchJob or LayoutJob; `guidance`: the
    distilled guidance of the families that read one (FluxGuidance)."""
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
            callback=progress.sampler_callback(0),
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
        callback=progress.sampler_callback(0),
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
        callback=progress.sampler_callback(l1),
        **common,
    )


def library_model(calls, model, clip, vae, scheduler: str, guidance: float):
    """The library's model of a (cloned) MODEL, its family's: a flow sampler steps on ComfyUI's σ
    list for `scheduler`."""

    def sigmas(steps, latent_hw):
        return [float(s) for s in calls.sigmas(model, steps, "euler", scheduler, 1.0)]

    return model_family(model).model(
        model, clip, vae, load_model=calls.load, sigmas=sigmas, guidance=guidance
    )


def with_layout_source(values: dict, layout_given: bool, family: ModelFamily) -> dict:
    """The values with the layout source the nodes can serve: 'input' for a given layout; for
    'stage1' (DDIM's trajectory, which ComfyUI's sampler does not give) what the family says."""
    values = dict(values)
    if layout_given:
        values["layout_source"] = "input"
    elif values.get("layout_source") == "stage1":
        values["layout_source"] = family.stage1_layout_source()
        log.warning(
            "Layout-and-Retouch: layout_source 'stage1' needs the library's DDIM stage 1; "
            "ComfyUI's sampler drew the layout, so it is inverted"
        )
    return values


def layout_and_retouch(calls, **kw: Any) -> Outputs:
    """Both stages (or, with `layout` given, the retouch of that layout only) of a `Request`
    (`Request.of(**kw)`). Errors a user can fix raise LayoutRetouchError naming the node input;
    Cancel raises ComfyUI's interrupt."""
    try:
        return _run(calls, Request.of(**kw))
    except LayoutRetouchError as e:
        raise inputs.node_error(e) from e
    except Interrupted as e:
        raise calls.interrupt_exception() from e


def _source_latent(request: Request) -> dict:
    """The LATENT stage 1 starts from (or, with a layout, the layout): an empty one by default."""
    source = request.latent if request.layout is None else request.layout
    if source is None:
        samples = torch.zeros(request.batch_size, 4, request.height // 8, request.width // 8)
        source = {"samples": samples}
    return source


def progress_plan(job: J.RetouchJob, n: int, references_to_invert=None) -> ProgressPlan:
    """The bar's weights: ComfyUI's sampler runs stage 1 (none for a given layout), the layout is
    always inverted (ComfyUI gives no DDIM trajectory)."""
    return ProgressPlan(
        steps=job.steps,
        batch=n,
        references=len(job.references),
        references_to_invert=references_to_invert,
        stage1_steps=job.steps if job.params.runs_stage1 else 0,
    )


def _run(calls, request: Request) -> Outputs:
    family = check_models(request.model, request.vanilla_model)
    source = _source_latent(request)
    samples = source["samples"]
    n, (h, w) = samples.shape[0], tuple(samples.shape[-2:])
    values = with_layout_source(request.values, request.layout is not None, family)
    subjects = run_subjects(request)
    job = make_job(values, subjects, request, (h, w))
    noise_mask = request.mask if request.mask is not None else source.get("noise_mask")
    user_mask = tensors.retouch_mask(noise_mask, request.subject_mask, n, (h, w))

    # Never the user's MODEL objects: clones (the weights are shared; the attention patch restores).
    model = request.model.clone()
    vanilla = request.vanilla_model
    vanilla = vanilla.clone() if vanilla is not None else None
    lora_models = [
        None if s.lora is None else calls.with_lora(model, s.lora, s.lora_strength)
        for s in subjects
    ]
    if len(subjects) == 1 and lora_models[0] is not None:
        # one subject: its LoRA is the personalized MODEL, the MODEL without it the vanilla one
        vanilla, model, lora_models = vanilla or model, lora_models[0], [None]
    runs_stage1 = job.params.runs_stage1
    plan = progress_plan(job, n)
    bar = calls.progress_bar(round(plan.total * TICKS))
    progress = Progress(bar, job.steps, plan, calls.previewer(model))
    if runs_stage1:
        layout_raw = stage1(
            calls,
            job,
            model=model,
            vanilla_model=vanilla,
            clip=request.clip,
            vanilla_clip=request.vanilla_clip,
            latent=source,
            seed=request.seed,
            steps=request.steps,
            cfg=request.cfg,
            sampler_name=request.sampler_name,
            scheduler=request.scheduler,
            denoise=request.denoise,
            noise_mask=noise_mask,
            progress=progress,
            guidance=request.guidance,
        )
    else:
        layout_raw = samples
    result, lib_model = _retouch(
        calls, request, job, (model, lora_models), layout_raw, user_mask, progress
    )
    for note in job.notes:
        log.info("Layout-and-Retouch: %s", note)
    info = texts.info_text(
        job.schedule, mask_kind=result.mask_kind, notes=job.notes, stage1=runs_stage1
    )
    hw = (8 * h, 8 * w)
    out = {"samples": lib_model.raw_latents(result.latents).cpu()}
    mask = tensors.maps_to_mask(result.masks, n, hw)
    return Outputs(
        retouched=out,
        layout={"samples": layout_raw.cpu()},
        mask=mask,
        attention=tensors.mask_to_image(tensors.maps_to_mask(result.ca_maps, n, hw)),
        info=info,
        regions=tensors.regions_to_images(result.regions, mask, hw),
    )


def subject_weights(lib_model, base, lora_models):
    """The retouch's contexts for subjects with a LoRA of their own (several subjects): subject k's
    runs its calls on its MODEL (the base with its LoRA's weight patches; ComfyUI re-patches the
    shared weights when it loads it), the base context on the MODEL without any subject's LoRA.
    (None, None) when no subject has one."""
    if all(m is None for m in lora_models):
        return None, None
    weights = [None if m is None else (lambda m=m: lib_model.patcher_as(m)) for m in lora_models]
    return weights, lambda: lib_model.patcher_as(base)


def _retouch(calls, request: Request, job, models, layout_raw, user_mask, progress):
    """Stage 2 on the layout (raw latents): the library's result and model. `models`: the MODEL
    and each subject's MODEL with its LoRA (None: none)."""
    model, lora_models = models
    runs_stage1 = job.params.runs_stage1
    # the retouch's σ list (flow): the stage-1 scheduler's, "simple" for a layout from elsewhere
    scheduler = request.scheduler if runs_stage1 else "simple"
    lib_model = library_model(calls, model, request.clip, request.vae, scheduler, request.guidance)
    latent_hw = tuple(layout_raw.shape[-2:])
    model_family(model).check_schedule(lib_model, request.steps, latent_hw, scheduler)
    calls.load(model)
    layout_latents = lib_model.model_latents(layout_raw.to(lib_model.device))
    model_key = lib_model.model_key()
    cached = job.references_cached(J.SHARED_INVERSION_CACHE, model_key, latent_hw)
    n = layout_raw.shape[0]
    progress.replan(progress_plan(job, n, len(job.references) - cached))
    # SAM segments the decoded layout (the WebUI's stage 2 does the same)
    sam = request.sam
    layout_images = to_uint8(lib_model.decode(layout_latents)) if sam is not None else None
    weights, base_weights = subject_weights(lib_model, model, lora_models)
    result = job.retouch(
        lib_model,
        layout_latents,
        subject_tokens=job.subject_rows(lib_model),
        model_key=model_key,
        progress=progress,
        should_stop=calls.interrupted,
        user_mask=None if user_mask is None else user_mask.to(layout_latents),
        segmenter=sam,
        layout_images=layout_images,
        subject_weights=weights,
        base_weights=base_weights,
    )
    return result, lib_model
