"""Tiny random-weight SDXL-family models for the library tests, in two builds:

- "sgm": the real thing — sgm's `DiffusionEngine` with its `UNetModel` (transformer depth 1/2/3),
  `GeneralConditioner` (CLIP-L-style + OpenCLIP `ViT-S-32-alt` + the three size embedders) and
  `AutoencoderKLInferenceWrapper`, from a narrowed `sd_xl_base.yaml`. sgm is not on PyPI: it is
  used when importable — from `LR_SGM_DIR` or a WebUI's `repositories/generative-models`
  (`/work/host/webui` by default, see tests/host/setup_webui.sh). Tests on it skip with that reason.
- "ldm": what CI always has. ldm's `UNetModel` in SDXL configuration (the SDXL UNet is ldm's with
  per-level depth: same module names, `label_emb` taking the vector `y`, linear transformer
  projections) at transformer depth 2, ldm's `AutoencoderKL`, and a small conditioner with sgm's
  `GeneralConditioner` contract (batch dict in; {"crossattn", "vector"} out; `force_zero_embeddings`)
  over two tiny CLIP text models and sinusoidal size embeddings, as sgm's embedders compute them.

As in tiny_models.py, every all-zero weight is re-drawn (zero-init `proj_out`/output convs would make
attention tests pass vacuously) and the output conv is tamed for a meaningful DDIM inversion.
"""

from __future__ import annotations

import os

import torch

from benchmarks.tiny_nets import (  # noqa: F401  (SGM_DIR_DEFAULT, LDM_*, sgm_status: used from here)
    CLIP_G_WIDTH,
    CLIP_L_WIDTH,
    LDM_ADM,
    LDM_CONTEXT,
    SGM_DIR_DEFAULT,
    SIZE_DIM,
    TinySdxlLike,
    ldm_sdxl_unet,
    legacy_alphas_cumprod,
    reinit_zero_weights,
    sdxl_like_unet_config,
    sgm_status,
    tame_output,
)
from tests.tiny_models import make_tiny_clip_folder

SGM_CONTEXT, SGM_ADM = 32 + 256, 256 + 3 * 2 * 256  # the "sgm" build (ViT-S-32-alt text width 256)


# -- the "ldm" build ------------------------------------------------------------------------------------
class _SizeEmbedder(torch.nn.Module):
    """sgm's ConcatTimestepEmbedderND: each number → a sinusoidal embedding, concatenated."""

    def __init__(self, input_key: str, outdim: int = SIZE_DIM):
        super().__init__()
        self.input_key, self.outdim, self.ucg_rate = input_key, outdim, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ldm.modules.diffusionmodules.util import timestep_embedding

        b, d = x.shape
        emb = timestep_embedding(x.reshape(-1).float(), self.outdim)
        return emb.reshape(b, d * self.outdim)


class _TextEmbedder(torch.nn.Module):
    """A tiny CLIP text model: hidden states for `crossattn`, optionally the EOS state as the pooled part."""

    def __init__(self, folder: str, pooled: bool):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.transformer = CLIPTextModel.from_pretrained(folder).eval()
        self.pooled, self.input_key, self.ucg_rate = pooled, "txt", 0.0

    def forward(self, texts):
        tok = self.tokenizer(
            list(texts), truncation=True, max_length=77, padding="max_length", return_tensors="pt"
        )
        ids = tok["input_ids"].to(self.transformer.device)
        out = self.transformer(input_ids=ids)
        if not self.pooled:
            return out.last_hidden_state
        return out.last_hidden_state, out.pooler_output


class TinyConditioner(torch.nn.Module):
    """sgm `GeneralConditioner`'s contract: 3-D outputs are concatenated along features into
    `crossattn`, 2-D ones into `vector`; inputs listed in `force_zero_embeddings` give zeros."""

    def __init__(self, clip_l: str, clip_g: str):
        super().__init__()
        self.embedders = torch.nn.ModuleList(
            [
                _TextEmbedder(clip_l, pooled=False),
                _TextEmbedder(clip_g, pooled=True),
                _SizeEmbedder("original_size_as_tuple"),
                _SizeEmbedder("crop_coords_top_left"),
                _SizeEmbedder("target_size_as_tuple"),
            ]
        )

    def forward(self, batch: dict, force_zero_embeddings=None) -> dict:
        out: dict = {}
        for e in self.embedders:
            embs = e(batch[e.input_key])
            for emb in embs if isinstance(embs, tuple) else (embs,):
                if e.input_key in (force_zero_embeddings or []):
                    emb = torch.zeros_like(emb)
                key, dim = ("crossattn", 2) if emb.dim() == 3 else ("vector", 1)
                out[key] = torch.cat([out[key], emb], dim) if key in out else emb
        return out


