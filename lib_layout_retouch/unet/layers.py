"""Which attention layers do what: data, not code, so each UNet (SD1, SDXL) is a table.

Names are module paths inside the UNet (`model.model.diffusion_model` in ldm/A1111), e.g.
`output_blocks.6.1.transformer_blocks.0.attn1`. `attn1` is self-attention, `attn2` cross-attention.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..retouch.editor import LayerRoles
from ..retouch.layers import DEFAULT_PRESET, PRESETS, LayerTable


def is_self_attention(name: str) -> bool:
    return name.endswith("attn1")


def is_cross_attention(name: str) -> bool:
    return name.endswith("attn2")


def attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module of the UNet by name, in execution order (selected by NAME, not class:
    A1111's optimisations swap classes' forwards, SDXL may use MemoryEfficientCrossAttention)."""
    return {n: m for n, m in unet.named_modules() if is_self_attention(n) or is_cross_attention(n)}


def check_layer_table(table: LayerTable, unet: torch.nn.Module) -> None:
    """Every layer the table names is an attention module of this UNet."""
    names = set(attention_modules(unet))
    for group in ("reference_layers", "mask_layers", "blend_layers"):
        missing = [n for n in getattr(table, group) if n not in names]
        if missing:
            raise ValueError(f"layer table {table.name!r}: {group} not in this UNet: {missing[:3]}")


def layer_roles(table: LayerTable, name: str) -> LayerRoles:
    """A UNet layer's roles: self-attention (attn1) layers take the reference and blend, cross-
    attention (attn2) layers give the subject maps; every layer the table lets copy the layout."""
    self_attention = is_self_attention(name)
    return LayerRoles(
        name,
        copies_layout=table.copies_layout_at(name),
        paints=self_attention and name in table.reference_layers,
        blends=self_attention and name in table.blend_layers,
        records_maps=not self_attention and name in table.mask_layers,
    )


def _names(blocks: str, indices, attn: str, depth: int = 1) -> tuple[str, ...]:
    return tuple(
        f"{blocks}.{i}.1.transformer_blocks.{d}.{attn}" for i in indices for d in range(depth)
    )


# SD1.x (and SD2.x, same block layout). Reference layers: decoder transformer blocks 10–15 of 16
# (MasaCtrl start_layer=10, DreamMatcher initial_layer=10) = output_blocks.6–11, the 32×32 and
# 64×64 levels at 512². Mask: the 16×16 cross-attentions (latent/4). We blend in the same layers
# that receive the reference (docs/ALGORITHM.md leaves the blend layers open; the blend exists to
# protect the layout where the reference K/V would repaint it). Light: the 64×64 level only.
SD1_LAYERS = LayerTable(
    name="sd1",
    reference_layers=_names("output_blocks", range(6, 12), "attn1"),
    mask_layers=_names("input_blocks", (7, 8), "attn2")
    + _names("output_blocks", (3, 4, 5), "attn2"),
    blend_layers=_names("output_blocks", range(6, 12), "attn1"),
)
SD1_LIGHT_LAYERS = LayerTable(
    "sd1-light",
    _names("output_blocks", range(9, 12), "attn1"),
    SD1_LAYERS.mask_layers,
    _names("output_blocks", range(9, 12), "attn1"),
)

# SDXL base (sgm UNetModel: transformer depth 0/2/10 at latent/1, /2, /4; 70 self-attentions).
# Its attention lives at the two coarsest levels only, so the SD1 rule ("decoder levels finer than
# the mask level") would leave just output_blocks.3–5. We take what reference-attention methods
# use on SDXL: the decoder self-attention from output_blocks.1 on — the latent/4 level minus its
# first block (output_blocks.1–2, 10 blocks each) and the latent/2 level (output_blocks.3–5, 2
# each): 26 of 70 layers, i.e. MasaCtrl's start_layer=44 of 70. The first decoder block at
# latent/4 stays untouched: it still sees the encoder's features of the target and settles the
# coarse layout the copy phase gave it. Light: output_blocks.3–5 only (6 layers).
# Mask: cross-attention at the same *relative* level as SD1's 16×16 maps (latent/4: 32×32 at
# 1024², 38×26 at 832×1216), every transformer block of input_blocks.7–8 and output_blocks.0–2.
_SDXL_REFERENCE = _names("output_blocks", (1, 2), "attn1", 10) + _names(
    "output_blocks", (3, 4, 5), "attn1", 2
)
SDXL_LAYERS = LayerTable(
    name="sdxl",
    reference_layers=_SDXL_REFERENCE,
    mask_layers=_names("input_blocks", (7, 8), "attn2", 10)
    + _names("output_blocks", (0, 1, 2), "attn2", 10),
    blend_layers=_SDXL_REFERENCE,
)
SDXL_LIGHT_LAYERS = LayerTable(
    "sdxl-light",
    _names("output_blocks", (3, 4, 5), "attn1", 2),
    SDXL_LAYERS.mask_layers,
    _names("output_blocks", (3, 4, 5), "attn1", 2),
)

