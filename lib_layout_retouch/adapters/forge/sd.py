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
from ...unet.text_encoders import TEXT_ENCODER_PREFIXES
from .engines import check_forge_engine_supported
from .vae import encode_mode


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
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The posterior's mode (`vae.encode_mode`): deterministic, as the inversion cache needs."""
        return encode_mode(self.ldm.forge_objects.vae, images, self.load_model)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.ldm.decode_first_stage(latents).float()


class ForgeSD:
    """Forge's SD1.x and SDXL engines (`StableDiffusion`, `StableDiffusionXL`) as the Forge host asks
    about them (the questions: `adapters.forge.EngineFamily`). Last in the detection order
    (`adapters.forge.FAMILIES`): it takes every engine no other family claims, and `check` refuses by
    name what is neither SD1.x nor SDXL (Chroma, SD3, the refiner, inpaint, v-prediction, …)."""

    name = "SD1.x/SDXL"
    text_encoder_note = None  # the host's own note (only when the transformer is not a module)

    def matches(self, engine) -> bool:
        return True

    def check(self, engine) -> None:
        check_forge_engine_supported(engine)

    def check_params(self, params, *, img2img: bool) -> None:
        """Every valid parameter set runs on SD1.x/SDXL."""

    def model(
        self, engine, *, load_model: Callable, sdxl_crop=(0, 0), distilled_cfg_scale=None
    ) -> ForgeModel:
        """`distilled_cfg_scale` is Flux's; an ε-UNet has no distilled guidance."""
        return ForgeModel(engine, sdxl_crop=sdxl_crop, load_model=load_model)

    def stage1_latent(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Forge's samplers hand the ε-model x on the σ scale: z_t = x/√(σ²+1) (`KModel.apply_model`
        feeds x/√(σ²+1) to the UNet)."""
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        return x / (s * s + 1).sqrt()

    def text_encoder_slots(self, engine) -> list:
        """CLIP-L (SD1's only encoder, SDXL's first): the transformer inside Forge's IntegratedCLIP,
        keyed as in the checkpoint. SDXL's OpenCLIP-G is stored in another layout than Forge's
        converted module: not swapped (stage 1 reads SDXL's second encoder from the loaded model)."""
        if getattr(engine, "is_sdxl", False):
            clip = engine.text_processing_engine_l.text_encoder
            prefix = TEXT_ENCODER_PREFIXES["sdxl_clip_l"]
        else:
            clip = engine.text_processing_engine.text_encoder
            prefix = TEXT_ENCODER_PREFIXES["sd1"]
        return (
            [(clip, "transformer", prefix)]
            if isinstance(getattr(clip, "transformer", None), torch.nn.Module)
            else []
        )


FORGE_SD = ForgeSD()
