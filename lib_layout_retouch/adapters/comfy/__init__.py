"""ComfyUI's MODELs as the nodes drive them, one adapter object per model family.

The nodes' run (`layout_retouch_comfy/run.py`) asks the MODEL's family everything that differs
between families — `ModelFamily`'s questions — and never which family it holds; the family is told
from the MODEL in one place (`model_family`). A new ComfyUI family is one more adapter object (beside
its model, in its own module) and its line in `FAMILIES`.

Modules: `sd` (SD1.x/SDXL: `ComfyModel`, `COMFY_SD`, and what both read: the refusals by model kind,
the weights' key, the VAE, the LATENT scale), `flux` (Flux.1: `ComfyFluxModel`, `COMFY_FLUX`).
Nothing here imports ComfyUI: the objects are handed in, and what must run inside ComfyUI (loading a
patcher, the sampler's σ list) is a callable the glue passes.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ...dit.flux.family import DEFAULT_GUIDANCE
from .flux import COMFY_FLUX
from .sd import COMFY_SD, check_same_architecture, check_supported

# The distilled guidance a node uses when the graph sets none (ComfyUI's Flux: 3.5 without a
# FluxGuidance node); the families without one ignore it.
GUIDANCE_DEFAULT = DEFAULT_GUIDANCE


class ModelFamily(Protocol):
    """What the nodes ask of a MODEL's family."""

    name: str

    def matches(self, patcher) -> bool:
        """Whether `patcher` (a ComfyUI ModelPatcher) is of this family."""

    def check_free(self, patcher, input_name: str = "model") -> None:
        """Refuse (LayoutRetouchError naming `input_name`) another node's replacement of the layers
        the retouch edits."""

    def encoder(self, encode: Callable, guidance: float) -> Callable:
        """CLIPTextEncode for this family: `encode(clip, text)` → a CONDITIONING, with what the
        family's sampler also reads (Flux: the distilled `guidance`)."""

    def continuation_noise(self, x: torch.Tensor, latent: torch.Tensor, sigma: float):
        """The noise with which a sampler pass started at σ begins at the model-scale state `x`,
        over the model-scale `latent` (ComfyUI's noise_scaling undone)."""

    def stage1_layout_source(self) -> str:
        """What stands in for layout source 'stage1' (the library's DDIM trajectory, which ComfyUI's
        sampler does not give), or a refusal."""

    def model(self, patcher, clip, vae, *, load_model: Callable, sigmas: Callable, guidance):
        """The library's model of a (cloned) MODEL (`retouch.family` contract): `load_model(patcher)`
        loads a patcher with its weight patches; `sigmas(steps, latent_hw)` the sampler's σ list;
        `guidance` the distilled guidance."""

    def check_schedule(self, lib_model, steps: int, latent_hw, scheduler: str) -> None:
        """Refuse (naming 'scheduler') a scheduler this family's retouch cannot step."""


# Detection order: the first family whose `matches(patcher)` holds. SD1.x/SDXL is last and matches
# every MODEL: `check_supported` refuses by name what no family runs.
FAMILIES: tuple[ModelFamily, ...] = (COMFY_FLUX, COMFY_SD)


def model_family(patcher) -> ModelFamily:
    """The adapter of `patcher`'s family."""
    return next(family for family in FAMILIES if family.matches(patcher))


def check_models(model, vanilla_model, input_names=("model", "vanilla_model")) -> ModelFamily:
    """Refuse a MODEL (or a vanilla MODEL of another network) the retouch cannot run on, naming the
    input; the family of `model`."""
    check_supported(model, input_names[0])
    family = model_family(model)
    family.check_free(model, input_names[0])
    if vanilla_model is not None:
        check_same_architecture(model, vanilla_model, input_names[1])
        family.check_free(vanilla_model, input_names[1])
    return family


__all__ = [
    "COMFY_FLUX",
    "COMFY_SD",
    "FAMILIES",
    "GUIDANCE_DEFAULT",
    "ModelFamily",
    "check_models",
    "model_family",
]
