"""Stage 2: the retouch of a batch of stage-1 latents (Algorithm 1 in `lib_layout_retouch`), with
the host's progress bar, live preview, Interrupt/Skip buttons and the intermediates gallery."""

from __future__ import annotations

import dataclasses
import math
import time

import torch
from modules import shared

from layout_retouch_webui import img2img, options
from layout_retouch_webui.options import opt
from layout_retouch_webui.settings import sam_folders
from lib_layout_retouch import job as lr_job
from lib_layout_retouch import logs
from lib_layout_retouch import retouch as pipeline
from lib_layout_retouch.errors import Interrupted, LayoutRetouchError
from lib_layout_retouch.params import NO_SAM
from lib_layout_retouch.progress import ProgressPlan
from lib_layout_retouch.prompts import strip_extra_networks
from lib_layout_retouch.segmentation import find_sam_checkpoints, load_segmenter

logger = logs.attach_console()


def subject_tokens(model, job, prompt: str) -> list[int]:
    """The conditioning rows of the concept token and class phrase in the personalized prompt, as
    the model's family reads them (CLIP's 75-token chunks; Flux: T5's SentencePiece pieces)."""
    phrases = [job.params.concept_token, job.params.class_phrase]
    return model.family.subject_tokens(model, prompt, phrases)


def segmenter_for(job, device):
    """The SAM model, or None with a note (the cross-attention mask still works)."""
    if job.params.sam_model == NO_SAM:
        return None
    path = find_sam_checkpoints(sam_folders()).get(job.params.sam_model)
    try:
        if path is None:  # listed once, gone now (or never there)
            raise LayoutRetouchError(
                f"SAM file '{job.params.sam_model}' is not in models/sam", parameter="sam_model"
            )
        return load_segmenter(path, device=device)
    except LayoutRetouchError as e:
        job.add_note(f"SAM not used ({e}); cross-attention mask only")
        logger.info(f"SAM fallback: {e}")
        return None


def retouch_samples(p, run, samples: torch.Tensor) -> torch.Tensor:
    """Stage 2 on a batch of stage-1 latents; returns the retouched latents."""
    if run.retouched or samples is None:
        return samples
    run.retouched = True
    if shared.state.interrupted or shared.state.skipped:
        run.job.add_note("interrupted before the retouch: layout returned")
        return samples
    host = run.host
    host.check_attention_free(p)
    with host.inference_context():
        return _retouch(p, run, samples)


def _retouch(p, run, samples):
    host, job = run.host, run.job
    job_for_batch = job
    if p.prompts and strip_extra_networks(p.prompts[0]) != job.prompt:
        job_for_batch = job.for_batch(p.prompts[0], p.negative_prompts[0])  # its own notes list
    model = host.library_model(p)
    subject = subject_tokens(model, job, job_for_batch.prompts.personalized)
    segmenter = segmenter_for(job, host.device)
    # the layout as pixels, decoded once: SAM segments it, the intermediates show it
    decoded = (
        model.decode(samples) if segmenter is not None or job.params.show_intermediates else None
    )
    cache, kv_cache = _shared_caches()
    model_key = host.model_key(p, job.params.personalization)
    plan = run.progress
    cached = job_for_batch.references_cached(cache, model_key, samples.shape[-2:])
    if cached:
        plan = dataclasses.replace(plan, references_to_invert=plan.references - cached)
    user_mask = img2img.user_mask(p)  # inpaint: 1 where the user painted; None otherwise
    started = time.perf_counter()
    try:
        result = job_for_batch.retouch(
            model,
            samples,
            subject_tokens=subject,
            model_key=model_key,
            layout_trajectory=_stage1_trajectory(p, run, samples),
            layout_images=pipeline.to_uint8(decoded) if segmenter is not None else None,
            segmenter=segmenter,
            cache=cache,
            kv_cache=kv_cache,
            progress=_progress(plan),
            should_stop=_should_stop,
            user_mask=None if user_mask is None else user_mask.to(samples.device),
        )
    except Interrupted as e:
        job.add_note(f"retouch interrupted ({e}); layout returned")
        logger.info(f"interrupted: {e}")
        return samples
    _report(job, job_for_batch, model, result, samples.shape[0], time.perf_counter() - started)
    if job.params.show_intermediates:
        keep_intermediates(p, run, decoded, result)
    return result.latents.to(samples.dtype)


