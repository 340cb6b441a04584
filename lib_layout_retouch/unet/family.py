"""The ε-UNet families, SD1.x and SDXL, as the retouch contract (`retouch.family.ModelFamily`):
DDIM over the model's ᾱ, the UNet layer tables, the attention-module editor and patch, CLIP's
subject rows, and the text conditionings (SDXL's with each image's size terms)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional, Sequence

import torch

from .. import conditioning as C
from ..retouch.conds import RetouchConds
from ..retouch.editor import COND, UNCOND
from ..retouch.layers import LayerTable
from .attention import RetouchAttention, patched_attention
from .ddim import DDIMSampler
from .layers import layer_table_for

SD1_FAMILY = "SD1.x"
SDXL_FAMILY = "SDXL"


@contextlib.contextmanager
def unet_swapped(holder, unet: Optional[torch.nn.Module]) -> Iterator[None]:
    """Put `unet` in place of `holder.diffusion_model` for the block (by reference; restored on any
    exit). `holder` is the model wrapper that calls its `diffusion_model` (ldm's `DiffusionWrapper`
    under `LatentDiffusion.model`, Forge's `KModel`), or a model that has one under `.model`."""
    if unet is None:
        yield
        return
    wrapper = holder if hasattr(holder, "diffusion_model") else holder.model
    previous = wrapper.diffusion_model
    wrapper.diffusion_model = unet
    try:
        yield
    finally:
        wrapper.diffusion_model = previous


class EpsUNetFamily:
    """SD1.x / SDXL: an ε-prediction UNet (ldm attention modules), DDIM. The model (unet.model's
    LdmModel or a host adapter built on it) answers eps, conditioning(prompts, size), tokenize /
    subject_tokens, generation_size, unet and unet_holder."""

    def __init__(self, name: str, sdxl: bool):
        self.name = name
        self.sdxl = sdxl  # conditioning carries size terms (a dict with a pooled/size vector)

    def __repr__(self) -> str:
        return f"EpsUNetFamily({self.name!r})"

    def sampler(self, model, steps: int, latent_hw=None) -> DDIMSampler:
        return DDIMSampler.for_model(model, steps)

    def halves(self, guidance_scale: float) -> tuple[str, ...]:
        return (UNCOND, COND)

    # -- text -----------------------------------------------------------------------------------
    def conditioning(self, model, texts: Sequence[str], *, image_size=None):
        size = None if image_size is None else model.generation_size(*image_size)
        return model.conditioning(list(texts), size)

    def subject_tokens(self, model, prompt: str, phrases: Sequence[str]) -> list[int]:
        return model.subject_tokens(prompt, phrases)

    def encode_conds(
        self,
        model,
        prompts,
        negative_prompt: str = "",
        *,
        image_size=None,
        reference_size=None,
        reference_subjects=None,
    ) -> RetouchConds:
        """y_r, y_p and the negative prompt. SDXL: each path with its own image's size terms (the
        generation's for the layout/target paths, `reference_size`'s for the reference path).
        `reference_size` may be a list, one SizeTerms per reference photo: the reference
        conditionings then have one row per photo (SDXL; SD1 has no size terms: one row for all).
        `reference_subjects`: several subjects — the subject of each reference photo; the reference
        rows then take their subject's y_r and the target the y_r naming them all."""
        if reference_subjects is not None:
            return self._subjects(
                model, prompts, negative_prompt, image_size, reference_size, reference_subjects
            )
        if isinstance(reference_size, (list, tuple)):
            if len(reference_size) == 1 or not self.sdxl:
                reference_size = reference_size[0] if reference_size else None
            else:
                return self._per_reference(
                    model, prompts, negative_prompt, image_size, reference_size
                )
        if not self.sdxl:
            c = model.conditioning([prompts.reference, prompts.personalized, negative_prompt])
            return RetouchConds(reference=c[0:1], layout=c[1:2], uncond=c[2:3])
        gen = model.generation_size(*(image_size or (1024, 1024)))
        ref = reference_size or gen
        at_gen = model.conditioning([prompts.reference, prompts.personalized], gen)

        def negative(
            text, size
        ):  # one call each: an empty negative prompt is zeroed only on its own
            return model.conditioning([text], size, negative=True)

        layout = C.rows(at_gen, slice(1, 2))
        # The target path attends with y_r's tokens but takes the layout path's `vector` (pooled y_p
        # and the generation's size terms). The vector is no attention: it reaches every ResBlock
        # through the time embedding, and the retouch edits attention only — with y_r's vector the
        # target would leave the layout even while every attention layer copies it
        # (docs/ALGORITHM.md: z_t = z_o for s ≤ λ2).
        target = C.with_tokens_of(layout, C.rows(at_gen, slice(0, 1)))
        return RetouchConds(
            reference=model.conditioning([prompts.reference], ref),
            layout=layout,
            uncond=negative(negative_prompt, gen),
            target=target,
            reference_uncond=negative(negative_prompt, ref),
            reference_empty=negative("", ref),
            layout_empty=negative("", gen),
        )

    def _subjects(self, model, prompts, negative, image_size, reference_size, subjects):
        """Several subjects: one reference row per photo with its subject's y_r (SDXL: and its
        size terms), the target with the y_r naming them all."""
        texts = [prompts.reference_of_subject(k) for k in subjects]
        sizes = reference_size if isinstance(reference_size, (list, tuple)) else None
        if not self.sdxl:
            common = self.encode_conds(model, prompts, negative)
            return dataclasses.replace(
                common, reference=model.conditioning(texts), target=common.reference
            )
        common = self.encode_conds(model, prompts, negative, image_size=image_size)
        gen = model.generation_size(*(image_size or (1024, 1024)))
        each = [sizes[i] if sizes else reference_size or gen for i in range(len(texts))]
        return dataclasses.replace(
            common,
            reference=C.cat([model.conditioning([t], r) for t, r in zip(texts, each)]),
            reference_uncond=C.cat(
                [model.conditioning([negative], r, negative=True) for r in each]
            ),
            reference_empty=C.cat([model.conditioning([""], r, negative=True) for r in each]),
        )

    def _per_reference(self, model, prompts, negative_prompt, image_size, reference_sizes):
        """SDXL with several reference photos: the reference conditionings one row per photo."""
        each = [
            self.encode_conds(
                model, prompts, negative_prompt, image_size=image_size, reference_size=r
            )
            for r in reference_sizes
        ]
        return RetouchConds(
            reference=C.cat([c.reference for c in each]),
            layout=each[0].layout,
            uncond=each[0].uncond,
            target=each[0].target,
            reference_uncond=C.cat([c.reference_uncond for c in each]),
            reference_empty=C.cat([c.reference_empty for c in each]),
            layout_empty=each[0].layout_empty,
        )

    # -- stage 1 --------------------------------------------------------------------------------
    def vanilla(self, model, network: Optional[torch.nn.Module] = None):
        """DreamBooth's vanilla UNet swapped in by reference (None: the same UNet — Textual
        Inversion; a LoRA is turned off by the host around stage 1's vanilla steps)."""
        return unet_swapped(model.unet_holder, network)

    # -- the retouch ----------------------------------------------------------------------------
    def layer_table(self, model, preset: str) -> LayerTable:
        return layer_table_for(model.unet, preset)

    def editor(self, model, layers, subject_tokens, latent_hw, n_references) -> RetouchAttention:
        return RetouchAttention(layers, subject_tokens, latent_hw, n_references=n_references)

    def patched(self, model, editor: RetouchAttention):
        return patched_attention(model.unet, editor)


SD1 = EpsUNetFamily(SD1_FAMILY, sdxl=False)
SDXL = EpsUNetFamily(SDXL_FAMILY, sdxl=True)
