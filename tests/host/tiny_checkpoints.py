"""Tiny random-weight models for a real WebUI host (tests/host/): checkpoints, an embedding, a LoRA.

No pretrained weights exist offline, so the host tests run the WebUI on narrow models of the real SD1
and SDXL architectures, from the tiny models' configs in `tests/fixtures/` (`sd1.py`, `sdxl.py`).
Everything is written under one root:

    <root>/clip/                       tiny CLIP text model + tokenizer (the yaml's `version` points here)
    <root>/clip-wide/                  a wider one (hidden 48) for the "other architecture" checkpoint
    <root>/Stable-diffusion/           --ckpt-dir
        tiny-personal.safetensors/.yaml    the "personalized" (DreamBooth) model, seed 1
        tiny-vanilla.safetensors/.yaml     the "vanilla" model, seed 2
        tiny-wide.safetensors/.yaml        context_dim 48: not swappable with the two above
    <root>/embeddings/tiny-concept.safetensors   Textual-Inversion embedding (`emb_params`, 2×32)
    <root>/Lora/tiny-lora.safetensors            kohya-format LoRA for UNet attention + text encoder

and tiny SDXL models (`sgm.models.diffusion.DiffusionEngine`, the structure of sgm's
`configs/inference/sd_xl_base.yaml`, narrowed; the WebUI loads them as SDXL: `is_sdxl` is true):

    <root>/Stable-diffusion/
        tiny-xl-personal.safetensors/.yaml the SDXL "personalized" model, seed 21
        tiny-xl-vanilla.safetensors/.yaml  the SDXL "vanilla" model, seed 22 (same architecture)
        tiny-xl-wide.safetensors/.yaml     an SDXL of another architecture (model_channels 64)
    <root>/embeddings/tiny-xl-concept.safetensors   SDXL TI embedding: `clip_l` 2×32 and `clip_g` 2×256
    <root>/Lora/tiny-xl-lora.safetensors            kohya SDXL LoRA: `lora_unet_…` (attn1/attn2
                                                    projections), `lora_te1_…`, `lora_te2_…`

SDXL text encoders: embedder 0 is `FrozenCLIPEmbedder` on the tiny CLIP folder (hidden 32, layer
`hidden`, layer_idx 1); embedder 1 is `FrozenOpenCLIPEmbedder2` with open_clip's built-in
`ViT-S-32-alt` (text width 256, pooled 256, random weights: `version: null`, nothing downloaded).
So context_dim = 32 + 256 and adm_in_channels = 256 (pooled) + 3·2·256 (size/crop/target embedders).

The WebUI takes a same-named `.yaml` beside a checkpoint as its config; ours is the structure of the
WebUI's `configs/v1-inference.yaml` (`model: {base_learning_rate, target, params}`) with tiny sizes.
The WebUI lists checkpoints recursively, so the CLIP folders live outside the checkpoint folder.

Run it with the WebUI's Python, so that the state-dict keys come from the same `ldm`/`sgm` the WebUI runs:
    PYTHONPATH=<webui>/repositories/stable-diffusion-stability-ai:<webui>/repositories/generative-models \
        <webui-python> tests/host/tiny_checkpoints.py <root>
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
for _p in (REPO_ROOT,):  # tests.fixtures (the tiny models) and lib_layout_retouch
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
# a second subject's (several subjects in one image)
EMBEDDING_2 = "tiny-concept-two"
LORA_2 = "tiny-lora-two"
XL_PERSONAL = "tiny-xl-personal"
XL_VANILLA = "tiny-xl-vanilla"
XL_WIDE = "tiny-xl-wide"
XL_EMBEDDING = "tiny-xl-concept"
XL_LORA = "tiny-xl-lora"
SEEDS = {PERSONAL: 1, VANILLA: 2, WIDE: 3, XL_PERSONAL: 21, XL_VANILLA: 22, XL_WIDE: 23}
XL_CHANNELS = {
    XL_PERSONAL: 32,
    XL_VANILLA: 32,
    XL_WIDE: 64,
}  # UNet model_channels (GroupNorm: a multiple of 32)
MARKER = "tiny_models.json"  # written last: its presence means the root is complete
# The files the models are built from (repository paths): the tier's model cache is keyed by their
# hash (tests/host/conftest.py); tests/test_imports.py checks that every module of tests/ this one
# imports, directly or not, is listed.
SOURCES = (
    "tests/fixtures/nets.py",
    "tests/fixtures/sd1.py",
    "tests/fixtures/sdxl.py",
    "tests/host/tiny_checkpoints.py",
)


def _config_yaml(clip_folder: str, context_dim: int = 32) -> dict:
    from tests.fixtures.sd1 import tiny_ldm_config

    return {
        "model": {
            "base_learning_rate": 1.0e-04,
            **tiny_ldm_config(clip_folder, context_dim=context_dim),
        }
    }


def _build(clip_folder: str, seed: int, context_dim: int):
    """`tests.fixtures.sd1.build_tiny_ldm`, for a context width other than 32 as well."""
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    from tests.fixtures.sd1 import build_tiny_ldm, reinit_zero_weights, tiny_ldm_config

    if context_dim == 32:
        return build_tiny_ldm(clip_folder, seed)
    torch.manual_seed(seed)
    model = instantiate_from_config(
        OmegaConf.create(tiny_ldm_config(clip_folder, context_dim=context_dim))
    )
    reinit_zero_weights(model, torch.Generator().manual_seed(seed))
    return model.eval()


def write_checkpoint(
    ckpt_dir: str, name: str, clip_folder: str, seed: int, context_dim: int = 32
) -> str:
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
    if name == VANILLA:
        # The personalized model's text encoder is "fine-tuned" away from the vanilla one's (as
        # DreamBooth often does), so stage 1's choice of text encoder shows in the image.
        g = torch.Generator().manual_seed(seed)
        for k, v in sd.items():
            if (
                k.startswith("cond_stage_model.transformer.")
                and v.is_floating_point()
                and "position" not in k
            ):
                sd[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    save_file(sd, path)
    # The WebUI loads with strict=False, which would hide a key mismatch: check strictly here.
    fresh = instantiate_from_config(OmegaConf.load(yaml_path).model)
    fresh.load_state_dict(load_file(path), strict=True)
    w = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert w and all(torch.equal(fresh.state_dict()[k], sd[k]) for k in w)
    return path


def write_embedding(
    emb_dir: str, name: str = EMBEDDING, dim: int = 32, vectors: int = 2, seed: int = 7
) -> str:
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


def write_lora(
    lora_dir: str, clip_folder: str, name: str = LORA, rank: int = 4, seed: int = 11
) -> str:
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
    save_file(
        sd,
        path,
        metadata={
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(rank),
            "ss_base_model_version": "sd_v1",
        },
    )
    return path


# ---------------------------------------------------------------------------------------- SDXL


def sdxl_config(clip_folder: str, model_channels: int = 32) -> dict:
    """The yaml written beside an SDXL checkpoint: `tests.fixtures.sdxl.sgm_config` with SDXL base's
    block layout (3 levels, 2 res blocks each, attention at the two lower levels, transformer depth
    > 1), so the layer names are SDXL's: input_blocks.0–8, middle_block, output_blocks.0–8."""
    from tests.fixtures.sdxl import sgm_config

    return {
        "model": sgm_config(
            clip_folder,
            model_channels=model_channels,
            attention_resolutions=(4, 2),
            channel_mult=(1, 2, 4),
            device=None,
        )
    }


