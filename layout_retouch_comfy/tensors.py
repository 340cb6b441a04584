"""ComfyUI's IMAGE / MASK / LATENT tensors ↔ what the library takes and gives (torch only).

IMAGE: (B, H, W, C) float in [0, 1]; MASK: (B, H, W) or (H, W) float in [0, 1], 1 = change here;
LATENT: {"samples": (B, C, h, w) raw VAE latents, optional "noise_mask", "batch_index"}.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.job import regions_to_image
from lib_layout_retouch.masks import NO_REGION
from lib_layout_retouch.params import MAX_REFERENCES


def reference_photos(image: Optional[torch.Tensor]) -> list[Image.Image]:
    """An IMAGE batch → one PIL photo per image (a batch = several photos of the subject)."""
    if image is None or image.numel() == 0:
        return []
    if image.ndim == 3:
        image = image[None]
    if image.shape[0] > MAX_REFERENCES:
        raise LayoutRetouchError(
            f"reference has {image.shape[0]} photos but at most {MAX_REFERENCES} are used: batch "
            f"at most {MAX_REFERENCES} images into it",
            parameter="reference_image",
        )
    arr = (image[..., :3].float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a, "RGB") for a in arr]


def mask_at(
    mask: torch.Tensor, batch: int, hw: tuple[int, int], name: str = "mask"
) -> torch.Tensor:
    """A MASK (image resolution) → (batch or 1, 1, h, w) in [0, 1] at `hw` (area average), the
    retouch's user mask; batch 1 applies to every image. `name`: the node input, for the message."""
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[0] not in (1, batch):
        raise LayoutRetouchError(
            f"{name} has shape {tuple(mask.shape)}: give one mask, or one per image of the batch "
            f"({batch})",
            parameter=name,
        )
    m = F.interpolate(m[:, None], size=hw, mode="area") if tuple(m.shape[-2:]) != hw else m[:, None]
    return m.clamp(0, 1)


def retouch_mask(
    noise_mask: Optional[torch.Tensor],
    subject_mask: Optional[torch.Tensor],
    batch: int,
    hw: tuple[int, int],
) -> Optional[torch.Tensor]:
    """The retouch's user mask (`mask_at`): the inpaint mask (it bounds stage 1 too), times the
    subject mask (it bounds the retouch only: stage 1 draws the whole picture); None: neither."""
    masks = [mask_at(noise_mask, batch, hw)] if noise_mask is not None else []
    if subject_mask is not None:
        masks.append(mask_at(subject_mask, batch, hw, name="subject_mask"))
    return None if not masks else masks[0] if len(masks) == 1 else masks[0] * masks[1]


def maps_to_mask(maps: Optional[torch.Tensor], batch: int, hw: tuple[int, int]) -> torch.Tensor:
    """(N, h', w') maps in [0, 1] (or None: zeros) → MASK (N, H, W), nearest so cells stay visible."""
    if maps is None:
        return torch.zeros(batch, *hw)
    m = maps.float().cpu()
    return F.interpolate(m[:, None], size=hw, mode="nearest")[:, 0].clamp(0, 1)


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """MASK (N, H, W) → grey IMAGE (N, H, W, 3)."""
    return mask[..., None].expand(*mask.shape, 3).contiguous()


def regions_to_images(
    regions: Optional[torch.Tensor], mask: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """The subjects' regions as an IMAGE (N, H, W, 3): each subject's region in its colour
    (`job.regions_to_image`, the WebUI's intermediates' colours), black outside every region.
    `regions`: (N, h', w') subject index (masks.NO_REGION outside); None (one subject): the
    subject's region is where the blend MASK (N, H, W) is at least ½."""
    if regions is None:
        regions = torch.where(mask >= 0.5, 0, NO_REGION)
    h, w = hw
    pictures = [np.asarray(regions_to_image(r, (w, h))) for r in regions.cpu()]
    return torch.from_numpy(np.stack(pictures)).float() / 255
