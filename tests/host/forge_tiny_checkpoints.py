"""Tiny random-weight Flux.1 and SDXL models that Forge's own loader recognises and runs on the CPU.

Forge detects Flux by its key names (huggingface_guess), builds the transformer with Flux.1's full
sizes, and the text encoders / VAE from the JSON configs of `backend/huggingface/black-forest-labs/
FLUX.1-dev/` (T5-XXL: 4.7 B parameters). The tier therefore registers its tiny sizes at run time
(`forge/tiny_models_extension/tiny_registration.py`: sizes from the weights' shapes, and a folder of
tiny configs) — Forge's files are not changed. This module writes that folder and the checkpoints:

    <root>/huggingface/tiny-FLUX.1-dev/       Forge's FLUX.1-dev folder (model_index, scheduler,
                                               both tokenizers) with tiny text_encoder (CLIP-L),
                                               text_encoder_2 (T5) and vae (16 latent channels) configs
    <root>/huggingface/tiny-FLUX.1-schnell/   the same for schnell
    <root>/huggingface/tiny-sdxl/             Forge's stable-diffusion-xl-base-1.0 folder with tiny
                                               CLIP-L (32 wide), CLIP-G (64 wide, projection 64), VAE
    <root>/Stable-diffusion/flux-personal.safetensors   Flux.1-dev-shaped (guidance embedding), seed 31
    <root>/Stable-diffusion/flux-vanilla.safetensors    the same architecture, seed 32
    <root>/Stable-diffusion/flux-schnell.safetensors    no guidance embedding (Flux.1-schnell), seed 33
    <root>/Lora/flux-lora.safetensors                   kohya LoRA in BFL key form (rank 4):
        `lora_unet_double_blocks_N_{img,txt}_attn_{qkv,proj}`, `lora_unet_double_blocks_N_{img,txt}_mlp_{0,2}`,
        `lora_unet_single_blocks_N_linear{1,2}` (Forge's comfyui_lora_collection maps
        `lora_unet_<path with _>` to `diffusion_model.<path>.weight`), and
        `lora_te1_text_model_encoder_layers_N_{self_attn_*_proj,mlp_fc*}` on CLIP-L

    <root>/Stable-diffusion/sdxl-personal.safetensors   tiny SDXL (tiny_registration.TINY_SDXL_UNET:
        32 channels, mult 1/2/4, transformer depth 0/1/2 per level, 16-channel heads), seed 51
    <root>/Stable-diffusion/sdxl-vanilla.safetensors    the same architecture, seed 52

A Flux checkpoint is one file in the layout of a full Flux checkpoint ("all in one"): `model.diffusion_model.`
(BFL names), `vae.` (Forge's IntegratedAutoencoderKL = ldm names), `text_encoders.clip_l.transformer.`
and `text_encoders.t5xxl.transformer.` (what `model_list.Flux.clip_target` looks for). The weights
come from Forge's own classes (IntegratedFluxTransformer2DModel, IntegratedT5, IntegratedCLIP,
IntegratedAutoencoderKL), so the names are the ones Forge loads. fp32 (≈ 15 MB per Flux file,
≈ 55 MB per SDXL file).

Sizes: transformer hidden 64, 2 heads (head dim 32, RoPE axes 8/12/12), 2 double + 4 single blocks
(tests/tiny_flux.py's TinyFluxConfig); CLIP-L and T5 width 32, 2 layers, their real vocabularies;
VAE channels 32 ×4 levels (8× down-sampling like Flux's), 16 latent channels.
Random weights are made usable as in forge_checkpoints.py: norm scales randomised (T5's RMS norms are
`torch.empty` in Forge's module), zero weights re-drawn.

Run it with Forge's Python:  <forge-python> tests/host/forge_tiny_checkpoints.py <root> [--forge-dir …]
Each checkpoint is re-read and checked with the (registered) `huggingface_guess.guess`: Flux / FluxSchnell
with the tiny sizes, the tiny SDXL class. Files that exist are kept (delete the root to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "forge", "tiny_models_extension"))
import tiny_registration as TR  # noqa: E402

PERSONAL = "flux-personal"
VANILLA = "flux-vanilla"
SCHNELL = "flux-schnell"
LORA = "flux-lora"
SDXL_PERSONAL = "sdxl-personal"
SDXL_VANILLA = "sdxl-vanilla"
SDXL_CHECKPOINTS = {SDXL_PERSONAL: 51, SDXL_VANILLA: 52}
MARKER = "forge_tiny_models.json"
CHECKPOINTS = {PERSONAL: (31, True), VANILLA: (32, True), SCHNELL: (33, False)}  # seed, guidance
DEFAULT_FORGE_DIR = "/work/host/forge"
FORGE_REPOS = {
    TR.FLUX_DEV_DIR: os.path.join("backend", "huggingface", "black-forest-labs", "FLUX.1-dev"),
    TR.FLUX_SCHNELL_DIR: os.path.join(
        "backend", "huggingface", "black-forest-labs", "FLUX.1-schnell"
    ),
    TR.SDXL_DIR: os.path.join(
        "backend", "huggingface", "stabilityai", "stable-diffusion-xl-base-1.0"
    ),
}

TRANSFORMER = dict(
    in_channels=16,
    vec_in_dim=32,
    context_in_dim=32,
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=4,
    axes_dim=[8, 12, 12],
    theta=10000,
    qkv_bias=True,
)
CLIP_L = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=32,
)
T5 = dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2, num_decoder_layers=2)
VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
# SDXL (tiny_registration.TINY_SDXL_UNET is what huggingface_guess detects from these)
SDXL_CLIP_L = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    projection_dim=32,
)
SDXL_CLIP_G = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    projection_dim=64,
)
SDXL_UNET = dict(
    in_channels=4,
    model_channels=TR.TINY_SDXL_UNET["model_channels"],
    out_channels=4,
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4],
    use_spatial_transformer=True,
    transformer_depth=TR.TINY_SDXL_UNET["transformer_depth"],
    transformer_depth_middle=2,
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
    context_dim=TR.TINY_SDXL_UNET["context_dim"],
    num_heads=-1,
    num_head_channels=TR.TINY_SDXL_HEAD_CHANNELS,
    use_linear_in_transformer=True,
    adm_in_channels=TR.TINY_SDXL_UNET["adm_in_channels"],
    num_classes="sequential",
    use_checkpoint=False,
)


def _forge(forge_dir: str):
    """Forge's classes (importing `backend` parses sys.argv: hand it --always-cpu)."""
    for d in (forge_dir,):
        if d not in sys.path:
            sys.path.insert(0, d)
    for d in (
        os.path.join(forge_dir, "repositories", "huggingface_guess"),
        os.path.join(forge_dir, "packages_3rdparty"),
    ):
        if d not in sys.path:
            sys.path.append(d)
    argv = sys.argv
    sys.argv = [argv[0], "--always-cpu"]
    try:
        from backend.nn.clip import IntegratedCLIP
        from backend.nn.flux import IntegratedFluxTransformer2DModel
        from backend.nn.t5 import IntegratedT5
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.nn.vae import IntegratedAutoencoderKL
    finally:
        sys.argv = argv
    return (
        IntegratedFluxTransformer2DModel,
        IntegratedT5,
        IntegratedCLIP,
        IntegratedAutoencoderKL,
        IntegratedUNet2DConditionModel,
    )


