"""A tiny Flux.1-architecture transformer (a joint-attention DiT) and tiny Flux text encoders, built
offline for the tests, the CPU benchmark and the Forge tier's tiny checkpoint.

The structure and the state-dict key names are Black Forest Labs' (what Forge's
`backend/nn/flux.py` and ComfyUI's `comfy/ldm/flux` load): `img_in`, `time_in`, `vector_in`,
`guidance_in`, `txt_in`, `double_blocks.N.{img_mod.lin, img_attn.qkv, img_attn.norm.query_norm.scale,
img_attn.norm.key_norm.scale, img_attn.proj, img_mlp.0, img_mlp.2, txt_*}`,
`single_blocks.N.{linear1, linear2, norm.*, modulation.lin}`,
`final_layer.{linear, adaLN_modulation.1}`. The forward is Forge's signature:
`model(x, timestep, context, y, guidance)` on an unpacked latent (B, C, H, W), with 2×2 patches,
3-axis rotary positions (EmbedND) and the distilled-guidance embedding. Only the sizes are tiny.

Written for these tests (not a copy of either host's file). All-zero weights (none in this init,
but a loaded checkpoint's LoRA-B or zero-init'd gates would be) are re-drawn, and the modulation
gates are made large enough that every block's attention changes the output: an attention test on
a model whose attention does not matter passes vacuously.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class TinyFluxConfig:
    in_channels: int = 16  # latent channels (Flux's VAE: 16); 64 per 2×2 patch token
    vec_in_dim: int = 32  # pooled CLIP-L width (Flux.1: 768)
    context_in_dim: int = 32  # T5 width (Flux.1: 4096)
    hidden_size: int = 64  # Flux.1: 3072
    mlp_ratio: float = 4.0
    num_heads: int = 2  # Flux.1: 24 (head dim 128)
    depth: int = 2  # double-stream blocks (Flux.1: 19)
    depth_single_blocks: int = 4  # single-stream blocks (Flux.1: 38)
    axes_dim: tuple = field(default=(8, 12, 12))  # Flux.1: (16, 56, 56); sums to the head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # Flux.1-dev: True, schnell: False


FLUX1_DEV = TinyFluxConfig(
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=(16, 56, 56),
)


# -- pieces ------------------------------------------------------------------------------------------
def _rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """(B, L) positions → (B, L, dim/2, 2, 2) rotation matrices (float32)."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angle = pos.double()[..., None] * freqs
    cos, sin = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return rot.float()


def _rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Apply the rotations pe (…, L, D/2, 2, 2) to x (B, H, L, D) pairwise."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, H, L, D/2, 2)
    out = torch.einsum("...ij,...j->...i", pe, pairs)
    return out.reshape(x.shape).type_as(x)


