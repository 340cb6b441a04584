"""SDXL's text conditioning with explicit size terms, through sgm's conditioner (A1111's model)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..conditioning import SizeTerms


def sdxl_conditioning(
    conditioner: torch.nn.Module,
    prompts: Sequence[str],
    size: SizeTerms,
    *,
    negative: bool = False,
    aesthetic_score: Optional[float] = None,
    device=None,
    dtype=None,
) -> dict:
    """{"crossattn", "vector"} for `prompts` through sgm's `GeneralConditioner`, as the WebUI's own
    `get_learned_conditioning` builds them, but with explicit size terms. An all-empty *negative*
    prompt gives zero text embeddings (SDXL's unconditional, and what the WebUI sends)."""
    prompts = list(prompts)
    n = len(prompts)
    for embedder in getattr(conditioner, "embedders", []):
        embedder.ucg_rate = 0.0  # never drop prompts at random at inference
    if device is None:
        device = next(conditioner.parameters()).device
    args = dict(device=device, dtype=dtype or torch.float32)
    score = aesthetic_score if aesthetic_score is not None else (2.5 if negative else 6.0)
    batch = {
        "txt": prompts,
        "original_size_as_tuple": torch.tensor([list(size.original_hw)], **args).repeat(n, 1),
        "crop_coords_top_left": torch.tensor([list(size.crop_top_left)], **args).repeat(n, 1),
        "target_size_as_tuple": torch.tensor([list(size.target_hw)], **args).repeat(n, 1),
        "aesthetic_score": torch.tensor([[score]], **args).repeat(
            n, 1
        ),  # read by refiner-type models only
    }
    zero = ["txt"] if negative and all(p == "" for p in prompts) else []
    out = conditioner(batch, force_zero_embeddings=zero)
    return {"crossattn": out["crossattn"], "vector": out["vector"]}
