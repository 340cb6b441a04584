"""Forge's VAE encode as the retouch needs it, for every Forge engine family (SD1.x, SDXL, Flux.1).

Forge's `VAE.encode` samples the posterior (from the global RNG); the reference's and the layout's
inversion must be deterministic for the inversion cache to mean anything, so the retouch encodes with
the posterior's mode: `first_stage_model.encode(x in [−1, 1], regulation=mode)` (Forge dfdcbab6,
`backend/nn/vae.py`), then `process_in` = (z − shift)·scale (`backend/patcher/vae.py`), the latent the
engine's sampler works in. Nothing here imports Forge: the engine's `forge_objects.vae` is handed in,
and `load_model(patcher)` (Forge's `memory_management.load_model_gpu`) puts its model on its device.
"""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def encode_mode(vae, images: torch.Tensor, load_model: Callable) -> torch.Tensor:
    """Images in [−1, 1] (B, 3, H, W) → the engine's latents (float32, on the images' device)."""
    load_model(vae.patcher)
    x = images.to(vae.device, vae.vae_dtype)
    z = vae.first_stage_model.encode(x, regulation=lambda posterior: posterior.mode())
    return vae.first_stage_model.process_in(z.float()).to(images.device)


__all__ = ["encode_mode"]
