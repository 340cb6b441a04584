"""Tiny random-weight networks shared by the benchmark (bench_retouch.py --config tiny / tiny-sdxl)
and the tests (tests/tiny_models.py, tests/tiny_sdxl.py build their models from these): the weight
fixes every random model needs, and the "ldm" build of the tiny SDXL. Nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch


def reinit_zero_weights(
    module: torch.nn.Module, generator: torch.Generator, std: float = 0.05
) -> int:
    """Re-draw every parameter that is exactly zero everywhere (ldm's zero_module init). Returns the count."""
    n = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
                n += 1
    return n


def tame_output(unet: torch.nn.Module, factor: float = 0.1) -> None:
    """Scale the UNet's output conv. A trained ε-predictor changes smoothly with its input; a random
    one is far rougher, which breaks DDIM inversion (ε(z_k) ≠ ε(z_k+1)) and lets fp16 overflow. A
    small output conv makes ε smooth enough for the inversion round trip while attention still
    changes the output measurably."""
    with torch.no_grad():
        unet.out[-1].weight.mul_(factor)
        unet.out[-1].bias.mul_(factor)


SGM_DIR_DEFAULT = "/work/host/webui/repositories/generative-models"
CLIP_L_WIDTH, CLIP_G_WIDTH, SIZE_DIM = 32, 64, 32  # the "ldm" build
LDM_CONTEXT = CLIP_L_WIDTH + CLIP_G_WIDTH
LDM_ADM = CLIP_G_WIDTH + 3 * 2 * SIZE_DIM


def sgm_status() -> tuple[bool, str]:
    """(importable, reason). Puts the sgm folder on sys.path when found."""
    folder = os.environ.get("LR_SGM_DIR") or SGM_DIR_DEFAULT
    if os.path.isdir(os.path.join(folder, "sgm")) and folder not in sys.path:
        sys.path.append(folder)
    try:
        import sgm.models.diffusion  # noqa: F401
        import sgm.modules.diffusionmodules.openaimodel  # noqa: F401
    except Exception as e:  # not installed, or a dependency (kornia, open_clip) missing
        return False, (
            f"sgm (Stability-AI generative-models) is not importable ({type(e).__name__}: {e}); "
            "it is not on PyPI — set LR_SGM_DIR to a generative-models checkout "
            "(tests/host/setup_webui.sh makes one) to run the real-sgm variants"
        )
    return True, ""


def sdxl_like_unet_config(context_dim: int = LDM_CONTEXT, adm: int = LDM_ADM) -> tuple[dict, int]:
    """ldm UNetModel arguments and the vector width. (This ldm has no `num_classes="sequential"`:
    `label_emb` is added after construction with sgm's exact structure and names.)"""
    return dict(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[1, 2, 4],
        num_res_blocks=2,
        channel_mult=[1, 2, 2],
        num_head_channels=16,
        use_spatial_transformer=True,
        use_linear_in_transformer=True,
        transformer_depth=2,
        context_dim=[context_dim] * 2,
        use_checkpoint=False,
        legacy=False,
    ), adm


class UNetWrapper(torch.nn.Module):
    """sgm's OpenAIWrapper: (x, t, {"crossattn", "vector"}) → the UNet. (This ldm's SpatialTransformer
    indexes its context per transformer block, so it gets the same context once per block.)"""

    def __init__(self, unet, depth: Optional[int] = 2):
        super().__init__()
        self.diffusion_model = unet
        self.depth = depth

    def forward(self, x, t, c):
        context = c["crossattn"] if self.depth is None else [c["crossattn"]] * self.depth
        return self.diffusion_model(x, timesteps=t, context=context, y=c["vector"])


class TinySdxlLike(torch.nn.Module):
    """The attributes the library reads of A1111's SDXL model (sgm DiffusionEngine + extend_sdxl)."""

    scale_factor = 0.13025
    is_sdxl = True
    parameterization = "eps"

    def __init__(self, unet, vae, conditioner):
        super().__init__()
        self.model = UNetWrapper(unet)
        self.first_stage_model = vae
        self.conditioner = conditioner
        self.register_buffer("alphas_cumprod", legacy_alphas_cumprod())

    def decode_first_stage(self, z):
        return self.first_stage_model.decode(z / self.scale_factor)


def legacy_alphas_cumprod() -> torch.Tensor:
    """SD's 'scaled linear' β schedule (sgm LegacyDDPMDiscretization; what A1111 sets for SDXL)."""
    betas = torch.linspace(0.00085**0.5, 0.0120**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def ldm_sdxl_unet() -> torch.nn.Module:
    """ldm's UNetModel in SDXL configuration, with sgm's `label_emb` (the vector's input)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    config, adm = sdxl_like_unet_config()
    unet = UNetModel(**config)
    ted = unet.model_channels * 4
    unet.label_emb = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(adm, ted), torch.nn.SiLU(), torch.nn.Linear(ted, ted))
    )
    unet.num_classes = "sequential"
    return unet
