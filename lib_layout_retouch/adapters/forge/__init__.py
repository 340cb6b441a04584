"""Forge's engines as the retouch drives them, one adapter object per engine family.

The Forge host (`layout_retouch_webui/hosts/forge.py`) asks the loaded engine's family everything
that differs between families — `EngineFamily`'s questions — and never which family it holds; the
family is told from the engine in one place (`engine_family`). A new Forge family is one more adapter
object (beside its model, in its own module) and its line in `FAMILIES`.

Modules: `sd` (SD1.x/SDXL: `ForgeModel`, `FORGE_SD`), `flux` (Flux.1: `forge_flux_model`, `FORGE_FLUX`),
`engines` (the engine kinds refused by name, other extensions' attention replacements), `vae` (the
deterministic VAE encode both families use). Nothing here imports Forge: the engine and the callables
that must run inside Forge are handed in.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch

from .flux import FORGE_FLUX
from .sd import FORGE_SD


class EngineFamily(Protocol):
    """What the Forge host asks of the loaded engine's family."""

    name: str
    # The note when `text_encoder_slots` is empty in DreamBooth (None: the host's own).
    text_encoder_note: Optional[str]

    def matches(self, engine) -> bool:
        """Whether `engine` (a Forge `ForgeDiffusionEngine`) is of this family."""

    def check(self, engine) -> None:
        """Refuse (LayoutRetouchError naming the model kind) an engine the retouch cannot run on."""

    def check_params(self, params, *, img2img: bool) -> None:
        """Refuse what this family cannot do with these parameters (`img2img`: the generation is)."""

    def model(self, engine, *, load_model: Callable, sdxl_crop=(0, 0), distilled_cfg_scale=None):
        """The library's model of the engine (`retouch.family` contract: `model.family`):
        `load_model(patcher)` puts a patcher's model on its device; `sdxl_crop` the WebUI's SDXL crop
        (top, left); `distilled_cfg_scale` the generation's Flux guidance (None: the default)."""

    def stage1_latent(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """z_t from the CFG denoiser's x and σ for this batch (the host sampler's scaling undone)."""

    def text_encoder_slots(self, engine) -> list:
        """(holder, attribute, checkpoint key prefix) of each text transformer that DreamBooth's stage 1
        swaps for the vanilla checkpoint's (`unet.text_encoders`)."""


# Detection order: the first family whose `matches(engine)` holds. SD1.x/SDXL is last and matches
# every engine: its `check` refuses by name what no family runs.
FAMILIES: tuple[EngineFamily, ...] = (FORGE_FLUX, FORGE_SD)


def engine_family(engine) -> EngineFamily:
    """The adapter of `engine`'s family."""
    return next(family for family in FAMILIES if family.matches(engine))


__all__ = ["FAMILIES", "FORGE_FLUX", "FORGE_SD", "EngineFamily", "engine_family"]
