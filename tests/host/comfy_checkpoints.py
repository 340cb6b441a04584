"""Full-size random-weight SD1.5 models for the ComfyUI host tier (tests/host/comfy/), built with
ComfyUI's own modules (no Forge needed): the same recipe and sizes as `forge_checkpoints.py` (whose
UNet config, randomisation, LoRA and embedding writers are reused), ldm key names, fp16.

    <root>/checkpoints/comfy-personal.safetensors   the "personalized" (DreamBooth) model, seed 1
    <root>/checkpoints/comfy-vanilla.safetensors    the "vanilla" model, seed 2 (same architecture)
    <root>/loras/comfy-lora.safetensors              kohya LoRA (rank 4) on the UNet's attention
                                                     projections and the text encoder's layers
    <root>/embeddings/comfy-concept.safetensors      SD1.5 Textual-Inversion embedding (2 × 768)

ComfyUI's modules are built without weight init (`comfy.ops.disable_weight_init`): every module is
initialised by its torch base class first, then randomised as `forge_checkpoints._randomise` does.
The UNet is built in fp16 (the file's precision anyway), so the build needs < 3 GiB of memory.
Each checkpoint is re-read and checked with ComfyUI's `model_detection` (must be SD15).

Run it with ComfyUI's Python:  <comfy-python> tests/host/comfy_checkpoints.py <root> [--comfy-dir …]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forge_checkpoints as FC  # noqa: E402

PERSONAL = "comfy-personal"
VANILLA = "comfy-vanilla"
LORA = "comfy-lora"
EMBEDDING = "comfy-concept"
MARKER = "comfy_models.json"  # written last: its presence means the root is complete
SEEDS = {PERSONAL: 1, VANILLA: 2}
DEFAULT_COMFY_DIR = "/work/host/comfy"
VAE_CONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def _comfy(comfy_dir: str):
    # ComfyUI's `comfy` is a namespace package (no __init__.py), which the import system takes only
    # when no sys.path entry has a regular package of that name: this script's folder has one (the
    # tier's tests/host/comfy/), so it leaves sys.path for the import.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [comfy_dir] + [
        p for p in sys.path if p != comfy_dir and os.path.abspath(p or os.curdir) != here
    ]
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()  # so that comfy.cli_args reads --cpu (no CUDA probe)
        from comfy.ldm.models.autoencoder import AutoencoderKL
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    finally:
        sys.argv = argv
    return UNetModel, AutoencoderKL


def _init(module, torch) -> None:
    """Each submodule's torch base-class init (ComfyUI's ops skip it)."""
    for m in module.modules():
        for base in type(m).__mro__:
            if base.__module__.startswith("torch.nn") and "reset_parameters" in base.__dict__:
                base.reset_parameters(m)
                break


def build_state_dict(comfy_dir: str, seed: int) -> dict:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    Unet, Vae = _comfy(comfy_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    sd = {}
    config = {k: v for k, v in FC.UNET_CONFIG.items() if k != "use_checkpoint"}
    unet = Unet(image_size=32, **config, dtype=torch.float16)  # fp16: the build stays < 3 GiB
    _init(unet, torch)
    FC._randomise(unet, torch, gen)
    with torch.no_grad():
        unet.out[-1].weight.mul_(0.1)  # tame ε
    sd.update({"model.diffusion_model." + k: v.half() for k, v in unet.state_dict().items()})
    del unet
    vae = Vae(ddconfig=VAE_CONFIG, embed_dim=4)
    _init(vae, torch)
    FC._randomise(vae, torch, gen)
    sd.update({"first_stage_model." + k: v.half() for k, v in vae.state_dict().items()})
    del vae
    cfg = CLIPTextConfig.from_pretrained(os.path.join(comfy_dir, "comfy", "sd1_clip_config.json"))
    te = CLIPTextModel(cfg)
    FC._randomise(te, torch, gen)
    sd.update(
        {
            "cond_stage_model.transformer." + k: v.half()
            for k, v in te.state_dict().items()
            if not k.endswith("position_ids")
        }
    )
    del te
    return {k: v.contiguous() for k, v in sd.items()}


def check_is_sd15(comfy_dir: str, path: str) -> str:
    from safetensors.torch import load_file

    _comfy(comfy_dir)
    import comfy.model_detection

    sd = load_file(path)
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    name = type(config).__name__
    if name != "SD15":
        raise RuntimeError(f"{path}: ComfyUI detects {name}, not SD15")
    return name


def write_checkpoint(comfy_dir: str, ckpt_dir: str, name: str, seed: int) -> str:
    from safetensors.torch import save_file

    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, name + ".safetensors")
    if os.path.exists(path):
        return path
    sd = build_state_dict(comfy_dir, seed)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt"})
    del sd
    check_is_sd15(comfy_dir, tmp)
    os.replace(tmp, path)
    return path


def paths(root: str) -> dict:
    return {
        "root": root,
        "checkpoints": os.path.join(root, "checkpoints"),
        "loras": os.path.join(root, "loras"),
        "embeddings": os.path.join(root, "embeddings"),
    }


def write_comfy_models(root: str, comfy_dir: str = DEFAULT_COMFY_DIR) -> dict:
    p = paths(root)
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        return p
    for name, seed in SEEDS.items():
        p[name] = write_checkpoint(comfy_dir, p["checkpoints"], name, seed)
    p[LORA] = FC.write_lora(p["loras"], p[PERSONAL], name=LORA)
    p[EMBEDDING] = FC.write_embedding(p["embeddings"], name=EMBEDDING)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({k: os.path.relpath(v, root) for k, v in p.items() if k != "root"}, f, indent=1)
    return p


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--comfy-dir", default=os.environ.get("LR_COMFY_DIR") or DEFAULT_COMFY_DIR)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print(json.dumps(write_comfy_models(a.root, a.comfy_dir), indent=1))
