"""Tiny random-weight models for a real WebUI host (tests/host/): checkpoints, an embedding, a LoRA.

No pretrained weights exist offline, so the host tests run the WebUI on narrow models of the real SD1
architecture, built by `tests/tiny_models.py`. Everything is written under one root:

    <root>/clip/                       tiny CLIP text model + tokenizer (the yaml's `version` points here)
    <root>/clip-wide/                  a wider one (hidden 48) for the "other architecture" checkpoint
    <root>/Stable-diffusion/           --ckpt-dir
        tiny-personal.safetensors/.yaml    the "personalized" (DreamBooth) model, seed 1
        tiny-vanilla.safetensors/.yaml     the "vanilla" model, seed 2
        tiny-wide.safetensors/.yaml        context_dim 48: not swappable with the two above
    <root>/embeddings/tiny-concept.safetensors   Textual-Inversion embedding (`emb_params`, 2×32)
    <root>/Lora/tiny-lora.safetensors            kohya-format LoRA for UNet attention + text encoder

The WebUI takes a same-named `.yaml` beside a checkpoint as its config; ours is the structure of the
WebUI's `configs/v1-inference.yaml` (`model: {base_learning_rate, target, params}`) with tiny sizes.
The WebUI lists checkpoints recursively, so the CLIP folders live outside the checkpoint folder.

Run it with the WebUI's Python, so that the state-dict keys come from the same `ldm` the WebUI runs:
    PYTHONPATH=<webui>/repositories/stable-diffusion-stability-ai <webui-python> tests/host/tiny_checkpoints.py <root>
Each saved checkpoint is re-loaded into a model built from its yaml with `strict=True`.
Re-running is cheap: files that exist are kept (delete the root to rebuild).
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO_ROOT = os.path.dirname(TESTS)
for _p in (TESTS, REPO_ROOT):  # tiny_models, and lib_layout_retouch which it may import
    if _p not in sys.path:
        sys.path.insert(0, _p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Names the host tests use (file stems; the WebUI's checkpoint titles are "<stem>.safetensors [hash]").
PERSONAL = "tiny-personal"
VANILLA = "tiny-vanilla"
WIDE = "tiny-wide"
EMBEDDING = "tiny-concept"
LORA = "tiny-lora"
SEEDS = {PERSONAL: 1, VANILLA: 2, WIDE: 3}
MARKER = "tiny_models.json"  # written last: its presence means the root is complete


def _config_yaml(clip_folder: str, context_dim: int = 32) -> dict:
    from tiny_models import tiny_ldm_config

    return {"model": {"base_learning_rate": 1.0e-04, **tiny_ldm_config(clip_folder, context_dim=context_dim)}}


def _build(clip_folder: str, seed: int, context_dim: int):
    """`tiny_models.build_tiny_ldm`, for a context width other than 32 as well."""
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from tiny_models import build_tiny_ldm, reinit_zero_weights, tiny_ldm_config

    if context_dim == 32:
        return build_tiny_ldm(clip_folder, seed)
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(tiny_ldm_config(clip_folder, context_dim=context_dim)))
    reinit_zero_weights(model, torch.Generator().manual_seed(seed))
    return model.eval()


def write_checkpoint(ckpt_dir: str, name: str, clip_folder: str, seed: int, context_dim: int = 32) -> str:
    """Write `<name>.safetensors` + `<name>.yaml`; verify the keys load strictly. Returns the path."""
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, name + ".safetensors")
    yaml_path = os.path.join(ckpt_dir, name + ".yaml")
    if os.path.exists(path) and os.path.exists(yaml_path):
        return path
    config = _config_yaml(clip_folder, context_dim)
    OmegaConf.save(OmegaConf.create(config), yaml_path)
    model = _build(clip_folder, seed, context_dim)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, path)
    # The WebUI loads with strict=False, which would hide a key mismatch: check strictly here.
    fresh = instantiate_from_config(OmegaConf.load(yaml_path).model)
    fresh.load_state_dict(load_file(path), strict=True)
    w = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert w and all(torch.equal(fresh.state_dict()[k], sd[k]) for k in w)
    return path


def write_embedding(emb_dir: str, name: str = EMBEDDING, dim: int = 32, vectors: int = 2, seed: int = 7) -> str:
    """A Textual-Inversion embedding as the WebUI reads `.safetensors` ones: one tensor `emb_params`
    of shape (vectors, dim). (`.pt` files from a new torch are refused by the WebUI's safe unpickler.)"""
    import torch
    from safetensors.torch import save_file

    os.makedirs(emb_dir, exist_ok=True)
    path = os.path.join(emb_dir, name + ".safetensors")
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(seed)
        save_file({"emb_params": torch.randn((vectors, dim), generator=g) * 0.5}, path)
    return path


def lora_target_names(model) -> list[str]:
    """kohya names of the Linear layers a LoRA adapts: every UNet attention projection
    (`lora_unet_<compvis path>`, which the WebUI's Lora extension maps by replacing `lora_unet` with
    `diffusion_model`) and the text encoder's attention/MLP (`lora_te_text_model_…`)."""
    import torch

    names = []
    for name, m in model.model.diffusion_model.named_modules():
        if isinstance(m, torch.nn.Linear) and (".attn1." in name or ".attn2." in name):
            names.append(("lora_unet_" + name.replace(".", "_"), m))
    for name, m in model.cond_stage_model.transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            names.append(("lora_te_" + name.replace(".", "_"), m))
    return names


def write_lora(lora_dir: str, clip_folder: str, name: str = LORA, rank: int = 4, seed: int = 11) -> str:
    """A kohya-format LoRA (`<key>.lora_down.weight` (r×in), `<key>.lora_up.weight` (out×r),
    `<key>.alpha`) strong enough that `<lora:tiny-lora:1>` visibly changes a tiny image."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(lora_dir, exist_ok=True)
    path = os.path.join(lora_dir, name + ".safetensors")
    if os.path.exists(path):
        return path
    model = _build(clip_folder, SEEDS[PERSONAL], 32)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, lin in lora_target_names(model):
        sd[f"{key}.lora_down.weight"] = torch.randn((rank, lin.in_features), generator=g) * 0.2
        sd[f"{key}.lora_up.weight"] = torch.randn((lin.out_features, rank), generator=g) * 0.2
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(sd, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                  "ss_network_alpha": str(rank), "ss_base_model_version": "sd_v1"})
    return path


def write_host_models(root: str) -> dict:
    """Write everything (see the module docstring) under `root`; return the paths as a dict."""
    from tiny_models import make_tiny_clip_folder

    root = os.path.abspath(root)
    paths = {
        "root": root,
        "clip": os.path.join(root, "clip"),
        "clip_wide": os.path.join(root, "clip-wide"),
        "ckpt_dir": os.path.join(root, "Stable-diffusion"),
        "embeddings_dir": os.path.join(root, "embeddings"),
        "lora_dir": os.path.join(root, "Lora"),
    }
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        return paths
    make_tiny_clip_folder(paths["clip"], hidden=32, seed=0)
    make_tiny_clip_folder(paths["clip_wide"], hidden=48, seed=0)
    for name in (PERSONAL, VANILLA):
        paths[name] = write_checkpoint(paths["ckpt_dir"], name, paths["clip"], SEEDS[name])
    paths[WIDE] = write_checkpoint(paths["ckpt_dir"], WIDE, paths["clip_wide"], SEEDS[WIDE], context_dim=48)
    paths[EMBEDDING] = write_embedding(paths["embeddings_dir"])
    paths[LORA] = write_lora(paths["lora_dir"], paths["clip"])
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(paths, f, indent=1)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} <root folder>")
    print(json.dumps(write_host_models(sys.argv[1]), indent=1))
