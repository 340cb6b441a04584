"""ComfyUI's Flux.1 MODEL / CLIP / VAE as the retouch drives them: a `FluxModel` whose callables read
ComfyUI's objects (the Flux half of the ComfyUI adapter; `comfy_model` is the SD half and holds
what both read: the device, the weights' key, the VAE, the LATENT scale, the refusals).

Nothing here imports ComfyUI: the objects are handed in, and what must run inside ComfyUI (loading a
patcher: `comfy.model_management.load_models_gpu`) is a callable the glue passes. Facts (ComfyUI
v0.3.64, a125cd84):

- `patcher.model` is `comfy.model_base.Flux` (config `Flux`: ModelType.FLUX; `FluxSchnell`:
  ModelType.FLOW), its sampling object `CONST` + `ModelSamplingFlux` (dev; the ModelSamplingFlux
  node patches `shift` per resolution) or `ModelSamplingDiscreteFlow` (schnell): `calculate_input`
  hands x unscaled and `calculate_denoised` returns x − out·σ, so the transformer's output IS the
  rectified-flow velocity (x_σ = (1−σ)·x₀ + σ·ε, v = ε − x₀). `velocity` calls the network the
  way `BaseModel._apply_model` does (input, timestep, dtype casts, the MODEL's transformer options,
  so DIFFUSION_MODEL wrappers apply) and returns its output: the inversion asks for v at σ = 0,
  where denoised = x carries no velocity. The CI test checks v = (x − apply_model(x, σ))/σ at σ > 0.
- σ: the sampler's list (`comfy.samplers.calculate_sigmas` over the patched sampling object) when
  the glue hands it; else ComfyUI's "simple" scheduler over the sampling object's table
  (`simple_scheduler`, the same as Forge's: `dit.flow.simple_sigmas`).
- Text: `clip.tokenize(text)` → {"l": CLIP-L chunks, "t5xxl": T5 tokens}; `encode_from_tokens(…,
  return_pooled=True)` → (T5 states (1, ≥256, 4096), pooled CLIP-L (1, 768)), what CLIPTextEncode
  puts in a CONDITIONING (`[[T5 states, {"pooled_output": pooled}]]`). The distilled guidance is
  the FluxGuidance node's `guidance` value (`model_base.Flux.extra_conds` uses 3.5 when absent).
- Subject rows: T5 has no BOS, so T5 token i is row i; ComfyUI tokenizes word by word
  (`sd1_clip.SDTokenizer`), so a phrase tokenized alone gives the pieces it has in the prompt.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ...conditioning import pad_tokens
from ...dit.flow import simple_sigmas
from ...dit.flux.family import DEFAULT_GUIDANCE, stage1_layout_refusal
from ...dit.flux.model import FluxModel
from ...errors import LayoutRetouchError
from .sd import (
    ComfyObjects,
    is_flux,
    model_sampling,
    token_ids,
    transformer_options,
)

T5_END = 1  # ComfyUI's T5XXLTokenizer: EOS 1, padding 0 (no start token)


def check_blocks_free(patcher, input_name: str = "model") -> None:
    """Another node's DiT block replacement (`patches_replace["dit"]`: PuLID, some caches) runs
    instead of the blocks the retouch edits: refuse, naming it, instead of retouching nothing."""
    options = getattr(patcher, "model_options", {}) or {}
    replaced = ((options.get("transformer_options") or {}).get("patches_replace") or {}).get("dit")
    if replaced:
        names = ", ".join(sorted(f"{kind} {i}" for kind, i in replaced))
        raise LayoutRetouchError(
            f"another node replaces Flux blocks on '{input_name}' ({names}, via "
            "patches_replace['dit']), which the retouch must edit; take that node out of the MODEL "
            "path that feeds this one",
            parameter=input_name,
        )


class ComfyFluxModel(ComfyObjects, FluxModel):
    """`FluxModel` over a ComfyUI Flux MODEL (see module doc). `patcher`: the glue's clone of the
    user's MODEL; `clip`, `vae`: ComfyUI's CLIP and VAE objects; `load_model(patcher)` loads a
    patcher with its weight patches (LoRA); `sigmas(steps, latent_hw)`: the sampler's σ list;
    `guidance`: the distilled guidance (dev; schnell has no guidance embedding and ignores it)."""

    def __init__(
        self,
        patcher,
        clip,
        vae,
        *,
        load_model: Callable = lambda patcher: None,
        sigmas: Optional[Callable] = None,
        guidance: float = DEFAULT_GUIDANCE,
    ):
        if not is_flux(patcher):
            raise ValueError("ComfyFluxModel needs a Flux.1 MODEL (comfy_model.check_supported)")
        self.patcher, self.clip, self.vae = patcher, clip, vae
        self.load_model = load_model
        self._last_encoded: Optional[tuple] = None
        super().__init__(
            patcher.model.diffusion_model,
            encode_t5=self._encode_t5,
            encode_clip=self._encode_clip,
            tokenize_t5=self._tokenize_t5,
            velocity=self._network_velocity,
            shift=False,
            sigmas=sigmas or self._simple_sigmas,
            guidance=guidance,
        )
        params = getattr(self.transformer, "params", None)  # comfy.ldm.flux.model.FluxParams
        self.guidance_embed = bool(getattr(params, "guidance_embed", self.guidance_embed))

    def _simple_sigmas(self, steps: int, latent_hw) -> list[float]:
        """ComfyUI's "simple" scheduler (`comfy/samplers.py` simple_scheduler)."""
        return simple_sigmas(model_sampling(self.patcher).sigmas, steps)

    def _network_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict):
        """The network's output at (x, σ), called as `BaseModel._apply_model` calls it (the sampling
        object's input and timestep, the model's compute dtype, the conds cast to it, the MODEL's
        transformer options): under CONST that output IS the velocity. Not through `apply_model`,
        which returns x − out·σ: at σ = 0, where the inversion starts, that is x and says nothing."""
        self.load_model(self.patcher)
        base, sampling = self.patcher.model, model_sampling(self.patcher)
        device = self.device
        dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        sd = sigma.to(device).float()
        guidance = cond["guidance"].to(device, dtype) if self.guidance_embed else None
        out = base.diffusion_model(
            sampling.calculate_input(sd, x.to(device)).to(dtype),
            sampling.timestep(sd).float(),
            context=cond["crossattn"].to(device, dtype),
            y=cond["vector"].to(device, dtype),
            guidance=guidance,
            control=None,
            transformer_options=transformer_options(self.patcher, sd),
        )
        return out.float().to(x.device)

    # -- text -------------------------------------------------------------------------------------
    def _tokenize_t5(self, text: str) -> list[int]:
        """T5 token ids laid out as the T5 states' rows (no BOS; EOS and padding dropped)."""
        tokens = self.clip.tokenize(text)
        if "t5xxl" not in tokens:
            raise LayoutRetouchError(
                "the CLIP on 'clip' gives no t5xxl tokens: connect Flux.1's text encoders "
                "(DualCLIPLoader, type flux: clip_l + t5xxl)",
                parameter="clip",
            )
        return token_ids(tokens["t5xxl"], end_token=T5_END, has_start=False)

    def _encode_t5(self, prompts) -> torch.Tensor:
        return self._encoded(prompts)[0]

    def _encode_clip(self, prompts) -> torch.Tensor:
        return self._encoded(prompts)[1]

    @torch.no_grad()
    def _encoded(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 states (B, L, d), pooled CLIP-L (B, d)) as CLIPTextEncode makes them; prompts whose
        T5 tokens run past ComfyUI's 256 minimum are padded to the longest (`pad_tokens`). One
        entry is kept: `FluxModel.conditioning` asks for the T5 and the pooled half in turn."""
        key = tuple(prompts)
        if self._last_encoded is not None and self._last_encoded[0] == key:
            return self._last_encoded[1]
        states, pooled = [], []
        for text in prompts:
            cond, vector = self.clip.encode_from_tokens(
                self.clip.tokenize(text), return_pooled=True
            )
            states.append(cond.float())
            pooled.append(vector.float())
        device = self.device
        encoded = torch.cat(pad_tokens(states)).to(device), torch.cat(pooled).to(device)
        self._last_encoded = (key, encoded)
        return encoded


def comfy_flux_model(
    patcher,
    clip,
    vae,
    *,
    load_model: Callable = lambda patcher: None,
    sigmas: Optional[Callable] = None,
    guidance: Optional[float] = None,
) -> ComfyFluxModel:
    """The FluxModel of a ComfyUI Flux MODEL (see `ComfyFluxModel`); `guidance` None: 3.5, what
    ComfyUI's Flux uses without a FluxGuidance node."""
    return ComfyFluxModel(
        patcher,
        clip,
        vae,
        load_model=load_model,
        sigmas=sigmas,
        guidance=DEFAULT_GUIDANCE if guidance is None else float(guidance),
    )