def build_tiny_sdxl(clip_folder: str, seed: int, model_channels: int = 32):
    """A tiny sgm `DiffusionEngine` in eval mode (float32, CPU), with weights that make every part
    matter: all-zero weights (sgm zero-inits proj_out and the output convs) re-drawn, LayerNorm affine
    params randomised (w=1/b=0 make the WebUI's emphasis mean-restore divide 0/0 → NaN conds), the
    UNet's output conv tamed as for SD1 (a smooth ε keeps DDIM inversion sane)."""
    import torch
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config

    from tests.fixtures.nets import reinit_zero_weights, tame_output

    torch.manual_seed(seed)
    model = instantiate_from_config(
        OmegaConf.create(sdxl_config(clip_folder, model_channels)).model
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    reinit_zero_weights(model, g)
    tame_output(model.model.diffusion_model)
    return model.eval()


def write_sdxl_checkpoint(
    ckpt_dir: str, name: str, clip_folder: str, seed: int, model_channels: int = 32
) -> str:
    """Write `<name>.safetensors` + `<name>.yaml` (sgm structure); re-load strictly into a model built
    from the yaml; check that no UNet weight is all-zero. Returns the path."""
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file
    from sgm.util import instantiate_from_config

    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, name + ".safetensors")
    yaml_path = os.path.join(ckpt_dir, name + ".yaml")
    if os.path.exists(path) and os.path.exists(yaml_path):
        return path
    OmegaConf.save(OmegaConf.create(sdxl_config(clip_folder, model_channels)), yaml_path)
    model = build_tiny_sdxl(clip_folder, seed, model_channels)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, path, metadata={"format": "pt"})
    fresh = instantiate_from_config(OmegaConf.load(yaml_path).model)
    fresh.load_state_dict(load_file(path), strict=True)
    fsd = fresh.state_dict()
    unet = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert unet and all(torch.equal(fsd[k], sd[k]) for k in unet)
    assert any(k.startswith("conditioner.embedders.0.transformer.") for k in sd)
    assert "conditioner.embedders.1.model.ln_final.weight" in sd  # the WebUI's SDXL marker key
    zero = [k for k in unet if sd[k].dim() > 1 and not sd[k].any()]
    assert not zero, f"all-zero UNet weights left: {zero[:5]}"
    return path


