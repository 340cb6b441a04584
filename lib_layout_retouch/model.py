"""The model interface the pipeline needs, over the ldm `LatentDiffusion` A1111 hands to extensions.

"Vanilla" and "personalized" are two *denoisers*, so every personalization fits:
- DreamBooth checkpoint: two UNets; the vanilla one is put in place by reference (`unet_swapped`),
  sharing the personalized model's VAE and text encoder — no copy, no reload per step;
- Textual Inversion: one UNet; only the prompt differs (y_p⁻ has no embedding name);
- LoRA: one UNet with the network off for the vanilla steps (the host toggles it).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch

from .errors import LayoutRetouchError

# eps = denoiser(x, t, cond) for a batch x, timesteps t (B,), conditioning cond (B, tokens, dim)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_model_supported(ldm) -> None:
    """Refuse, with a message, the model kinds this extension cannot retouch yet.

    SD1.x ε-prediction is what the paper (and our layer table) covers; SDXL/SD3 have another UNet
    and conditioning, SD2.x's 768 models predict v (the DDIM inversion here assumes ε)."""
    if getattr(ldm, "is_sdxl", False) or getattr(ldm, "is_sd3", False) or not hasattr(ldm, "apply_model"):
        raise LayoutRetouchError("SDXL/SD3 models are not yet supported (the paper and this extension are "
                                 "SD1.x-based); load an SD1.x checkpoint", parameter="sd_model")
    if getattr(ldm, "parameterization", "eps") != "eps":
        raise LayoutRetouchError("v-prediction models (SD2.x 768) are not yet supported; load an SD1.x "
                                 "checkpoint", parameter="sd_model")


@contextlib.contextmanager
def unet_swapped(ldm, unet: Optional[torch.nn.Module]) -> Iterator[None]:
    """Put `unet` in the model's place for the block (by reference; restored on any exit)."""
    if unet is None:
        yield
        return
    wrapper = ldm.model
    previous = wrapper.diffusion_model
    wrapper.diffusion_model = unet
    try:
        yield
    finally:
        wrapper.diffusion_model = previous


class LdmModel:
    """What the retouch needs from a LatentDiffusion: ε, conditioning, VAE, ᾱ.

    `autocast` is the host's precision context (A1111: `devices.autocast`); plain float32 by default.
    """

    def __init__(self, ldm, autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        self.ldm = ldm
        self.autocast = autocast

    @property
    def unet(self) -> torch.nn.Module:
        return self.ldm.model.diffusion_model

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.ldm.alphas_cumprod

    def denoiser(self, unet: Optional[torch.nn.Module] = None) -> Denoiser:
        """ε of this model, or of the same model with another UNet (DreamBooth's vanilla) swapped in."""
        def eps(x, t, cond):
            with unet_swapped(self.ldm, unet), self.autocast():
                return self.ldm.apply_model(x, t, cond)
        return eps

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.ldm.apply_model(x, t, cond)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS, as the text encoder sees them."""
        encoder = self.ldm.cond_stage_model
        if hasattr(encoder, "tokenize"):  # A1111's FrozenCLIPEmbedderWithCustomWords
            return list(encoder.tokenize([text])[0])
        return list(encoder.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def conditioning(self, prompts: Sequence[str]) -> torch.Tensor:
        with self.autocast():
            return self.ldm.get_learned_conditioning(list(prompts))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) → latents. The posterior's mode, not a sample: the
        inversion must be deterministic for the reference cache to mean anything."""
        vae_dtype = next(self.ldm.first_stage_model.parameters()).dtype
        with self.autocast():
            posterior = self.ldm.encode_first_stage(images.to(self.device, vae_dtype))
            z = posterior.mode() if hasattr(posterior, "mode") else posterior
            return self.ldm.get_first_stage_encoding(z)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1]."""
        vae_dtype = next(self.ldm.first_stage_model.parameters()).dtype
        with self.autocast():
            return self.ldm.decode_first_stage(latents.to(vae_dtype))