def write_tiny_repos(forge_dir: str, hf_root: str) -> None:
    """Copy Forge's FLUX.1-dev/-schnell config folders (tokenizers included) and make the text encoder,
    T5 and VAE configs tiny. The transformer's config.json is not read by Forge (the sizes come from the
    guess); it is made tiny too so that the folder tells the truth."""
    for name, rel in FORGE_REPOS.items():
        dst = os.path.join(hf_root, name)
        if os.path.exists(os.path.join(dst, ".complete")):
            continue
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(
            os.path.join(forge_dir, rel), dst, ignore=shutil.ignore_patterns("*.index.json")
        )
        if name == TR.SDXL_DIR:
            parts = [("text_encoder", SDXL_CLIP_L), ("text_encoder_2", SDXL_CLIP_G), ("vae", VAE)]
        else:
            parts = [
                ("text_encoder", CLIP_L),
                ("text_encoder_2", T5),
                ("vae", VAE),
                ("transformer", _diffusers_transformer_sizes()),
            ]
        for comp, sizes in parts:
            path = os.path.join(dst, comp, "config.json")
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            cfg.update(sizes)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=1)
        open(os.path.join(dst, ".complete"), "w").close()


def _diffusers_transformer_sizes() -> dict:
    t = TRANSFORMER
    return dict(
        num_layers=t["depth"],
        num_single_layers=t["depth_single_blocks"],
        attention_head_dim=t["hidden_size"] // t["num_heads"],
        num_attention_heads=t["num_heads"],
        joint_attention_dim=t["context_in_dim"],
        pooled_projection_dim=t["vec_in_dim"],
        axes_dims_rope=t["axes_dim"],
    )