_TABLES = {
    ("sd1", "standard"): SD1_LAYERS,
    ("sd1", "light"): SD1_LIGHT_LAYERS,
    ("sdxl", "standard"): SDXL_LAYERS,
    ("sdxl", "light"): SDXL_LIGHT_LAYERS,
}


def _block_levels(
    blocks: torch.nn.ModuleList, step_class: str, start: int, delta: int
) -> list[int]:
    """Resolution level (0 = full latent size) of each block, walking Downsample/Upsample ops."""
    levels, level = [], start
    for block in blocks:
        levels.append(level)
        if any(type(m).__name__ == step_class for m in block.modules()):
            level += delta
    return levels


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    """SDXL-family UNets take the pooled-text/size vector through `label_emb`."""
    return hasattr(unet, "label_emb")


def infer_layer_table(
    unet: torch.nn.Module, preset: str = DEFAULT_PRESET, sdxl: Optional[bool] = None
) -> LayerTable:
    """The rules the SD1 and SDXL tables follow, derived from the UNet's structure, for UNets of
    other sizes (the tiny test models, SSD-1B …). With L = the coarsest input level that has
    attention: mask = cross-attention at level L (encoder and decoder);
    SD1 rule: reference/blend = decoder self-attention at the levels finer than L (light: the finest);
    SDXL rule: decoder self-attention at level L minus its first block, and at level L−1 (light: L−1).
    For the real SD1 and SDXL UNets this gives exactly `SD1_LAYERS`/`SDXL_LAYERS` (tests check it)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown layer preset {preset!r}; one of {', '.join(PRESETS)}")
    if not all(hasattr(unet, a) for a in ("input_blocks", "output_blocks")):
        raise ValueError(
            "not an ldm/sgm UNetModel (no input_blocks/output_blocks): no layer table for it"
        )
    sdxl = is_sdxl_unet(unet) if sdxl is None else sdxl
    located = _located_attention(unet)
    attn_in_levels = [loc[1] for loc in located.values() if loc and loc[0] == "input_blocks"]
    if not attn_in_levels:
        raise ValueError("UNet has no attention in its input blocks")
    top = max(attn_in_levels)
    mask = tuple(n for n, loc in located.items() if loc and loc[1] == top and is_cross_attention(n))
    decoder_self = {
        n: loc
        for n, loc in located.items()
        if loc and loc[0] == "output_blocks" and is_self_attention(n)
    }
    rule = _sdxl_reference if sdxl else _sd1_reference
    reference = rule(decoder_self, top, light=preset == "light")
    if not reference:  # a one-level UNet: use every decoder self-attention
        reference = tuple(decoder_self)
    name = ("inferred-sdxl" if sdxl else "inferred") + ("-light" if preset == "light" else "")
    return LayerTable(name, reference, mask, reference)


def _located_attention(unet) -> dict[str, Optional[tuple[str, int, int]]]:
    """Each attention module → (blocks, resolution level, block index), None outside the blocks."""
    in_levels = _block_levels(unet.input_blocks, "Downsample", 0, +1)
    n_levels = in_levels[-1] + 1
    out_levels = _block_levels(unet.output_blocks, "Upsample", n_levels - 1, -1)
    levels = {"input_blocks": in_levels, "output_blocks": out_levels}

    def level_of(name: str) -> Optional[tuple[str, int, int]]:
        part, idx = name.split(".")[:2]
        if part not in levels:
            return None
        return part, levels[part][int(idx)], int(idx)

    return {n: level_of(n) for n in attention_modules(unet)}


def _sd1_reference(decoder_self: dict, top: int, light: bool) -> tuple[str, ...]:
    """SD1 rule: the decoder self-attention at the levels finer than `top` (light: the finest)."""
    finer = sorted({loc[1] for loc in decoder_self.values() if loc[1] < top})
    levels = set(finer[:1]) if light else set(finer)
    return tuple(n for n, loc in decoder_self.items() if loc[1] in levels)


def _sdxl_reference(decoder_self: dict, top: int, light: bool) -> tuple[str, ...]:
    """SDXL rule: level `top` minus its first block, and level top−1 (light: top−1 only)."""
    first_top = min((loc[2] for loc in decoder_self.values() if loc[1] == top), default=None)
    levels = {top - 1} if light else {top, top - 1}
    return tuple(
        n
        for n, loc in decoder_self.items()
        if loc[1] in levels and not (loc[1] == top and loc[2] == first_top)
    )


def layer_table_for(unet: torch.nn.Module, preset: str = DEFAULT_PRESET) -> LayerTable:
    """The written table when the UNet has SD1's or SDXL base's layout, else the inferred one."""
    if preset not in PRESETS:
        raise ValueError(f"unknown layer preset {preset!r}; one of {', '.join(PRESETS)}")
    names = set(attention_modules(unet))
    family = "sdxl" if is_sdxl_unet(unet) else "sd1"
    table = _TABLES[(family, preset)]
    count = 140 if family == "sdxl" else 32
    if len(names) == count and all(n in names for n in table.reference_layers + table.mask_layers):
        return table
    return infer_layer_table(unet, preset)
