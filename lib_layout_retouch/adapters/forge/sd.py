"""Forge's diffusion engine as the retouch drives it (the model half of the Forge host adapter).

Forge hands extensions a `ForgeDiffusionEngine` (`backend/diffusion_engine/sd15.py`, `sdxl.py`), not an
ldm model: the UNet sits in `forge_objects.unet` (a patcher) whose `model` (a `KModel`) predicts the
denoised image at a noise level σ; text goes through the engine's text-processing engines; the VAE
samples its posterior. This class answers `LdmModel`'s questions over those objects — nothing here
imports Forge: the objects are handed in, and what must be called inside Forge (loading a patcher's
model onto its device) is a callable the adapter passes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ...conditioning import SizeTerms
from ...unet.family import SD1, SDXL
from ...unet.model import KDiffusionModel


class EnginePrompts(list):
    """A list of prompts with the attributes Forge's engines read (A1111's `SdConditioning` shape):
    `width`/`height` for SDXL's size terms, `is_negative_prompt` for its zeroed empty negative."""

    def __init__(
        self,
        prompts,
        *,
        width: Optional[int] = None,
        height: Optional[int] = None,
        is_negative_prompt: bool = False,
    ):
        super().__init__(prompts)
        self.width = width
        self.height = height
        self.is_negative_prompt = is_negative_prompt
        self.distilled_cfg_scale = None


class ForgeModel(KDiffusionModel):
    """ε through the KModel's denoiser, the engine's text processing with explicit SDXL size terms,
    and a deterministic VAE encode. `load_model(patcher)` puts a patcher's model on its device
    (Forge's `memory_management.load_model_gpu`); a no-op by default."""

    def __init__(self, engine, sdxl_crop=(0, 0), load_model: Callable = lambda patcher: None):
        super().__init__(engine, sdxl_crop=sdxl_crop)
        self.family = SDXL if getattr(engine, "is_sdxl", False) else SD1
        self.load_model = load_model

    @property
    def unet_patcher(self):
        return self.ldm.forge_objects.unet

    @property
    def unet_holder(self):
        return self.unet_patcher.model  # KModel: calls its `diffusion_model`

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.unet_holder.predictor.alphas_cumprod

    def denoise(self, x, sigma, cond):
        device = self.device
        if isinstance(cond, dict):  # SDXL: the pooled-text/size vector goes in as `y`
            extra = dict(c_crossattn=cond["crossattn"].to(device), y=cond["vector"].to(device))
        else:
            extra = dict(c_crossattn=cond.to(device))
        return self.unet_holder.apply_model(
            x.to(device), sigma.to(device), transformer_options={}, **extra
        )

    # -- text -------------------------------------------------------------------------------------
    def text_encoder(self):
        """The CLIP-L text-processing engine: `tokenize_line` / `tokenize` like A1111's."""
        return (
            self.ldm.text_processing_engine_l if self.is_sdxl else self.ldm.text_processing_engine
        )

    def tokenize(self, text: str) -> list[int]:
        return list(self.text_encoder().tokenize([text])[0])

    @torch.no_grad()
    def conditioning(self, prompts, size: Optional[SizeTerms] = None, *, negative: bool = False):
        engine = self.ldm
        if not self.is_sdxl:
            return engine.get_learned_conditioning(
                EnginePrompts(list(prompts), is_negative_prompt=negative)
            )
        size = size or SizeTerms.of_generation(1024, 1024, self.sdxl_crop)
        (h, w), (top, left), (th, tw) = size.original_hw, size.crop_top_left, size.target_hw
        cond = engine.get_learned_conditioning(
            EnginePrompts(list(prompts), width=w, height=h, is_negative_prompt=negative)
        )
        # The engine takes the crop from its settings and target = original; the reference path's
        # terms differ (the photo's original size, its crop, the fed size), so the size part of the
        # vector is rebuilt in the engine's own order and embedding: original, crop (top, left), target.
        terms = [engine.embedder(torch.Tensor([v])) for v in (h, w, top, left, th, tw)]
        vector = cond["vector"]
        flat = torch.flatten(torch.cat(terms)).unsqueeze(0).repeat(vector.shape[0], 1).to(vector)
        pooled = vector[:, : vector.shape[1] - flat.shape[1]]
        return {"crossattn": cond["crossattn"], "vector": torch.cat([pooled, flat], dim=1)}

    # -- VAE --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior's mode (Forge's VAE samples it by default, from the global RNG): the
        inversion must be deterministic for the reference cache to mean anything."""
        vae = self.ldm.forge_objects.vae
        self.load_model(vae.patcher)
        x = images.to(vae.device, vae.vae_dtype)
        z = vae.first_stage_model.encode(x, regulation=lambda posterior: posterior.mode())
        return vae.first_stage_model.process_in(z.float()).to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.ldm.decode_first_stage(latents).float()
