"""The model interface the pipeline needs, over the ldm `LatentDiffusion` A1111 hands to extensions.

"Vanilla" and "personalized" are two *denoisers*, so every personalization fits:
- DreamBooth checkpoint: two UNets; the vanilla one is put in place by reference (`unet_swapped`),
  sharing the personalized model's VAE and text encoder — no copy, no reload per step;
- Textual Inversion: one UNet; only the prompt differs (y_p⁻ has no embedding name);
- LoRA: one UNet with the network off for the vanilla steps (the host toggles it).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch

from ..conditioning import SizeTerms
from ..errors import LayoutRetouchError
from ..prompts import subject_positions_in_chunks, subject_token_positions
from .conditioning import sdxl_conditioning
from .family import SD1, SDXL, EpsUNetFamily, unet_swapped

# eps = denoiser(x, t, cond) for a batch x, timesteps t (B,), conditioning cond (conditioning.Cond)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def model_family(ldm) -> EpsUNetFamily:
    """SD1 (ldm `LatentDiffusion`: one CLIP text encoder, tensor conditioning) or SDXL (sgm
    `DiffusionEngine`: a `conditioner` with two text encoders, dict conditioning)."""
    return SDXL if (getattr(ldm, "is_sdxl", False) or hasattr(ldm, "conditioner")) else SD1


# Refusals both model checks give (ldm/sgm in A1111, Forge's engines).
def inpaint_refusal() -> LayoutRetouchError:
    return LayoutRetouchError(
        "inpainting models (9 input channels) are not supported; load a txt2img SD1.x or SDXL "
        "checkpoint",
        parameter="sd_model",
    )


def prediction_refusal(what: str) -> LayoutRetouchError:
    return LayoutRetouchError(
        f"{what} are not supported: the DDIM inversion assumes ε-prediction; load an "
        "ε-prediction checkpoint",
        parameter="sd_model",
    )


def _is_sdxl_refiner(ldm) -> bool:
    """The refiner conditions on an aesthetic score and has no CLIP-L text encoder."""
    embedders = list(getattr(getattr(ldm, "conditioner", None), "embedders", []) or [])
    keys = {getattr(e, "input_key", None) for e in embedders}
    return "aesthetic_score" in keys


def check_model_supported(ldm) -> None:
    """Refuse, with a message naming the model kind, what this extension cannot retouch.

    Supported: ε-prediction SD1.x/SD2.x-512 (ldm) and SDXL-family base models (sgm) — DDIM
    inversion here assumes ε and the layer tables cover these UNets."""
    if getattr(ldm, "is_sd3", False):
        raise LayoutRetouchError(
            "SD3 models are not supported (another network, the MMDiT, with no UNet "
            "self-attention layers to retouch); load an SD1.x or SDXL checkpoint",
            parameter="sd_model",
        )
    if not hasattr(ldm, "model") or not hasattr(getattr(ldm, "model", None), "diffusion_model"):
        raise LayoutRetouchError(
            "the loaded model has no UNet this extension knows (model.diffusion_model); "
            "load an SD1.x or SDXL checkpoint",
            parameter="sd_model",
        )
    if _is_sdxl_refiner(ldm):
        raise LayoutRetouchError(
            "the loaded model is the SDXL refiner, which is not a personalized model and "
            "cannot draw a layout; load your SDXL base/DreamBooth checkpoint",
            parameter="sd_model",
        )
    if getattr(ldm, "is_sdxl_inpaint", False) or _unet_in_channels(ldm) not in (None, 4):
        raise inpaint_refusal()
    if getattr(ldm, "parameterization", "eps") != "eps":
        raise prediction_refusal("v-prediction models (e.g. SD2.x 768, v-pred SDXL)")


def _unet_in_channels(ldm) -> Optional[int]:
    try:
        return int(ldm.model.diffusion_model.input_blocks[0][0].in_channels)
    except (AttributeError, IndexError, TypeError):
        return None


# --- k-diffusion hosts (Forge): a denoiser D(x; σ) instead of ε(z_t, t) -----------------------------
# DDIM's latent at timestep t is z_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε. A k-diffusion denoiser sees the same point
# on the σ scale, x = z_t/√ᾱ_t = x₀ + σ_t·ε with σ_t = √((1−ᾱ_t)/ᾱ_t), and returns D ≈ x₀; so
# ε = (x − D)/σ_t. (Forge's own DDIM, `modules/sd_samplers_timesteps.py`, converts the same way.)
def sigma_of_alpha_cumprod(alpha_cumprod: torch.Tensor) -> torch.Tensor:
    return ((1 - alpha_cumprod) / alpha_cumprod).sqrt()


def alpha_cumprod_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma * sigma)


def sigma_scale_input(z_t: torch.Tensor, alpha_cumprod_t: torch.Tensor) -> torch.Tensor:
    """DDIM latent z_t → the k-diffusion input x = z_t/√ᾱ_t (per batch row)."""
    return z_t / alpha_cumprod_t.sqrt().view(-1, *([1] * (z_t.ndim - 1)))


def eps_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ε from a k-diffusion denoiser's output D at input x and noise level σ (per batch row)."""
    return (x - denoised) / sigma.view(-1, *([1] * (x.ndim - 1)))


