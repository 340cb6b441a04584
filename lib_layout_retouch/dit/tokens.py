"""Image tokens of a Flux-architecture DiT: the latent's 2×2 patches, their order and their rotary
position ids (BFL's packing; the host's transformer packs by itself, the retouch needs the map)."""

from __future__ import annotations

from typing import Sequence

import torch


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