def write_sdxl_embedding(
    emb_dir: str, name: str = XL_EMBEDDING, vectors: int = 2, seed: int = 17
) -> str:
    """An SDXL Textual-Inversion embedding as the WebUI reads them (textual_inversion.py: a dict with
    `clip_l` (n×width of embedder 0) and `clip_g` (n×width of embedder 1))."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(emb_dir, exist_ok=True)
    path = os.path.join(emb_dir, name + ".safetensors")
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(seed)
        save_file(
            {
                "clip_l": torch.randn((vectors, 32), generator=g) * 0.5,
                "clip_g": torch.randn((vectors, 256), generator=g) * 0.05,
            },
            path,
        )
    return path


def sdxl_lora_target_names(model) -> list:
    """kohya SDXL names of the Linear layers the LoRA adapts, as the WebUI's Lora extension maps them
    (extensions-builtin/Lora/networks.py): `lora_unet_<sgm path>` (→ `diffusion_model_<path>`) for
    every attn1/attn2 projection; `lora_te1_text_model_…` (→ `0_transformer_text_model_…`) for the
    CLIP encoder's attention and MLP; `lora_te2_text_model_encoder_layers_N_mlp_fc1|fc2`
    (→ `1_model_transformer_resblocks_N_mlp_c_fc|c_proj`) for the OpenCLIP encoder's MLP."""
    import torch

    names = []
    for name, m in model.model.diffusion_model.named_modules():
        if isinstance(m, torch.nn.Linear) and (".attn1." in name or ".attn2." in name):
            names.append(("lora_unet_" + name.replace(".", "_"), m))
    for name, m in model.conditioner.embedders[0].transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            names.append(("lora_te1_" + name.replace(".", "_"), m))
    for i, block in enumerate(model.conditioner.embedders[1].model.transformer.resblocks):
        names.append((f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1", block.mlp.c_fc))
        names.append((f"lora_te2_text_model_encoder_layers_{i}_mlp_fc2", block.mlp.c_proj))
    return names


def write_sdxl_lora(
    lora_dir: str, clip_folder: str, name: str = XL_LORA, rank: int = 4, seed: int = 31
) -> str:
    import torch
    from safetensors.torch import save_file

    os.makedirs(lora_dir, exist_ok=True)
    path = os.path.join(lora_dir, name + ".safetensors")
    if os.path.exists(path):
        return path
    model = build_tiny_sdxl(clip_folder, SEEDS[XL_PERSONAL], XL_CHANNELS[XL_PERSONAL])
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, lin in sdxl_lora_target_names(model):
        sd[f"{key}.lora_down.weight"] = torch.randn((rank, lin.in_features), generator=g) * 0.2
        sd[f"{key}.lora_up.weight"] = torch.randn((lin.out_features, rank), generator=g) * 0.2
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
    # One metadata key: more are written in a random order and the file hash would change per build.
    save_file(sd, path, metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def write_host_models(root: str) -> dict:
    """Write everything (see the module docstring) under `root`; return the paths as a dict."""
    from tests.fixtures.sd1 import make_tiny_clip_folder

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
    paths[WIDE] = write_checkpoint(
        paths["ckpt_dir"], WIDE, paths["clip_wide"], SEEDS[WIDE], context_dim=48
    )
    paths[EMBEDDING] = write_embedding(paths["embeddings_dir"])
    paths[LORA] = write_lora(paths["lora_dir"], paths["clip"])
    paths[EMBEDDING_2] = write_embedding(paths["embeddings_dir"], EMBEDDING_2, seed=8)
    paths[LORA_2] = write_lora(paths["lora_dir"], paths["clip"], LORA_2, seed=12)
    for name in (XL_PERSONAL, XL_VANILLA, XL_WIDE):
        paths[name] = write_sdxl_checkpoint(
            paths["ckpt_dir"], name, paths["clip"], SEEDS[name], XL_CHANNELS[name]
        )
    paths[XL_EMBEDDING] = write_sdxl_embedding(paths["embeddings_dir"])
    paths[XL_LORA] = write_sdxl_lora(paths["lora_dir"], paths["clip"])
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(paths, f, indent=1)
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} <root folder>")
    print(json.dumps(write_host_models(sys.argv[1]), indent=1))