class LdmModel:
    """What the retouch needs from the host's diffusion model: ε, conditioning, VAE, ᾱ.

    Works over ldm's `LatentDiffusion` (SD1.x) and sgm's `DiffusionEngine` (SDXL) as A1111 hands
    them to extensions. `autocast` is the host's precision context (A1111: `devices.autocast`);
    plain float32 by default. `sdxl_crop` is the WebUI's SDXL crop setting (top, left) for the
    generated image's size terms.
    """

    def __init__(
        self,
        ldm,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        sdxl_crop: tuple[int, int] = (0, 0),
    ):
        self.ldm = ldm
        self.autocast = autocast
        self.family = model_family(ldm)
        self.sdxl_crop = sdxl_crop
        self.notes: list[str] = []  # what the model adapter had to do (e.g. a VAE upcast)

    @property
    def is_sdxl(self) -> bool:
        return self.family.sdxl

    @property
    def unet_holder(self):
        """The wrapper whose `diffusion_model` is called (swapped for DreamBooth's vanilla UNet)."""
        return self.ldm.model

    @property
    def unet(self) -> torch.nn.Module:
        return self.unet_holder.diffusion_model

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.ldm.alphas_cumprod

    def _apply(self, x, t, cond):
        # A1111 gives both model classes `apply_model(x, t, cond)`; bare sgm has only the wrapper,
        # which is what A1111's SDXL apply_model calls.
        if hasattr(self.ldm, "apply_model"):
            return self.ldm.apply_model(x, t, cond)
        return self.ldm.model(x, t, cond)

    def denoiser(self, unet: Optional[torch.nn.Module] = None) -> Denoiser:
        """ε of this model, or of the same model with another UNet (DreamBooth's vanilla) swapped in."""

        def eps(x, t, cond):
            with unet_swapped(self.unet_holder, unet), self.autocast():
                return self._apply(x, t, cond)

        return eps

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        with self.autocast():
            return self._apply(x, t, cond)

    # -- text -------------------------------------------------------------------------------------
    def text_encoder(self):
        """The encoder whose tokenizer gives token positions: SD1's CLIP, SDXL's first (CLIP-L)
        embedder — both SDXL encoders tokenize the same way, so positions agree."""
        encoder = getattr(self.ldm, "cond_stage_model", None)
        if self.is_sdxl or encoder is None:
            embedders = list(getattr(getattr(self.ldm, "conditioner", None), "embedders", []) or [])
            for e in embedders:
                if hasattr(e, "tokenize_line") or hasattr(e, "tokenizer"):
                    return e
        return encoder

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS, as the text encoder sees them."""
        encoder = self.text_encoder()
        if hasattr(
            encoder, "tokenize"
        ):  # A1111's FrozenCLIPEmbedderWithCustomWords (and its SDXL twin)
            return list(encoder.tokenize([text])[0])
        return list(encoder.tokenizer(text, add_special_tokens=False)["input_ids"])

    def subject_tokens(self, prompt: str, phrases: Sequence[str]) -> list[int]:
        """The conditioning rows of `phrases` in `prompt`: as the host's tokenizer splits the prompt
        into 75-token chunks where it has one (A1111's / Forge's `tokenize_line`, Textual-Inversion
        vectors included), else from the plain token ids."""
        encoder = self.text_encoder()  # SDXL: the CLIP-L embedder (both tokenize alike)
        if hasattr(encoder, "tokenize_line"):
            chunks, _ = encoder.tokenize_line(prompt)
            # [concept token, class phrase]; a photo-only subject has its class phrase only
            token, phrase = ["", *phrases][-2:]
            return subject_positions_in_chunks(
                chunks, lambda t: encoder.tokenize([t])[0], token, phrase
            )
        return subject_token_positions(self.tokenize, prompt, phrases)

    @torch.no_grad()
    def conditioning(
        self, prompts: Sequence[str], size: Optional[SizeTerms] = None, *, negative: bool = False
    ):
        """Conditioning of `prompts`: a tensor (SD1) or {"crossattn", "vector"} (SDXL) with `size`'s
        size terms (default 512² / the caller's generation size). `negative`: an all-empty
        negative prompt is SDXL's zero embedding, as the WebUI sends it."""
        with self.autocast():
            if not self.is_sdxl:
                return self.ldm.get_learned_conditioning(list(prompts))
            size = size or SizeTerms.of_generation(1024, 1024, self.sdxl_crop)
            return sdxl_conditioning(
                self.ldm.conditioner, prompts, size, negative=negative, device=self.device
            )

    def generation_size(self, width: int, height: int) -> SizeTerms:
        return SizeTerms.of_generation(width, height, self.sdxl_crop)

    # -- VAE ----------------------------------------------------------------------------------------
    def _vae_dtype(self) -> torch.dtype:
        return next(self.ldm.first_stage_model.parameters()).dtype

    def _vae(self, fn, x: torch.Tensor, what: str) -> torch.Tensor:
        """Run the VAE; if a half-precision VAE overflows (SDXL's does in fp16: NaN/inf, black
        images), run it again in float32 and put it back as it was."""
        vae = self.ldm.first_stage_model
        dtype = self._vae_dtype()
        with self.autocast():
            out = fn(x.to(self.device, dtype))
        if torch.isfinite(out).all() or dtype == torch.float32:
            return out
        try:
            vae.to(torch.float32)
            with torch.autocast(self.device.type, enabled=False):
                out = fn(x.to(self.device, torch.float32))
        finally:
            vae.to(dtype)
        note = f"half-precision VAE overflowed in {what}; ran it in float32 (set --no-half-vae to skip the retry)"
        if note not in self.notes:
            self.notes.append(note)
        return out

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) → latents. The posterior's mode, not a sample: the
        inversion must be deterministic for the reference cache to mean anything (sgm's inference
        VAE samples, so for SDXL the mode is taken from the moments directly)."""
        if self.is_sdxl:
            vae = self.ldm.first_stage_model

            def mode(x):
                moments = vae.quant_conv(vae.encoder(x))
                return moments.chunk(2, dim=1)[0]

            return self.ldm.scale_factor * self._vae(mode, images, "encode").float()

        def encode(x):
            posterior = self.ldm.encode_first_stage(x)
            z = posterior.mode() if hasattr(posterior, "mode") else posterior
            return self.ldm.get_first_stage_encoding(z)

        return self._vae(encode, images, "encode")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1]."""
        return self._vae(self.ldm.decode_first_stage, latents, "decode")


class KDiffusionModel(LdmModel):
    """A model whose network the host calls as a k-diffusion denoiser D(x; σ, cond) — Forge's
    `KModel.apply_model` — driven as ε(z_t, t) for DDIM and the retouch. The host adapter gives
    `denoise` (and anything else that differs: text, VAE); the conversion is here, host-free."""

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, x, t, cond):
        ac = self.alphas_cumprod.to(x.device, torch.float32)[t.long().to(x.device)]
        sigma = sigma_of_alpha_cumprod(ac)
        x_sigma = sigma_scale_input(x.float(), ac)
        return eps_from_denoised(x_sigma, self.denoise(x_sigma, sigma, cond).float(), sigma).to(
            x.dtype
        )
