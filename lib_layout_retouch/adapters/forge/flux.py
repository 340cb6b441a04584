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
- VAE: the posterior's mode (`vae.encode_mode`, shared with SD1/SDXL); `decode_first_stage` decodes.
"""

from __future__ import annotations

from typing import Callable

import torch

from ...dit.flow import simple_sigmas
from ...dit.flux.family import DEFAULT_GUIDANCE, stage1_layout_refusal
from ...dit.flux.model import FluxModel
from ...errors import LayoutRetouchError
from .vae import encode_mode


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
        return encode_mode(self.engine.forge_objects.vae, images, self.load_model)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.engine.decode_first_stage(latents).float()

    def simple_sigmas(self, steps: int, latent_hw) -> list[float]:
        return simple_sigmas(self.predictor.sigmas, steps)


class ForgeFlux:
    """Forge's Flux.1 engines (dev, schnell) as the Forge host asks about them (the questions:
    `adapters.forge.EngineFamily`)."""

    name = "Flux.1"
    # DreamBooth's stage 1 reads y_p⁻ with the loaded model's T5 and CLIP-L (README, "Flux.1").
    text_encoder_note = (
        "Flux.1: stage 1 read the class prompt with the loaded model's T5 and CLIP-L (the vanilla "
        "checkpoint's text encoders are not swapped in on Flux); set stage1_text_encoder to "
        "'loaded' to choose that explicitly"
    )

    def matches(self, engine) -> bool:
        return is_forge_flux(engine)

    def check(self, engine) -> None:
        """`matches` is the check: a Flux engine with Forge's flow prediction (another is refused by
        the SD adapter's engine table, by name)."""

    def check_params(self, params, *, img2img: bool) -> None:
        if params.personalization == "textual_inversion":
            raise LayoutRetouchError(
                "personalization 'textual_inversion' is not supported on Flux: Forge reads "
                "Textual-Inversion embeddings only into CLIP-L, whose pooled vector Flux does not "
                "attend to (the subject would not be in the T5 tokens the mask follows); use the "
                "subject's LoRA or a DreamBooth fine-tune",
                parameter="personalization",
            )
        if params.layout_source == "stage1":
            raise stage1_layout_refusal()
        if img2img:
            raise LayoutRetouchError(
                "img2img with Layout-and-Retouch is not yet supported on Flux; use txt2img",
                parameter="sd_model",
            )

    def model(
        self, engine, *, load_model: Callable, sdxl_crop=(0, 0), distilled_cfg_scale=None
    ) -> FluxModel:
        """The generation's distilled guidance ("Distilled CFG Scale"; Flux.1-dev's default when the
        request has none) for every path's conditioning; `sdxl_crop` is SDXL's."""
        guidance = float(distilled_cfg_scale or DEFAULT_GUIDANCE)
        return forge_flux_model(engine, load_model=load_model, guidance=guidance)

    def stage1_latent(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Const prediction: the sampler hands x itself (x_σ = (1−σ)·x₀ + σ·ε)."""
        return x

    def text_encoder_slots(self, engine) -> list:
        """None: T5 and CLIP-L are not swapped for DreamBooth's stage 1 (`text_encoder_note`)."""
        return []


FORGE_FLUX = ForgeFlux()

__all__ = ["FORGE_FLUX", "ForgeFlux", "forge_flux_model", "is_forge_flux"]