def _attention(q, k, v, pe):
    q, k = _rotate(q, pe), _rotate(k, pe)
    out = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, L, D)
    b, h, n, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * d)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10_000):
    """Sinusoidal embedding of t·1000 (Flux feeds σ ∈ [0, 1] and the guidance scale this way)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000.0 * t[:, None].float() * freqs.to(t.device)[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, list(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L, 3) → (B, 1, L, D/2, 2, 2)
        parts = [_rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(parts, dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """shift, scale, gate (×2 for a double block), as Forge's tuple."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def _heads(qkv: torch.Tensor, heads: int):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # q, k, v: (B, H, L, D)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp = int(hidden * mlp_ratio)
        self.num_heads, self.hidden_size = heads, hidden
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(hidden, double=True))
            setattr(self, f"{side}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(hidden, heads, qkv_bias))
            setattr(self, f"{side}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(
                self,
                f"{side}_mlp",
                nn.Sequential(
                    nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, hidden)
                ),
            )

    def forward(self, img, txt, vec, pe):
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = self.img_mod(vec)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = self.txt_mod(vec)
        iq, ik, iv = _heads(
            self.img_attn.qkv((1 + i_sc1) * self.img_norm1(img) + i_sh1), self.num_heads
        )
        iq, ik = self.img_attn.norm(iq, ik, iv)
        tq, tk, tv = _heads(
            self.txt_attn.qkv((1 + t_sc1) * self.txt_norm1(txt) + t_sh1), self.num_heads
        )
        tq, tk = self.txt_attn.norm(tq, tk, tv)
        attn = _attention(
            torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe
        )
        t_att, i_att = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + i_g1 * self.img_attn.proj(i_att)
        img = img + i_g2 * self.img_mlp((1 + i_sc2) * self.img_norm2(img) + i_sh2)
        txt = txt + t_g1 * self.txt_attn.proj(t_att)
        txt = txt + t_g2 * self.txt_mlp((1 + t_sc2) * self.txt_norm2(txt) + t_sh2)
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_dim = self.hidden_size = hidden
        self.num_heads = heads
        self.mlp_hidden_dim = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, 3 * hidden + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden_dim, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1((1 + scale) * self.pre_norm(x) + shift),
            [3 * self.hidden_size, self.mlp_hidden_dim],
            dim=-1,
        )
        q, k, v = _heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((_attention(q, k, v, pe), self.mlp_act(mlp)), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


class TinyFlux(nn.Module):
    """The Flux transformer. `forward(x, timestep, context, y, guidance)`: x (B, C, H, W) latent,
    timestep σ (B,), context T5 states (B, L, context_in_dim), y pooled CLIP (B, vec_in_dim),
    guidance (B,) → the velocity (B, C, H, W)."""

    def __init__(self, cfg: TinyFluxConfig = TinyFluxConfig()):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.in_channels = self.out_channels = cfg.in_channels * 4
        self.hidden_size, self.num_heads = h, cfg.num_heads
        self.guidance_embed = cfg.guidance_embed
        if sum(cfg.axes_dim) != h // cfg.num_heads:
            raise ValueError(
                f"axes_dim {cfg.axes_dim} must sum to the head dim {h // cfg.num_heads}"
            )
        self.pe_embedder = EmbedND(h // cfg.num_heads, cfg.theta, cfg.axes_dim)
        self.img_in = nn.Linear(self.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if cfg.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias)
            for _ in range(cfg.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio)
            for _ in range(cfg.depth_single_blocks)
        )
        self.final_layer = LastLayer(h, self.out_channels)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        b, c, hh, ww = x.shape
        gh, gw = hh // 2, ww // 2
        img = x.reshape(b, c, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * 4)
        ids = torch.zeros(gh, gw, 3, device=x.device)
        ids[..., 1] = torch.arange(gh, device=x.device)[:, None]
        ids[..., 2] = torch.arange(gw, device=x.device)[None, :]
        img_ids = ids.reshape(1, gh * gw, 3).expand(b, -1, -1)
        txt_ids = torch.zeros(b, context.shape[1], 3, device=x.device)
        vec = self.time_in(timestep_embedding(timestep).to(img.dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("a guidance-distilled Flux needs `guidance`")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        vec = vec + self.vector_in(y)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), 1))
        img, txt = self.img_in(img), self.txt_in(context)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        joint = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            joint = block(joint, vec=vec, pe=pe)
        out = self.final_layer(joint[:, txt.shape[1] :], vec)
        return out.reshape(b, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)