def _usable(module, torch, gen) -> None:
    """Norm scales random around 1 (LayerNorm biases random too), everything all-zero, never
    initialised (Forge's T5 norms are torch.empty) or not finite re-drawn."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name and p.ndim == 1
            if is_norm and leaf in ("weight", "scale"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif is_norm and leaf == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif not torch.isfinite(p).all() or not torch.any(p):
                fan_in = p[0].numel() if p.ndim >= 2 else 1
                scale = 0.02 if p.ndim < 2 else 1.0 / fan_in**0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def build_state_dict(forge_dir: str, hf_dir: str, seed: int, guidance: bool) -> dict:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    Flux, T5Model, Clip, Vae, _ = _forge(forge_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    sd = {}
    flux = Flux(**TRANSFORMER, guidance_embed=guidance)
    # Forge's Linear layers skip torch's init inside its operations context only; here they are plain
    # torch inits. Re-draw every 2-D weight at 1/√fan_in so every block matters.
    with torch.no_grad():
        for p in flux.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    _usable(flux, torch, gen)
    sd.update({"model.diffusion_model." + k: v for k, v in flux.state_dict().items()})
    del flux
    vae = Vae.from_config(Vae.load_config(os.path.join(hf_dir, "vae")))
    _usable(vae, torch, gen)
    sd.update({"vae." + k: v for k, v in vae.state_dict().items()})
    del vae
    clip = Clip(
        CLIPTextModel,
        CLIPTextConfig.from_pretrained(os.path.join(hf_dir, "text_encoder")),
        add_text_projection=True,
    )
    _usable(clip, torch, gen)
    sd.update(
        {
            "text_encoders.clip_l." + k: v
            for k, v in clip.state_dict().items()
            if not k.endswith("position_ids")
        }
    )
    del clip
    with open(os.path.join(hf_dir, "text_encoder_2", "config.json"), encoding="utf-8") as f:
        t5 = T5Model(json.load(f))
    with torch.no_grad():
        for p in t5.parameters():  # Forge's T5 modules are created with torch.empty
            p.copy_(
                torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5 if p.ndim >= 2 else 1)
            )
    _usable(t5, torch, gen)
    sd.update({"text_encoders.t5xxl." + k: v for k, v in t5.state_dict().items()})
    del t5
    return {k: v.float().contiguous() for k, v in sd.items()}


def check_guess(forge_dir: str, hf_root: str, path: str, guidance: bool) -> dict:
    """Forge's own (tier-registered) guess on the saved file: Flux (dev) or FluxSchnell, tiny sizes,
    the tiny config folder. Raises otherwise."""
    from safetensors.torch import load_file

    _forge(forge_dir)
    TR.install(hf_root)
    import huggingface_guess

    g = huggingface_guess.guess(load_file(path))
    want = "Flux" if guidance else "FluxSchnell"
    cfg = g.unet_config
    if type(g).__name__ != want or cfg.get("hidden_size") != TRANSFORMER["hidden_size"]:
        raise RuntimeError(
            f"{path}: huggingface_guess says {type(g).__name__} {cfg}, not tiny {want}"
        )
    if not g.huggingface_repo.startswith(hf_root):
        raise RuntimeError(f"{path}: config folder {g.huggingface_repo} is not the tiny one")
    return cfg


def write_checkpoint(forge_dir, hf_root, ckpt_dir, name, seed, guidance) -> str:
    from safetensors.torch import save_file

    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, name + ".safetensors")
    if os.path.exists(path):
        return path
    hf_dir = os.path.join(hf_root, TR.FLUX_DEV_DIR if guidance else TR.FLUX_SCHNELL_DIR)
    sd = build_state_dict(forge_dir, hf_dir, seed, guidance)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt"})
    check_guess(forge_dir, hf_root, tmp, guidance)
    os.replace(tmp, path)
    return path


def lora_targets(shapes: dict) -> list:
    """(kohya key, (out, in)) of every linear in the double blocks' attention/MLP and the single
    blocks (BFL names), and CLIP-L's attention/MLP (`lora_te1_…`)."""
    out = []
    for k, shape in shapes.items():
        if not k.endswith(".weight") or len(shape) != 2:
            continue
        if k.startswith("model.diffusion_model.") and (
            ("double_blocks." in k and ("_attn.qkv" in k or "_attn.proj" in k or "_mlp." in k))
            or ("single_blocks." in k and (".linear1" in k or ".linear2" in k))
        ):
            path = k[len("model.diffusion_model.") : -len(".weight")]
            out.append(("lora_unet_" + path.replace(".", "_"), tuple(shape)))
        elif k.startswith("text_encoders.clip_l.transformer.text_model.encoder.layers.") and (
            ".self_attn." in k or ".mlp.fc" in k
        ):
            path = k[len("text_encoders.clip_l.transformer.") : -len(".weight")]
            out.append(("lora_te1_" + path.replace(".", "_"), tuple(shape)))
    return sorted(out)


