"""The model interface the retouch needs from a Flux.1 transformer (a joint-attention DiT), host-free.

Everything host-specific is handed in as callables (the Forge adapter builds them from Forge's engine;
the tests from tiny models):
- the transformer, a module with BFL's structure (`double_blocks`, `single_blocks`, `pe_embedder`)
  whose forward is `transformer(x, σ, context=…, y=…, guidance=…)` on the unpacked latent and returns
  the velocity (Forge's `IntegratedFluxTransformer2DModel`, ComfyUI's `Flux`, tests' `TinyFlux`); or a
  `velocity(x, σ, cond)` callable for hosts that call it differently;
- `encode_t5(prompts)` → (B, L, d) T5 states, `encode_clip(prompts)` → (B, d) pooled CLIP-L;
- `tokenize_t5(text)` / `tokenize_clip(text)` → token ids without specials;
- `vae_encode(images)` / `vae_decode(latents)` (scale and shift factors included).

The conditioning is a dict, so `conditioning.py` batches it like SDXL's:
`{"crossattn": T5 states, "vector": pooled CLIP, "guidance": (B,) distilled guidance}`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch

from ...conditioning import CHUNK, rows
from ...errors import LayoutRetouchError
from ...prompts import subject_token_positions
from .. import flow
from ..joint import SHIFTED
from ..tokens import image_ids, pack, token_grid, unpack
from .family import DEFAULT_GUIDANCE, FluxFamily


# -- subject tokens --------------------------------------------------------------------------------
def piece_positions(
    tokenize: Callable[[str], list[int]], prompt: str, phrases: Sequence[str]
) -> list[int]:
    """Indices of every occurrence of every phrase's token ids in the prompt's ids (no specials).

    SentencePiece (T5) splits a rare word into several pieces (`sks` → `▁s`, `k`, `s`); a phrase is
    tokenized alone, where it starts a word exactly as inside the prompt (`▁` marks a word start),
    so the phrase's piece sequence is searched in the prompt's. Each occurrence gives all its pieces.
    T5 has no BOS: index i is row i of the T5 states."""
    ids = list(tokenize(prompt))
    found: set[int] = set()
    for phrase in phrases:
        if not phrase or not phrase.strip():
            continue
        pids = list(tokenize(phrase.strip()))
        n = len(pids)
        for i in range(len(ids) - n + 1) if n else ():
            if ids[i : i + n] == pids:
                found.update(range(i, i + n))
    if not found:
        wanted = ", ".join(f"'{p}'" for p in phrases if p and p.strip()) or "(none given)"
        raise LayoutRetouchError(
            f"none of the subject words {wanted} appears in the prompt '{prompt}' as T5 reads it, "
            "so the image→text attention mask has nothing to follow: set the class phrase to a word "
            "that is in the prompt (e.g. dog for 'a sks dog on a beach')",
            parameter="class_phrase",
        )
    return sorted(found)


class FluxModel:
    """Velocity, conditioning, subject tokens, VAE and σ schedule of a Flux.1 model (see module doc)."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        *,
        encode_t5: Callable[[Sequence[str]], torch.Tensor],
        encode_clip: Callable[[Sequence[str]], torch.Tensor],
        tokenize_t5: Callable[[str], list[int]],
        tokenize_clip: Optional[Callable[[str], list[int]]] = None,
        vae_encode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        vae_decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        velocity: Optional[Callable] = None,
        shift: bool = True,
        sigmas: Optional[Callable[[int, tuple[int, int]], Sequence[float]]] = None,
        solver: str = flow.MIDPOINT,
        reference_rope: str = SHIFTED,
        reference_with_target_tokens: bool = False,
        vanilla: Optional[Callable[[], ContextManager]] = None,
        guidance: float = DEFAULT_GUIDANCE,
    ):
        self.transformer = transformer
        self._encode_t5, self._encode_clip = encode_t5, encode_clip
        self.tokenize_t5, self.tokenize_clip = tokenize_t5, tokenize_clip
        self._vae_encode, self._vae_decode = vae_encode, vae_decode
        self._velocity = velocity
        self.shift = shift  # dev: resolution-dependent shift; schnell: none
        self._sigmas = sigmas  # the host sampler's σ list for (steps, latent hw), if it has one
        self.guidance_embed = bool(getattr(transformer, "guidance_embed", True))
        self.guidance = float(guidance)  # the distilled guidance (Forge's "Distilled CFG Scale")
        # stage 1's vanilla model: a context in which the transformer is the vanilla one (the host
        # turns the subject's LoRA off, or swaps a vanilla checkpoint in); None: the same model
        self.vanilla = vanilla or contextlib.nullcontext
        # the model family (retouch.family.ModelFamily) with the DiT choices
        self.family = FluxFamily(solver, reference_rope, reference_with_target_tokens)
        self.notes: list[str] = []

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # -- network ------------------------------------------------------------------------------------
    def velocity(self, x: torch.Tensor, sigma, cond: dict) -> torch.Tensor:
        """v(x, σ) for a batch; `sigma` a float or (B,) tensor; cond the dict of `conditioning`."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if self._velocity is not None:
            return self._velocity(x, sigma, cond)
        guidance = cond.get("guidance") if self.guidance_embed else None
        return self.transformer(
            x, sigma, context=cond["crossattn"], y=cond["vector"], guidance=guidance
        )

    def schedule(self, steps: int, latent_hw: Sequence[int]) -> flow.FlowSchedule:
        if self._sigmas is not None:
            return flow.FlowSchedule.from_sigmas(self._sigmas(steps, tuple(latent_hw)))
        return flow.FlowSchedule.for_image(steps, tuple(latent_hw), shift=self.shift)

    # -- text ---------------------------------------------------------------------------------------
    def conditioning(
        self,
        prompts: Sequence[str],
        guidance: Optional[float] = None,
        *,
        negative: bool = False,
        pooled_from: Optional[Sequence[str]] = None,
    ) -> dict:
        """{"crossattn", "vector", "guidance"} of `prompts`; the pooled vector of `pooled_from`
        (same length) when given. `guidance`: the distilled guidance (None: the model's)."""
        prompts = list(prompts)
        t5 = self._encode_t5(prompts)
        pooled = self._encode_clip(list(pooled_from) if pooled_from is not None else prompts)
        guidance = self.guidance if guidance is None else float(guidance)
        g = torch.full((len(prompts),), guidance, device=t5.device, dtype=torch.float32)
        return {"crossattn": t5, "vector": pooled.to(t5.device), "guidance": g}

    def subject_tokens(self, prompt: str, phrases: Sequence[str]) -> list[int]:
        """Rows of the T5 states that hold the subject (what the mask's image→text maps read)."""
        return piece_positions(self.tokenize_t5, prompt, phrases)

    def clip_subject_tokens(self, prompt: str, phrases: Sequence[str]) -> list[int]:
        """Rows of CLIP's 77-token states that hold the subject (BOS first). Flux reads only CLIP's
        pooled vector, so no attention map exists for them; given for hosts that show them."""
        if self.tokenize_clip is None:
            return []

        return subject_token_positions(self.tokenize_clip, prompt, phrases, CHUNK - 2)

    # -- the retouch (pipeline.encode_prompts asks for these) -----------------------------------
    def retouch_conds(self, prompts, negative_prompt: str = "", guidance: Optional[float] = None):
        """pipeline.RetouchConds of y_r, y_p and the negative prompt. The target path attends with
        y_r's T5 tokens but keeps the layout's pooled CLIP vector: the vector is no attention (it
        modulates every block), and with y_r's the target would leave the layout while every block
        copies it (as SDXL's vector, docs/ALGORITHM.md)."""
        from ...retouch import RetouchConds

        c = self.conditioning([prompts.reference, prompts.personalized, negative_prompt], guidance)
        reference, layout = rows(c, slice(0, 1)), rows(c, slice(1, 2))
        empty = self.conditioning([""], guidance)
        return RetouchConds(
            reference=reference,
            layout=layout,
            uncond=rows(c, slice(2, 3)),
            target={**reference, "vector": layout["vector"]},
            reference_empty=empty,
            layout_empty=empty,
        )

    # -- VAE ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self._vae_encode is None:
            raise LayoutRetouchError("this Flux model was given no VAE encoder", parameter="vae")
        return self._vae_encode(images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self._vae_decode is None:
            raise LayoutRetouchError("this Flux model was given no VAE decoder", parameter="vae")
        return self._vae_decode(latents)


__all__ = [
    "FluxModel",
    "image_ids",
    "pack",
    "piece_positions",
    "token_grid",
    "unpack",
]
