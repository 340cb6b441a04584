"""Forge's Flux engine as the retouch drives it: a `FluxModel` whose callables read Forge's objects.

Forge hands extensions a `ForgeDiffusionEngine` (`backend/diffusion_engine/flux.py`, class `Flux`, also
for schnell). Nothing here imports Forge: the engine is handed in, and what must run inside Forge
(loading a patcher's model onto its device) is a callable the host adapter passes, as for
`forge_model.ForgeModel`. Facts (Forge dfdcbab6; tests/host/FORGE_NOTES.md, "Flux"):

- `forge_objects.unet.model` is a `KModel` with `PredictionFlux` (k_prediction.py:285): prediction
  type `const`, so `apply_model(x, σ)` feeds x unscaled, `timestep(σ) = σ`, and returns
  `denoised = x − out·σ` (k_prediction.py:74-91): the transformer's output `out` IS the
  rectified-flow velocity v = ε − x₀ (x_σ = (1−σ)·x₀ + σ·ε). `velocity` calls the transformer
  directly with Forge's casts (computation dtype; k_model.py:25-46), not x − denoised over σ.
- σ table: `predictor.sigmas` = time_shift(μ, t) for t = 1/10000 … 1 (k_prediction.py:292-301); dev
  uses a FIXED μ = calculate_shift(4096 tokens) = 1.15 whatever the image size (flux.py:37-45; its
  TODO says so), schnell μ = 1. Forge's "Simple" scheduler (Flux's default) takes every
  (10000/n)-th entry from the top plus 0 (modules/sd_schedulers.py:81-87): `simple_sigmas`.
- Text: `text_processing_engine_t5(prompts)` → (B, 256+, d) T5 states (T5 tokens from row 0, EOS,
  zero-padded to 256; t5_engine.py), `text_processing_engine_l(prompts)` → (states, pooled CLIP-L);
  the engine's `get_learned_conditioning` builds `{"crossattn": T5, "vector": pooled, "guidance":
  distilled CFG}` (flux.py:83-96), the dict this FluxModel uses too. The text encoders are loaded
  with `load_model(forge_objects.clip.patcher)` first (what merges a LoRA's CLIP part).
- VAE: `first_stage_model.encode(x in [−1, 1], regulation=mode)` (deterministic; Forge samples the
  posterior by default) then `process_in` = (z − shift)·scale; `decode_first_stage` decodes.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...dit.flow import simple_sigmas
from ...dit.flux.model import FluxModel


def is_forge_flux(engine) -> bool:
    """A Forge Flux engine (dev or schnell; not Chroma): its KModel predicts with PredictionFlux."""
    kmodel = getattr(getattr(getattr(engine, "forge_objects", None), "unet", None), "model", None)
    predictor = getattr(kmodel, "predictor", None)
    return type(engine).__name__ == "Flux" and type(predictor).__name__ == "PredictionFlux"


def forge_flux_model(
    engine,
    *,
    load_model: Callable = lambda patcher: None,
    sigmas: Callable | None = None,
    guidance: float | None = None,
) -> FluxModel:
    """The FluxModel of a Forge `Flux` engine. `sigmas(steps, latent_hw)`: the host sampler's σ list
    (default: Forge's "Simple" scheduler on the predictor's table, what a Flux generation uses unless
    the user picks another scheduler). `guidance`: the generation's distilled guidance ("Distilled CFG
    Scale"; `p.distilled_cfg_scale`), used for every path's conditioning (dev; schnell ignores it)."""
    forge = _ForgeFlux(engine, load_model)
    model = FluxModel(
        forge.transformer,
        encode_t5=forge.encode_t5,
        encode_clip=forge.encode_clip,
        tokenize_t5=forge.tokenize_t5,
        tokenize_clip=forge.tokenize_clip,
        vae_encode=forge.vae_encode,
        vae_decode=forge.vae_decode,
        velocity=forge.velocity,
        shift=False,
        sigmas=sigmas or forge.simple_sigmas,
        **({} if guidance is None else {"guidance": float(guidance)}),
    )
    model.unet_patcher = engine.forge_objects.unet
    return model


class _ForgeFlux:
    """What FluxModel asks of a host, answered by Forge's Flux engine (facts: the module docstring)."""

    def __init__(self, engine, load_model: Callable):
        self.engine, self.load_model = engine, load_model
        kmodel = engine.forge_objects.unet.model
        self.transformer = kmodel.diffusion_model
        self.predictor = kmodel.predictor
        self.dtype = kmodel.computation_dtype
        self.guidance_embed = bool(getattr(self.transformer, "guidance_embed", True))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        dev, dtype = next(self.transformer.parameters()).device, self.dtype
        t = self.predictor.timestep(sigma.to(dev).float()).float()
        guidance = cond.get("guidance") if self.guidance_embed else None
        out = self.transformer(
            x.to(dev, dtype),
            t,
            context=cond["crossattn"].to(dev, dtype),
            y=cond["vector"].to(dev, dtype),
            guidance=guidance.to(dev, dtype) if guidance is not None else None,
            transformer_options={},
        )
        return out.float().to(x.device)

    def _text_loaded(self):
        self.load_model(self.engine.forge_objects.clip.patcher)

    def encode_t5(self, prompts) -> torch.Tensor:
        self._text_loaded()
        return self.engine.text_processing_engine_t5(list(prompts)).float()

    def encode_clip(self, prompts) -> torch.Tensor:
        self._text_loaded()
        _, pooled = self.engine.text_processing_engine_l(list(prompts))
        return pooled.float()

    def tokenize_t5(self, text: str) -> list[int]:
        return list(self.engine.text_processing_engine_t5.tokenize([text])[0])

    def tokenize_clip(self, text: str) -> list[int]:
        return list(self.engine.text_processing_engine_l.tokenize([text])[0])

    def vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.engine.forge_objects.vae
        self.load_model(vae.patcher)
        x = images.to(vae.device, vae.vae_dtype)
        z = vae.first_stage_model.encode(x, regulation=lambda posterior: posterior.mode())
        return vae.first_stage_model.process_in(z.float()).to(images.device)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.engine.decode_first_stage(latents).float()

    def simple_sigmas(self, steps: int, latent_hw) -> list[float]:
        return simple_sigmas(self.predictor.sigmas, steps)


__all__ = ["forge_flux_model", "is_forge_flux"]
