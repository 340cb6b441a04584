"""Full-size random-weight SD1.5 models for the Forge host tier (tests/host/forge/).

Forge does not read a yaml to build a model: it guesses the model kind from the state dict's key
names and shapes (`huggingface_guess`, `backend/loader.py`), so the tiny models of
`tiny_checkpoints.py` are not recognised. These are SD1.5-shaped — ldm's v1 key layout
(`model.diffusion_model.…`, `first_stage_model.…`, `cond_stage_model.transformer.text_model.…`) with
the real sizes (UNet 320 channels, CLIP-L text encoder, SD VAE) — and random weights:

    <root>/Stable-diffusion/
        forge-personal.safetensors   the "personalized" (DreamBooth) model, seed 1
        forge-vanilla.safetensors    the "vanilla" model, seed 2 (same architecture)
    <root>/embeddings/forge-concept.safetensors   SD1.5 Textual-Inversion embedding, `emb_params` 2×768
    <root>/Lora/forge-lora.safetensors            kohya LoRA (rank 4): `lora_unet_<ldm path>` on every
                                                  attn1/attn2 projection, `lora_te_text_model_encoder_
                                                  layers_N_{self_attn_q_proj,…,mlp_fc1,mlp_fc2}`
                                                  (the names Forge's LoRA loader maps for SD1)

fp16 safetensors, ≈ 2 GiB per checkpoint; Forge runs them in fp32 on the CPU. What makes random
weights usable:
- every LayerNorm's affine parameters are randomised (w=1, b=0 make the text encoder's last layer
  norm zero-mean, and the emphasis mean-restore divides 0/0: a NaN cond);
- every all-zero weight is re-drawn (ldm zero-initialises `proj_out` and the output convs; Forge's
  own modules do not, but the check stays so attention always matters);
- the UNet's last conv is scaled by 0.1, so ε stays O(1) and the images are not saturated;
- one metadata key per file (more are written in a random order: the file hash would change per build).

The tokenizer is not in the checkpoint: Forge takes the SD1.5 one from its own
`backend/huggingface/runwayml/stable-diffusion-v1-5/tokenizer/` (no download).

Run it with Forge's Python, so that the UNet and VAE key names come from Forge's own modules:
    <forge-python> tests/host/forge_checkpoints.py <root> [--forge-dir /work/host/forge]
Each checkpoint is re-read and checked with `huggingface_guess.guess` (must be SD15).
Re-running is cheap: files that exist are kept (delete the root to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Names the Forge tests use (file stems; Forge's checkpoint titles are "<stem>.safetensors [hash]").
PERSONAL = "forge-personal"
VANILLA = "forge-vanilla"
EMBEDDING = "forge-concept"
LORA = "forge-lora"
MARKER = "forge_models.json"  # written last: its presence means the root is complete
SEEDS = {PERSONAL: 1, VANILLA: 2}
DEFAULT_FORGE_DIR = "/work/host/forge"

# SD1.5's UNet in Forge's IntegratedUNet2DConditionModel terms (ldm's openaimodel arguments; what
# huggingface_guess detects from a real SD1.5 state dict).
UNET_CONFIG = dict(
    in_channels=4,
    model_channels=320,
    out_channels=4,
    num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4],
    use_spatial_transformer=True,
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    context_dim=768,
    num_heads=8,
    num_head_channels=-1,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_checkpoint=False,
)
HF_REPO = os.path.join("backend", "huggingface", "runwayml", "stable-diffusion-v1-5")


def _forge_modules(forge_dir: str):
    """Forge's UNet and VAE classes (importing `backend` parses sys.argv: hand it --always-cpu)."""
    if forge_dir not in sys.path:
        sys.path.insert(0, forge_dir)
    # What Forge's modules/paths.py adds: huggingface_guess, and packages_3rdparty (its `gguf`).
    for d in (
        os.path.join(forge_dir, "repositories", "huggingface_guess"),
        os.path.join(forge_dir, "packages_3rdparty"),
    ):
        if d not in sys.path:
            sys.path.append(d)
    argv = sys.argv
    sys.argv = [argv[0], "--always-cpu"]
    try:
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.nn.vae import IntegratedAutoencoderKL
    finally:
        sys.argv = argv
    return IntegratedUNet2DConditionModel, IntegratedAutoencoderKL


def _randomise(module, torch, gen) -> None:
    """LayerNorm affine params random; all-zero weights re-drawn (see the module docstring)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        for p in module.parameters():
            if p.ndim >= 2 and not torch.any(p):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def build_state_dict(forge_dir: str, seed: int) -> dict:
    """An SD1.5 checkpoint's state dict (fp16, ldm key names) with random weights of `seed`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    Unet, Vae = _forge_modules(forge_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    sd = {}
    unet = Unet(**UNET_CONFIG)
    _randomise(unet, torch, gen)
    with torch.no_grad():
        unet.out[-1].weight.mul_(0.1)  # tame ε
    sd.update({"model.diffusion_model." + k: v.half() for k, v in unet.state_dict().items()})
    del unet
    vae = Vae.from_config(Vae.load_config(os.path.join(forge_dir, HF_REPO, "vae")))
    _randomise(vae, torch, gen)
    sd.update({"first_stage_model." + k: v.half() for k, v in vae.state_dict().items()})
    del vae
    cfg = CLIPTextConfig.from_pretrained(os.path.join(forge_dir, HF_REPO, "text_encoder"))
    te = CLIPTextModel(cfg)
    _randomise(te, torch, gen)
    sd.update(
        {
            "cond_stage_model.transformer." + k: v.half()
            for k, v in te.state_dict().items()
            if not k.endswith("position_ids")
        }
    )
    del te
    return {k: v.contiguous() for k, v in sd.items()}


