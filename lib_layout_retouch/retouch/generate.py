"""Both stages end to end with the library's samplers (what tests, benchmarks and library users
call; the WebUIs and ComfyUI run stage 1 with their own samplers and call `loop.retouch`):
stage 1 (`stage1`: the step-blended layout through the family's sampler) then the retouch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .. import stage1
from . import caches
from .conds import RetouchConds
from .family import family_of
from .loop import ProgressFn, RetouchResult, RetouchSettings, retouch


def encode_prompts(
    model,
    prompts,
    negative_prompt: str = "",
    *,
    image_size=None,
    reference_size=None,
    reference_subjects=None,
) -> RetouchConds:
    """y_r, y_p and the negative prompt for the three paths: the model's family's (`encode_conds`).
    `image_size`: the generation's (width, height); `reference_size`: the reference photo's
    preparation (`conditioning.SizeTerms`, one or a list; read by families with size terms);
    `reference_subjects`: several subjects, each photo's subject index."""
    return family_of(model).encode_conds(
        model,
        prompts,
        negative_prompt,
        image_size=image_size,
        reference_size=reference_size,
        reference_subjects=reference_subjects,
    )


@dataclass
class GenerationResult:
    images: torch.Tensor  # (N, 3, H, W) retouched images in [-1, 1]
    layout_images: torch.Tensor  # (N, 3, H, W) stage-1 layouts I_o in [-1, 1]
    layout_latents: torch.Tensor
    retouch: RetouchResult


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(
    model,
    *,
    prompts,
    reference_image: torch.Tensor,
    noise: torch.Tensor,
    settings: RetouchSettings,
    negative_prompt: str = "",
    vanilla_unet: Optional[torch.nn.Module] = None,
    layout_source: str = "inversion",
    segmenter=None,
    cache: Optional[caches.InversionCache] = None,
    reference_key: Optional[tuple] = None,
    kv_cache: Optional[caches.ReferenceAttentionCache] = None,
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    reference_size=None,
) -> GenerationResult:
    """Both stages: stage 1 (step-blended layout) through the family's sampler, then the retouch.

    reference_image: (1, 3, H, W) in [-1, 1] at the generation size; noise: (N, C, h, w) z_T.
    vanilla_unet: DreamBooth's vanilla network (None: the same model, i.e. Textual Inversion, or
    the host's own vanilla context for families that have one: Flux's LoRA off).
    reference_size: the reference photo's preparation (SDXL's size terms; default: the generation's).
    """
    family = family_of(model)
    image_size = tuple(8 * d for d in noise.shape[-2:])[::-1]  # (width, height)
    conds = encode_prompts(
        model, prompts, negative_prompt, image_size=image_size, reference_size=reference_size
    )
    cond_layout = family.conditioning(model, [prompts.layout], image_size=image_size)
    trajectory = stage1.sample_step_blended(
        family.sampler(model, settings.schedule.steps, tuple(noise.shape[-2:])),
        model,
        settings.schedule,
        cond_layout,
        conds.layout,
        conds.uncond,
        noise,
        settings.guidance_scale,
        vanilla=lambda: family.vanilla(model, vanilla_unet),
        halves=family.halves(settings.guidance_scale),
        progress=progress,
        should_stop=should_stop,
    )
    subject = family.subject_tokens(
        model, prompts.personalized, [prompts.concept_token, prompts.class_phrase]
    )
    layout_latents = trajectory[-1]
    layout_images = model.decode(layout_latents)
    key = (
        None
        if reference_key is None
        else caches.inversion_key(reference_key, settings.schedule.steps, noise.shape[-2:])
    )
    result = retouch(
        model,
        reference_latent=_reference_latent(model, reference_image, cache, key),
        layout_latents=layout_latents,
        conds=conds,
        subject_tokens=subject,
        settings=settings,
        layout_trajectory=trajectory if layout_source == "stage1" else None,
        layout_images=to_uint8(layout_images) if segmenter is not None else None,
        segmenter=segmenter,
        reference_key=reference_key,
        cache=cache,
        kv_cache=kv_cache,
        progress=progress,
        should_stop=should_stop,
    )
    return GenerationResult(
        images=model.decode(result.latents),
        layout_images=layout_images,
        layout_latents=layout_latents,
        retouch=result,
    )


def _reference_latent(model, reference_image, cache, key) -> torch.Tensor:
    """The reference's latent; a cached inversion starts with it, so no VAE pass then."""
    cached = cache.peek(key) if cache is not None and key is not None else None
    return cached[0] if cached is not None else model.encode(reference_image)
