"""Flux.1 (dev, schnell) as the retouch contract (`retouch.family.ModelFamily`): rectified flow
with a first- or second-order solver on the model's σ schedule, Flux's block table, editor and patch,
T5's subject rows, real CFG only when the guidance scale is not 1 (Flux-dev's distilled guidance is in
the conditioning). The model is `dit.flux.model.FluxModel` (or a host adapter built on it)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ...errors import LayoutRetouchError
from ...retouch.editor import COND, UNCOND
from .. import flow
from ..joint import ROPE_MODES, SHIFTED
from .blocks import DiTRetouchAttention, patched_blocks
from .layers import layer_table_for_dit

FLUX_FAMILY = "Flux"
DEFAULT_GUIDANCE = 3.5  # Flux.1-dev's distilled guidance (Forge's "Distilled CFG Scale" default)


def stage1_layout_refusal() -> LayoutRetouchError:
    """A host whose own sampler draws Flux's stage 1 hands no trajectory the retouch can follow."""
    return LayoutRetouchError(
        "layout source 'stage1' reads DDIM's trajectory, which a Flux.1 (rectified-flow) "
        "generation does not have; use 'inversion'",
        parameter="layout_source",
    )


class FluxFamily:
    """The Flux.1 family with the DiT choices of docs/ALGORITHM.md, "DiT (Flux)": the inversion's
    `solver`, where the reference's keys sit (`reference_rope`) and whether the target also attends
    to its own image tokens while painting (`with_target_tokens`)."""

    name = FLUX_FAMILY

    def __init__(
        self,
        solver: str = flow.MIDPOINT,
        reference_rope: str = SHIFTED,
        with_target_tokens: bool = False,
    ):
        self.solver = flow.check_solver(solver)
        if reference_rope not in ROPE_MODES:
            raise ValueError(f"reference_rope must be one of {ROPE_MODES}, got {reference_rope!r}")
        self.reference_rope = reference_rope
        self.with_target_tokens = bool(with_target_tokens)

    def __repr__(self) -> str:
        return f"FluxFamily({self.solver!r}, {self.reference_rope!r}, {self.with_target_tokens})"

    def sampler(self, model, steps: int, latent_hw=None):
        if latent_hw is None:
            raise ValueError("the Flux sampler needs the latent size (its σ shift depends on it)")
        return flow.flow_sampler(model.schedule(steps, latent_hw), self.solver)

    def halves(self, guidance_scale: float) -> tuple[str, ...]:
        return (UNCOND, COND) if guidance_scale != 1 else (COND,)

    # -- text -----------------------------------------------------------------------------------
    def conditioning(self, model, texts: Sequence[str], *, image_size=None):
        return model.conditioning(list(texts))  # no size conditioning; the model's guidance

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
    ):
        conds = model.retouch_conds(prompts, negative_prompt)
        if reference_subjects is None:
            return conds
        # several subjects: each photo's row with its subject's y_r; the target names them all
        texts = [prompts.reference_of_subject(k) for k in reference_subjects]
        return dataclasses.replace(conds, reference=model.conditioning(texts))

    # -- stage 1 --------------------------------------------------------------------------------
    def vanilla(self, model, network: Optional[torch.nn.Module] = None):
        """The host's vanilla context (`model.vanilla`: the subject's LoRA off, a vanilla
        checkpoint swapped in)."""
        if network is not None:
            raise ValueError(
                "Flux's vanilla model is the host's context (model.vanilla), not a network"
            )
        return model.vanilla()

    # -- the retouch ----------------------------------------------------------------------------
    def layer_table(self, model, preset: str):
        return layer_table_for_dit(model.transformer, preset)

    def editor(self, model, layers, subject_tokens, latent_hw, n_references):
        return DiTRetouchAttention(
            layers,
            subject_tokens,
            latent_hw,
            n_references,
            rope_of=getattr(model.transformer, "pe_embedder", None),
            reference_rope=self.reference_rope,
            with_target_tokens=self.with_target_tokens,
        )

    def patched(self, model, editor):
        return patched_blocks(model.transformer, editor)
