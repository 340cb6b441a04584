"""Tier-only registration of the Forge tier's tiny Flux (and SDXL) models — the Forge counterpart of the
A1111 tier's tiny yamls. Nothing of Forge is changed on disk; this module is imported by the test-only
extension beside it (linked into the tier's data dir by tests/host/forge/conftest.py) and by
tests/host/forge_checkpoints.py (to check its files), and patches two functions at run time:

- `huggingface_guess.detection.detect_unet_config`: Forge's huggingface_guess recognises Flux by a key
  (`double_blocks.0.img_attn.norm.key_norm.scale`) but then returns Flux.1's *full* sizes, hard-coded
  (hidden 3072, depth 19/38, T5 width 4096, …; huggingface_guess/detection.py:133-148): a tiny
  transformer would be built full size (12 B parameters) and its weights would not fit. Patched: the
  sizes are read from the weights' shapes (as ComfyUI does) when they are not Flux.1's.
- `huggingface_guess.guess`: the text encoders and the VAE are built from the JSON configs of
  `backend/huggingface/<guess.huggingface_repo>/` (backend/loader.py:499-512; T5-XXL is 4.7 B
  parameters). For a tiny model the guess's `huggingface_repo` is pointed at a folder of tiny configs
  (`$LR_FORGE_TINY_HF/tiny-FLUX.1-dev`, written by forge_checkpoints.py; os.path.join keeps an absolute
  repo path). Its name still says FLUX / schnell, which Forge's Flux engine and LoRA key map read.
  The model class is not changed: Forge's `Flux` engine is chosen by `isinstance(guess, model_list.Flux)`.
- `huggingface_guess.model_list.models`: SD1.5/SDXL are matched by their UNet's sizes (SDXL:
  `model_channels 320, context_dim 2048, transformer_depth [0, 0, 2, 2, 10, 10], adm_in_channels 2816`;
  model_list.py:259-269). A subclass of `model_list.SDXL` with the tiny SDXL's sizes is put first
  (`TINY_SDXL_UNET`, 16-channel heads; its configs in `$LR_FORGE_TINY_HF/tiny-sdxl`): Forge's SDXL
  engine takes it (`isinstance(guess, model_list.SDXL)`, backend/loader.py:571-573).

A full-size checkpoint is never touched (its sizes equal the hard-coded ones). Without
LR_FORGE_TINY_HF nothing is patched.
"""

from __future__ import annotations

import os

ENV = "LR_FORGE_TINY_HF"
FLUX_DEV_DIR = "tiny-FLUX.1-dev"
FLUX_SCHNELL_DIR = "tiny-FLUX.1-schnell"
SDXL_DIR = "tiny-sdxl"
FLUX_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
# The tiny SDXL's UNet as huggingface_guess detects it (the keys model_list.SDXL matches on): SDXL's
# block layout (no attention at the first level, depth > 1 below) at 32 channels; context = CLIP-L 32 +
# CLIP-G 64; ADM = pooled CLIP-G 64 + 6 size terms × 256.
TINY_SDXL_UNET = {
    "model_channels": 32,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "context_dim": 96,
    "adm_in_channels": 64 + 6 * 256,
    "use_temporal_attention": False,
}
TINY_SDXL_HEAD_CHANNELS = 16
FLUX1_HIDDEN = 3072


def _count(keys, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in keys):
        n += 1
    return n


def flux_config_from_shapes(state_dict, prefix: str) -> dict | None:
    """The Flux transformer's constructor arguments read from its weights (None: not Flux)."""
    if prefix + FLUX_KEY not in state_dict:
        return None
    keys = [k for k in state_dict if k.startswith(prefix)]
    hidden, patch_in = state_dict[prefix + "img_in.weight"].shape
    head_dim = state_dict[prefix + FLUX_KEY].shape[0]
    mlp = state_dict[prefix + "double_blocks.0.img_mlp.0.weight"].shape[0]
    # BFL's rotary split of a head: (16, 56, 56) of 128; the tiny models use (d/4, 3d/8, 3d/8)
    axes = (
        [16, 56, 56] if head_dim == 128 else [head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8]
    )
    return {
        "image_model": "flux",
        "in_channels": patch_in // 4,
        "vec_in_dim": state_dict[prefix + "vector_in.in_layer.weight"].shape[1],
        "context_in_dim": state_dict[prefix + "txt_in.weight"].shape[1],
        "hidden_size": hidden,
        "mlp_ratio": mlp / hidden,
        "num_heads": hidden // head_dim,
        "depth": _count(keys, prefix + "double_blocks."),
        "depth_single_blocks": _count(keys, prefix + "single_blocks."),
        "axes_dim": axes,
        "theta": 10000,
        "qkv_bias": prefix + "double_blocks.0.img_attn.qkv.bias" in state_dict,
        "guidance_embed": prefix + "guidance_in.in_layer.weight" in state_dict,
    }


def is_tiny_flux(state_dict, prefix: str) -> bool:
    cfg = flux_config_from_shapes(state_dict, prefix)
    return cfg is not None and cfg["hidden_size"] != FLUX1_HIDDEN


def install(hf_root: str | None = None) -> bool:
    """Patch huggingface_guess (idempotent). `hf_root`: the folder holding the tiny config repos
    (default $LR_FORGE_TINY_HF). Returns whether it is installed."""
    hf_root = hf_root or os.environ.get(ENV)
    if not hf_root:
        return False
    import huggingface_guess
    from huggingface_guess import detection, model_list

    if getattr(huggingface_guess.guess, "_lr_tiny", False):
        return True

    class TinySDXL(model_list.SDXL):
        huggingface_repo = os.path.join(hf_root, SDXL_DIR)
        unet_config = dict(TINY_SDXL_UNET)
        unet_extra_config = {"num_heads": -1, "num_head_channels": TINY_SDXL_HEAD_CHANNELS}

    model_list.models.insert(0, TinySDXL)
    original_detect = detection.detect_unet_config
    original_guess = huggingface_guess.guess

    def detect_unet_config(state_dict, key_prefix):
        if is_tiny_flux(state_dict, key_prefix):
            return flux_config_from_shapes(state_dict, key_prefix)
        return original_detect(state_dict, key_prefix)

    def guess(state_dict):
        result = original_guess(state_dict)
        prefix = result.unet_key_prefix[0] if result is not None else ""
        if result is not None and is_tiny_flux(state_dict, prefix):
            name = (
                FLUX_SCHNELL_DIR if "schnell" in result.huggingface_repo.lower() else FLUX_DEV_DIR
            )
            result.huggingface_repo = os.path.join(guess._lr_tiny_root, name)
        return result

    guess._lr_tiny = True
    guess._lr_tiny_root = hf_root
    detection.detect_unet_config = detect_unet_config
    huggingface_guess.guess = guess
    return True