def build_tiny_flux(seed: int = 0, cfg: TinyFluxConfig = TinyFluxConfig(), gate_std: float = 0.3):
    """(model, state_dict): a tiny Flux in eval mode, float32, CPU, with BFL key names.

    Random weights everywhere; the modulation layers' outputs (shift/scale/gate) get a bias of
    `gate_std`-sized noise so every block's attention and MLP reach the residual stream (a freshly
    trained DiT's gates are far from zero; an untrained one's would be ≈ 0 and hide attention bugs);
    the final projection is scaled down so the velocity field is smooth enough for inversion."""
    torch.manual_seed(seed)
    model = TinyFlux(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if name.endswith("norm.query_norm.scale") or name.endswith("norm.key_norm.scale"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            if ".lin.bias" in name or "adaLN_modulation.1.bias" in name:
                p.copy_(gate_std * torch.randn(p.shape, generator=g))
        model.final_layer.linear.weight.mul_(0.3)
    model.eval()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def flux_config_of_state_dict(state: dict) -> dict:
    """The constructor arguments a loader reads off BFL keys (what Forge's detection looks at)."""
    hidden = state["img_in.weight"].shape[0]
    return dict(
        in_channels=state["img_in.weight"].shape[1] // 4,
        vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
        context_in_dim=state["txt_in.weight"].shape[1],
        hidden_size=hidden,
        depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("double_blocks.")),
        depth_single_blocks=1
        + max(int(k.split(".")[1]) for k in state if k.startswith("single_blocks.")),
        guidance_embed=any(k.startswith("guidance_in.") for k in state),
    )


def tiny_flux_config_dict(cfg: TinyFluxConfig = TinyFluxConfig()) -> dict:
    d = asdict(cfg)
    d["axes_dim"] = list(cfg.axes_dim)
    return d


# -- text encoders ---------------------------------------------------------------------------------
T5_SENTENCES = (
    "a photo of sks dog",
    "a sks dog on the beach",
    "a dog jumping over a fence in the snow",
    "a red vase with a hat on the table",
    "a cat and a toy in the grass",
    "photo of a sks cat surfing on a wave",
    "a dog surfing on the beach at sunset",
)


def make_tiny_t5_folder(folder: str, d_model: int = 32, vocab_size: int = 96, seed: int = 0) -> str:
    """A loadable `T5EncoderModel` + `T5Tokenizer` (SentencePiece, unigram) folder, trained offline
    on a few sentences. Unknown words fall back to pieces and characters, as T5's real tokenizer does
    for rare words: `sks` becomes several pieces, which is what the subject-token search must handle."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(T5_SENTENCES * 20) + "\n")
    prefix = os.path.join(folder, "spiece")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,  # a few sentences hold fewer pieces than asked: take what there is
        minloglevel=2,
    )
    os.remove(corpus)
    tok = T5Tokenizer(prefix + ".model", extra_ids=0, legacy=True)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(cfg).eval().save_pretrained(folder)
    return folder


class TinyFluxVAE:
    """A stand-in for Flux's 16-channel VAE (8× down-sampling), exact enough for the tests: an 8×8
    average pool and a fixed 3 → 16 channel map; decoding is its pseudo-inverse and an 8× upsample.
    (The retouch only needs encode/decode callables; Forge's real VAE is the Forge tier's.)"""

    def __init__(self, channels: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, 3, generator=g) / math.sqrt(3)
        self.pinv = torch.linalg.pinv(self.weight)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(images.float(), 8)
        return torch.einsum("oc,bchw->bohw", self.weight, pooled)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        rgb = torch.einsum("co,bohw->bchw", self.pinv, latents.float())
        return nn.functional.interpolate(rgb, scale_factor=8, mode="nearest").clamp(-1, 1)


T5_LENGTH = 16  # tokens every prompt is padded to (Flux.1: 256 schnell / 512 dev)


def build_tiny_flux_model(t5_folder: str, clip_folder: str, seed: int = 0, transformer=None):
    """A `lib_layout_retouch.flux_model.FluxModel` over the tiny transformer, a tiny T5 (SentencePiece)
    and a tiny CLIP-L (pooled vector), with `TinyFluxVAE`."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    from lib_layout_retouch.flux_model import FluxModel

    if transformer is None:
        transformer = build_tiny_flux(seed)[0]
    t5_tok = T5Tokenizer.from_pretrained(t5_folder, legacy=True)
    t5 = T5EncoderModel.from_pretrained(t5_folder).eval()
    clip_tok = CLIPTokenizer.from_pretrained(clip_folder)
    clip = CLIPTextModel.from_pretrained(clip_folder).eval()
    vae = TinyFluxVAE()

    @torch.no_grad()
    def encode_t5(prompts):
        batch = t5_tok(
            list(prompts),
            padding="max_length",
            max_length=T5_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        return t5(input_ids=batch.input_ids).last_hidden_state

    @torch.no_grad()
    def encode_clip(prompts):
        batch = clip_tok(
            list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        return clip(input_ids=batch.input_ids).pooler_output

    return FluxModel(
        transformer,
        encode_t5=encode_t5,
        encode_clip=encode_clip,
        tokenize_t5=lambda text: t5_tok(text, add_special_tokens=False).input_ids,
        tokenize_clip=lambda text: clip_tok(text, add_special_tokens=False).input_ids,
        vae_encode=vae.encode,
        vae_decode=vae.decode,
    )
