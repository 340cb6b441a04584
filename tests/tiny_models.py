"""Tiny random-weight models of the real architectures A1111 runs (ldm's LatentDiffusion with its
UNet, VAE and CLIP text encoder), built offline for tests and the CPU benchmark.

No pretrained weights exist here. The architectures are the real ones, only narrow. ldm zero-inits
`proj_out` of every transformer block and the UNet's output conv, which would make attention have no
effect on the output (attention tests would pass vacuously), so every all-zero weight is re-drawn.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import torch

from benchmarks.tiny_nets import reinit_zero_weights, tame_output  # noqa: F401  (also used from here)
from lib_layout_retouch.evaluation.models import bytes_to_unicode  # CLIP BPE's byte alphabet

# Words the tiny tokenizer knows as whole tokens; anything else falls back to characters, as the
# real CLIP BPE does for rare strings. Whole-word tokens keep token positions easy to read in tests.
TINY_WORDS = (
    "a",
    "photo",
    "of",
    "sks",
    "dog",
    "cat",
    "red",
    "vase",
    "on",
    "the",
    "beach",
    "jumping",
    "over",
    "fence",
    "in",
    "snow",
    "toy",
    "with",
    "hat",
    "<my-vase>",
)


def make_tiny_clip_tokenizer_files(folder: str, words: Iterable[str] = TINY_WORDS) -> int:
    """Write vocab.json/merges.txt of a small CLIP BPE: every byte, every byte + '</w>', the BPE
    merges that build `words` whole, and the two special tokens. Returns the vocabulary size."""
    os.makedirs(folder, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            if merged not in vocab:
                vocab.append(merged)
            left = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return len(vocab)


def make_tiny_clip_folder(folder: str, hidden: int = 32, seed: int = 0) -> str:
    """A loadable `CLIPTextModel` + `CLIPTokenizer` folder (what FrozenCLIPEmbedder's `version` names)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    vocab_size = make_tiny_clip_tokenizer_files(folder)
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    model = CLIPTextModel(cfg)
    # LayerNorm weight 1 / bias 0 make A1111's emphasis mean-restore divide 0/0; randomise them.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


def tiny_ldm_config(clip_folder: str, context_dim: int = 32) -> dict:
    """ldm's v1-inference config, narrowed. Same classes as SD1.x (UNetModel, AutoencoderKL,
    FrozenCLIPEmbedder); two UNet levels, attention at both, 2 heads."""
    return {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.0120,
            "num_timesteps_cond": 1,
            "log_every_t": 200,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": 8,
            "channels": 4,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema",
            "scale_factor": 0.18215,
            "use_ema": False,
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 8,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 32,
                    "attention_resolutions": [1, 2],
                    "num_res_blocks": 1,
                    "channel_mult": [1, 2],
                    "num_heads": 2,
                    "use_spatial_transformer": True,
                    "transformer_depth": 1,
                    "context_dim": context_dim,
                    "use_checkpoint": False,
                    "legacy": False,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4,
                    "monitor": "val/rec_loss",
                    "ddconfig": {
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
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                "params": {"version": clip_folder, "device": "cpu"},
            },
        },
    }


def build_tiny_ldm(clip_folder: str, seed: int = 0):
    """A tiny `LatentDiffusion` in eval mode, float32, CPU. Two seeds give two "checkpoints"; the UNet
    of one can serve as the other's vanilla UNet (DreamBooth mode)."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(tiny_ldm_config(clip_folder)))
    g = torch.Generator().manual_seed(seed)
    reinit_zero_weights(model, g)
    tame_output(model.model.diffusion_model)
    model.eval()
    return model