class ComfyFlux:
    """ComfyUI's Flux.1 MODELs (dev, schnell) as the nodes ask about them (the questions:
    `adapters.comfy.ModelFamily`): the rectified flow on ComfyUI's σ list, the distilled guidance."""

    name = "Flux.1"

    def matches(self, patcher) -> bool:
        return is_flux(patcher)

    def check_free(self, patcher, input_name: str = "model") -> None:
        check_blocks_free(patcher, input_name)

    def encoder(self, encode: Callable, guidance: float) -> Callable:
        """CLIPTextEncode followed by FluxGuidance: the CONDITIONING carries the distilled guidance."""
        return lambda clip, text: with_guidance(encode(clip, text), guidance)

    def continuation_noise(self, x: torch.Tensor, latent: torch.Tensor, sigma: float):
        """The flow (`CONST`) starts a pass at x = σ·noise + (1−σ)·latent and returns x/(1−σ):
        x·(1−σ) = σ·noise + (1−σ)·latent."""
        return (1 - sigma) * (x - latent) / sigma

    def stage1_layout_source(self) -> str:
        raise stage1_layout_refusal()

    def model(self, patcher, clip, vae, *, load_model: Callable, sigmas: Callable, guidance):
        """`ComfyFluxModel` stepping on `sigmas(steps, latent_hw)` (the sampler's σ list)."""
        return comfy_flux_model(
            patcher, clip, vae, load_model=load_model, sigmas=sigmas, guidance=guidance
        )

    def check_schedule(self, lib_model, steps: int, latent_hw, scheduler: str) -> None:
        """The flow sampler needs σ strictly falling to 0: refuse a scheduler whose list is not."""
        try:
            lib_model.schedule(steps, latent_hw)
        except ValueError as e:
            raise LayoutRetouchError(
                f"the scheduler '{scheduler}' gives Flux a σ list the flow retouch cannot step "
                f"({e}); use 'simple' (Flux's default) or 'beta'",
                parameter="scheduler",
            ) from e


def with_guidance(conditioning, guidance: float) -> list:
    """The CONDITIONING with Flux's distilled guidance set, as the FluxGuidance node sets it
    (`node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})`)."""
    return [[t, {**d, "guidance": guidance}] for t, d in conditioning]


COMFY_FLUX = ComfyFlux()

__all__ = [
    "COMFY_FLUX",
    "T5_END",
    "ComfyFlux",
    "ComfyFluxModel",
    "check_blocks_free",
    "comfy_flux_model",
    "with_guidance",
]
