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

from typing import Callable, Optional, Sequence

import torch

from . import flow
from .conditioning import CHUNK
from .errors import LayoutRetouchError

FLUX = "Flux"
DEFAULT_GUIDANCE = 3.5  # Flux.1-dev's distilled guidance (Forge's "Distilled CFG Scale" default)


# -- tokens ↔ latent (BFL's packing; the host's transformer does it itself, the editor needs the map) --
def token_grid(latent_hw: Sequence[int]) -> tuple[int, int]:
    """(rows, cols) of 2×2-patch image tokens; odd sizes are padded by one (Forge's circular pad)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    return (h + 1) // 2, (w + 1) // 2


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): token order row-major over the grid, channels (c, ph, pw)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack needs an even latent size, got {h}×{w}")
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)


def unpack(tokens: torch.Tensor, latent_hw: Sequence[int]) -> torch.Tensor:
    h, w = int(latent_hw[0]), int(latent_hw[1])
    b, n, c4 = tokens.shape
    c = c4 // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(
    grid: Sequence[int], col_offset: int = 0, device=None, dtype=torch.float32
) -> torch.Tensor:
    """(1, rows·cols, 3) RoPE ids of the image tokens: (0, row, col + col_offset) — BFL's img_ids;
    text tokens have ids (0, 0, 0)."""
    gh, gw = int(grid[0]), int(grid[1])
    ids = torch.zeros(gh, gw, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(gh, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=dtype)[None, :] + col_offset
    return ids.reshape(1, gh * gw, 3)


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

    family = FLUX
    is_sdxl = False

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
    ):
        self.transformer = transformer
        self._encode_t5, self._encode_clip = encode_t5, encode_clip
        self.tokenize_t5, self.tokenize_clip = tokenize_t5, tokenize_clip
        self._vae_encode, self._vae_decode = vae_encode, vae_decode
        self._velocity = velocity
        self.shift = shift  # dev: resolution-dependent shift; schnell: none
        self._sigmas = sigmas  # the host sampler's σ list for (steps, latent hw), if it has one
        self.guidance_embed = bool(getattr(transformer, "guidance_embed", True))
        self.notes: list[str] = []

    # the pipeline's names for the network that is patched
    @property
    def unet(self) -> torch.nn.Module:
        return self.transformer

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
    @torch.no_grad()
    def conditioning(
        self,
        prompts: Sequence[str],
        guidance: float = DEFAULT_GUIDANCE,
        *,
        pooled_from: Optional[Sequence[str]] = None,
    ) -> dict:
        """{"crossattn", "vector", "guidance"} of `prompts`; the pooled vector of `pooled_from`
        (same length) when given — the target path attends with y_r's T5 tokens but keeps the
        layout's pooled vector (docs/ALGORITHM.md, DiT: the vector is not attention)."""
        prompts = list(prompts)
        t5 = self._encode_t5(prompts)
        pooled = self._encode_clip(list(pooled_from) if pooled_from is not None else prompts)
        g = torch.full((len(prompts),), float(guidance), device=t5.device, dtype=torch.float32)
        return {"crossattn": t5, "vector": pooled.to(t5.device), "guidance": g}

    def subject_tokens(self, prompt: str, phrases: Sequence[str]) -> list[int]:
        """Rows of the T5 states that hold the subject (what the mask's image→text maps read)."""
        return piece_positions(self.tokenize_t5, prompt, phrases)

    def clip_subject_tokens(self, prompt: str, phrases: Sequence[str]) -> list[int]:
        """Rows of CLIP's 77-token states that hold the subject (BOS first). Flux reads only CLIP's
        pooled vector, so no attention map exists for them; given for hosts that show them."""
        if self.tokenize_clip is None:
            return []
        from .prompts import subject_token_positions

        return subject_token_positions(self.tokenize_clip, prompt, phrases, CHUNK - 2)

    # -- the retouch (pipeline.retouch_family / encode_prompts ask for these) ------------------------
    def retouch_family(self, settings, subject_tokens, latent_hw, n_references: int = 1):
        """The DiT family: rectified flow with `settings.flow_solver`, the DiT layer table, the block
        editor; real CFG only when `guidance_scale` ≠ 1 (Flux-dev's distilled guidance is in the
        conditioning)."""
        from .attention import COND, UNCOND
        from .dit_attention import DiTRetouchAttention, layer_table_for_dit, patched_blocks
        from .sampling import FlowSampler, RetouchFamily

        layers = settings.layers or layer_table_for_dit(self.transformer, settings.layer_preset)
        editor = DiTRetouchAttention(
            layers,
            subject_tokens,
            latent_hw,
            n_references,
            rope_of=getattr(self.transformer, "pe_embedder", None),
            reference_rope=settings.reference_rope,
            with_target_tokens=settings.reference_with_target_tokens,
        )
        sampler = FlowSampler(
            self.schedule(settings.schedule.steps, latent_hw), settings.flow_solver
        )
        return RetouchFamily(
            sampler,
            layers,
            editor,
            lambda: patched_blocks(self.transformer, editor),
            self.velocity,
            (UNCOND, COND) if settings.guidance_scale != 1 else (COND,),
        )

    def retouch_conds(self, prompts, negative_prompt: str = "", guidance: float = DEFAULT_GUIDANCE):
        """pipeline.RetouchConds of y_r, y_p and the negative prompt. The target path attends with
        y_r's T5 tokens but keeps the layout's pooled CLIP vector: the vector is no attention (it
        modulates every block), and with y_r's the target would leave the layout while every block
        copies it (as SDXL's vector, docs/ALGORITHM.md)."""
        from .conditioning import rows
        from .pipeline import RetouchConds

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

    def generation_size(self, width: int, height: int) -> None:
        """No size terms (SDXL's): Flux conditions on text only (job.retouch asks every model)."""
        return None

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
    "FLUX",
    "FluxModel",
    "image_ids",
    "pack",
    "piece_positions",
    "token_grid",
    "unpack",
]