def check_is_sd15(forge_dir: str, path: str) -> str:
    """Forge's own guess on the saved file (raises unless it is SD1.5)."""
    from safetensors.torch import load_file

    _forge_modules(forge_dir)
    import huggingface_guess

    sd = load_file(path)
    g = huggingface_guess.guess(sd)
    name = type(g).__name__
    if name != "SD15":
        raise RuntimeError(f"{path}: huggingface_guess says {name}, not SD15")
    return name


def write_checkpoint(forge_dir: str, ckpt_dir: str, name: str, seed: int) -> str:
    from safetensors.torch import save_file

    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, name + ".safetensors")
    if os.path.exists(path):
        return path
    sd = build_state_dict(forge_dir, seed)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt"})
    del sd
    check_is_sd15(forge_dir, tmp)
    os.replace(tmp, path)
    return path


def lora_targets(sd: dict) -> list:
    """(kohya key, (out, in)) for every UNet attn1/attn2 projection (`lora_unet_<ldm path>`, which
    Forge's comfyui_lora_collection maps to `diffusion_model.<path>.weight`) and the text encoder's
    attention and MLP (`lora_te_text_model_encoder_layers_N_<…>` → `clip_l.transformer.…`)."""
    out = []
    for k, v in sd.items():
        if not k.endswith(".weight") or v.ndim != 2:
            continue
        if k.startswith("model.diffusion_model.") and (".attn1.to_" in k or ".attn2.to_" in k):
            path = k[len("model.diffusion_model.") : -len(".weight")]
            out.append(("lora_unet_" + path.replace(".", "_"), tuple(v.shape)))
        elif k.startswith("cond_stage_model.transformer.text_model.encoder.layers.") and (
            ".self_attn." in k or ".mlp.fc" in k
        ):
            path = k[len("cond_stage_model.transformer.") : -len(".weight")]
            out.append(("lora_te_" + path.replace(".", "_"), tuple(v.shape)))
    return sorted(out)


def write_lora(
    lora_dir: str, base_ckpt: str, name: str = LORA, rank: int = 4, seed: int = 11
) -> str:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(lora_dir, exist_ok=True)
    path = os.path.join(lora_dir, name + ".safetensors")
    if os.path.exists(path):
        return path
    with safe_open(base_ckpt, "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    fake = {k: _Shape(s) for k, s in shapes.items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (o, i) in lora_targets(fake):
        sd[f"{key}.lora_down.weight"] = (torch.randn((rank, i), generator=g) * 0.2).half()
        sd[f"{key}.lora_up.weight"] = (torch.randn((o, rank), generator=g) * 0.2).half()
        sd[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    save_file(sd, path, metadata={"ss_base_model_version": "sd_v1"})
    return path


class _Shape:
    """Stands in for a tensor in lora_targets (only .ndim and .shape are read)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


def write_embedding(emb_dir: str, name: str = EMBEDDING, vectors: int = 2, seed: int = 7) -> str:
    """A Textual-Inversion embedding as Forge reads `.safetensors` ones: one tensor `emb_params`
    (vectors × 768, CLIP-L's width)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(emb_dir, exist_ok=True)
    path = os.path.join(emb_dir, name + ".safetensors")
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(seed)
        save_file({"emb_params": torch.randn((vectors, 768), generator=g) * 0.05}, path)
    return path


def paths(root: str) -> dict:
    return {
        "root": root,
        "ckpt_dir": os.path.join(root, "Stable-diffusion"),
        "embeddings_dir": os.path.join(root, "embeddings"),
        "lora_dir": os.path.join(root, "Lora"),
    }


def write_forge_models(root: str, forge_dir: str = DEFAULT_FORGE_DIR) -> dict:
    p = paths(root)
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        return p
    for name, seed in SEEDS.items():
        p[name] = write_checkpoint(forge_dir, p["ckpt_dir"], name, seed)
    p[LORA] = write_lora(p["lora_dir"], p[PERSONAL])
    p[EMBEDDING] = write_embedding(p["embeddings_dir"])
    with open(
        marker, "w", encoding="utf-8"
    ) as f:  # relative paths: the root is moved after the build
        json.dump({k: os.path.relpath(v, root) for k, v in p.items() if k != "root"}, f, indent=1)
    return p


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--forge-dir", default=os.environ.get("LR_FORGE_DIR") or DEFAULT_FORGE_DIR)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print(json.dumps(write_forge_models(a.root, a.forge_dir), indent=1))