def build_ldm_sdxl(clip_root: str, seed: int = 0) -> TinySdxlLike:
    from ldm.models.autoencoder import AutoencoderKL

    clip_l = make_tiny_clip_folder(os.path.join(clip_root, "clip-l"), hidden=CLIP_L_WIDTH, seed=11)
    clip_g = make_tiny_clip_folder(os.path.join(clip_root, "clip-g"), hidden=CLIP_G_WIDTH, seed=12)
    torch.manual_seed(seed)
    unet = ldm_sdxl_unet()
    vae = AutoencoderKL(
        ddconfig=dict(
            double_z=True,
            z_channels=4,
            resolution=64,
            in_channels=3,
            out_ch=3,
            ch=32,
            ch_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_resolutions=[],
            dropout=0.0,
        ),
        lossconfig={"target": "torch.nn.Identity"},
        embed_dim=4,
    )
    model = TinySdxlLike(unet, vae, TinyConditioner(clip_l, clip_g))
    _finish(model, seed)
    return model


# -- the "sgm" build ------------------------------------------------------------------------------------
def sgm_config(clip_l_folder: str, depth=(1, 2, 3), model_channels: int = 32) -> dict:
    size = {
        "is_trainable": False,
        "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
        "params": {"outdim": 256},
    }
    return {
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "scale_factor": 0.13025,
            "disable_first_stage_autocast": True,
            "denoiser_config": {
                "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                "params": {
                    "num_idx": 1000,
                    "weighting_config": {
                        "target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"
                    },
                    "scaling_config": {
                        "target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"
                    },
                    "discretization_config": {
                        "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"
                    },
                },
            },
            "network_config": {
                "target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "adm_in_channels": SGM_ADM,
                    "num_classes": "sequential",
                    "use_checkpoint": False,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": model_channels,
                    "attention_resolutions": [1, 2, 4],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 2],
                    "num_head_channels": 16,
                    "use_spatial_transformer": True,
                    "use_linear_in_transformer": True,
                    "transformer_depth": list(depth),
                    "context_dim": SGM_CONTEXT,
                    "spatial_transformer_attn_type": "softmax",
                    "legacy": False,
                },
            },
            "conditioner_config": {
                "target": "sgm.modules.GeneralConditioner",
                "params": {
                    "emb_models": [
                        {
                            "is_trainable": False,
                            "input_key": "txt",
                            "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                            "params": {
                                "version": clip_l_folder,
                                "layer": "hidden",
                                "layer_idx": 1,
                                "device": "cpu",
                            },
                        },
                        {
                            "is_trainable": False,
                            "input_key": "txt",
                            "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                            "params": {
                                "arch": "ViT-S-32-alt",
                                "version": None,
                                "freeze": True,
                                "layer": "penultimate",
                                "always_return_pooled": True,
                                "legacy": False,
                                "device": "cpu",
                            },
                        },
                        {**size, "input_key": "original_size_as_tuple"},
                        {**size, "input_key": "crop_coords_top_left"},
                        {**size, "input_key": "target_size_as_tuple"},
                    ]
                },
            },
            "first_stage_config": {
                "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                "params": {
                    "embed_dim": 4,
                    "monitor": "val/rec_loss",
                    "ddconfig": {
                        "attn_type": "vanilla",
                        "double_z": True,
                        "z_channels": 4,
                        "resolution": 64,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 32,
                        "ch_mult": [1, 1, 1, 1],
                        "num_res_blocks": 1,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
        },
    }


def build_sgm_sdxl(clip_root: str, seed: int = 0):
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config

    clip_l = make_tiny_clip_folder(os.path.join(clip_root, "clip-l"), hidden=CLIP_L_WIDTH, seed=11)
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(sgm_config(clip_l)))
    # what A1111's extend_sdxl adds
    model.alphas_cumprod = legacy_alphas_cumprod()
    model.is_sdxl, model.parameterization = True, "eps"
    _finish(model, seed)
    return model


def _finish(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    reinit_zero_weights(model.model.diffusion_model, g)
    reinit_zero_weights(model.first_stage_model, g)
    tame_output(model.model.diffusion_model)
    with (
        torch.no_grad()
    ):  # LayerNorm at (1, 0) everywhere would hide the text encoders' differences
        for m in model.conditioner.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.normal_(1.0, 0.2, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
    model.eval().requires_grad_(False)


def sgm_base_unet_on_meta():
    """The real SDXL base UNet (sd_xl_base.yaml's network) on the meta device: structure only."""
    from sgm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return UNetModel(
            adm_in_channels=2816,
            num_classes="sequential",
            use_checkpoint=False,
            in_channels=4,
            out_channels=4,
            model_channels=320,
            attention_resolutions=[4, 2],
            num_res_blocks=2,
            channel_mult=[1, 2, 4],
            num_head_channels=64,
            use_spatial_transformer=True,
            use_linear_in_transformer=True,
            transformer_depth=[1, 2, 10],
            context_dim=2048,
            spatial_transformer_attn_type="softmax",
            legacy=False,
        )


BUILDS = ("ldm", "sgm")


def build(kind: str, clip_root: str, seed: int = 0):
    return build_sgm_sdxl(clip_root, seed) if kind == "sgm" else build_ldm_sdxl(clip_root, seed)