def _stage1_trajectory(p, run, samples):
    """The layout path's latents from stage 1 (layout source 'stage1'), where the host's sampler
    recorded a DDIM trajectory; else None (the layout is inverted, and a note says why)."""
    job = run.job
    if job.params.layout_source != "stage1":
        return None
    if run.img2img:
        job.add_note(
            "layout source 'stage1' follows txt2img's DDIM trajectory from pure noise; img2img's "
            "starts part-way: the layout was inverted instead"
        )
    elif p.sampler_name == "DDIM" and len(run.trajectory) == job.steps - 1:
        # A1111's DDIM stops at t=1 after N−1 calls: its latents are our levels T…1.
        return run.trajectory + [samples, samples]
    else:
        job.add_note(
            "layout source 'stage1' needs the DDIM sampler; the layout was inverted instead"
        )
    return None


def _shared_caches():
    """The library's shared reference caches, sized by the WebUI settings."""
    cache = lr_job.SHARED_INVERSION_CACHE
    cache.max_entries = int(opt(options.REFERENCE_CACHE))
    kv_cache = lr_job.SHARED_REFERENCE_ATTENTION_CACHE
    kv_cache.max_bytes = int(opt(options.KV_CACHE_MB)) * 2**20
    if kv_cache.max_bytes == 0:
        kv_cache.clear()
    return cache, kv_cache


def _progress(plan: ProgressPlan):
    """The retouch's progress on the WebUI's one bar (stage 2 continues where stage 1 ended), with
    the live preview at the WebUI's own rate."""

    def progress(phase, step, total_steps):
        shared.state.textinfo = ProgressPlan.text(phase)
        shared.state.sampling_steps = math.ceil(plan.total)  # whole steps: the console's total bar
        before = shared.state.sampling_step
        shared.state.sampling_step = max(before, plan.position(phase, step, total_steps))
        console = getattr(shared, "total_tqdm", None)  # the console's "Total progress" bar
        for _ in range(int(shared.state.sampling_step) - int(before) if console else 0):
            console.update()  # goes on through stage 2

    def preview(latents):
        shared.state.current_latent = latents
        shared.state.set_current_image()

    progress.preview = preview
    return progress


def _should_stop() -> bool:
    return bool(shared.state.interrupted or shared.state.skipped)


def _report(job, job_for_batch, model, result, n: int, seconds: float) -> None:
    job.mask_kind = result.mask_kind
    job.merge_notes(job_for_batch)
    for note in model.notes:  # e.g. a half-precision VAE retried in float32
        job.add_note(note)
    source = "cached" if result.reference_cached else "inverted"
    logger.info(
        f"retouch of {n} image(s): {seconds:.1f}s, {result.unet_calls} UNet calls "
        f"({result.unet_rows} rows), reference {source}, mask {result.mask_kind}"
    )


def keep_intermediates(p, run, decoded_layouts, result) -> None:
    """Layout, mask and attention map of each image, for the gallery after the results."""
    size = (p.width, p.height)
    layouts = lr_job.tensor_to_images(decoded_layouts)
    base = int(getattr(p, "iteration", 0) or 0) * p.batch_size  # index of this batch's first image
    for i, layout in enumerate(layouts):
        run.intermediates.append(("layout", base + i, layout))
        if result.masks is not None:
            run.intermediates.append(
                ("mask", base + i, lr_job.mask_to_image(result.masks[i], size))
            )
        if result.ca_maps is not None:
            run.intermediates.append(
                ("attention map", base + i, lr_job.mask_to_image(result.ca_maps[i], size))
            )