def write_lora(
    lora_dir: str, base_ckpt: str, name: str = LORA, rank: int = 4, seed: int = 41
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
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (o, i) in lora_targets(shapes):
        sd[f"{key}.lora_down.weight"] = torch.randn((rank, i), generator=g) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn((o, rank), generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(sd, path, metadata={"ss_base_model_version": "flux1"})
    return path


def build_sdxl_state_dict(forge_dir: str, hf_dir: str, seed: int) -> dict:
    """An SDXL checkpoint's state dict in the layout of a real one: `model.diffusion_model.` (ldm
    names), `first_stage_model.`, `conditioner.embedders.0.transformer.` (CLIP-L) and
    `conditioner.embedders.1.model.transformer.` + `….model.text_projection.weight` (CLIP-G, already in
    transformers' names: huggingface_guess's open_clip conversion passes them through)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _, _, _, Vae, Unet = _forge(forge_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    sd = {}
    unet = Unet(**SDXL_UNET)
    _usable(unet, torch, gen)
    sd.update({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()})
    del unet
    vae = Vae.from_config(Vae.load_config(os.path.join(hf_dir, "vae")))
    _usable(vae, torch, gen)
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    del vae
    clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(hf_dir, "text_encoder")))
    _usable(clip_l, torch, gen)
    sd.update(
        {
            "conditioner.embedders.0.transformer." + k: v
            for k, v in clip_l.state_dict().items()
            if not k.endswith("position_ids")
        }
    )
    del clip_l
    clip_g = CLIPTextModelWithProjection(
        CLIPTextConfig.from_pretrained(os.path.join(hf_dir, "text_encoder_2"))
    )
    _usable(clip_g, torch, gen)
    for k, v in clip_g.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if k.startswith("text_projection."):
            sd["conditioner.embedders.1.model." + k] = v
        else:
            sd["conditioner.embedders.1.model.transformer." + k] = v
    del clip_g
    return {k: v.float().contiguous() for k, v in sd.items()}


def check_sdxl_guess(forge_dir: str, hf_root: str, path: str) -> dict:
    from safetensors.torch import load_file

    _forge(forge_dir)
    TR.install(hf_root)
    import huggingface_guess
    from huggingface_guess import model_list

    g = huggingface_guess.guess(load_file(path))
    if not isinstance(g, model_list.SDXL) or g.unet_config.get("model_channels") != 32:
        raise RuntimeError(f"{path}: huggingface_guess says {type(g).__name__}, not the tiny SDXL")
    return g.unet_config


def write_sdxl_checkpoint(forge_dir, hf_root, ckpt_dir, name, seed) -> str:
    from safetensors.torch import save_file

    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, name + ".safetensors")
    if os.path.exists(path):
        return path
    sd = build_sdxl_state_dict(forge_dir, os.path.join(hf_root, TR.SDXL_DIR), seed)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"format": "pt"})
    check_sdxl_guess(forge_dir, hf_root, tmp)
    os.replace(tmp, path)
    return path


def paths(root: str) -> dict:
    return {
        "root": root,
        "hf_root": os.path.join(root, "huggingface"),
        "ckpt_dir": os.path.join(root, "Stable-diffusion"),
        "lora_dir": os.path.join(root, "Lora"),
    }


def write_flux_models(root: str, forge_dir: str = DEFAULT_FORGE_DIR) -> dict:
    p = paths(root)
    if os.path.exists(os.path.join(root, MARKER)):
        return p
    write_tiny_repos(forge_dir, p["hf_root"])
    for name, (seed, guidance) in CHECKPOINTS.items():
        p[name] = write_checkpoint(forge_dir, p["hf_root"], p["ckpt_dir"], name, seed, guidance)
    p[LORA] = write_lora(p["lora_dir"], p[PERSONAL])
    for name, seed in SDXL_CHECKPOINTS.items():
        p[name] = write_sdxl_checkpoint(forge_dir, p["hf_root"], p["ckpt_dir"], name, seed)
    with open(os.path.join(root, MARKER), "w", encoding="utf-8") as f:
        json.dump({k: os.path.relpath(v, root) for k, v in p.items() if k != "root"}, f, indent=1)
    return p


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--forge-dir", default=os.environ.get("LR_FORGE_DIR") or DEFAULT_FORGE_DIR)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    print(json.dumps(write_flux_models(a.root, a.forge_dir), indent=1))
