"""Which attention layers do what: data, not code, so another UNet (SDXL) is a new table.

Names are module paths inside the UNet (`model.model.diffusion_model` in ldm/A1111), e.g.
`output_blocks.6.1.transformer_blocks.0.attn1`. `attn1` is self-attention, `attn2` cross-attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def is_self_attention(name: str) -> bool:
    return name.endswith("attn1")


def is_cross_attention(name: str) -> bool:
    return name.endswith("attn2")


def attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module of the UNet by name, in execution order (selected by NAME, not class:
    A1111's optimisations swap classes' forwards, SDXL may use MemoryEfficientCrossAttention)."""
    return {n: m for n, m in unet.named_modules() if is_self_attention(n) or is_cross_attention(n)}


@dataclass(frozen=True)
class LayerTable:
    """The layer sets of ALGORITHM.md for one UNet architecture."""

    name: str
    reference_layers: tuple[str, ...]   # attn1 that take the reference path's K, V when s > λ2
    mask_layers: tuple[str, ...]        # attn2 whose subject-token maps make M^c (the 16×16 ones in SD1)
    blend_layers: tuple[str, ...]       # attn1 whose output is blended with the layout's when s ≥ mask_start
    layout_layers: Optional[tuple[str, ...]] = None  # swapped with the layout path when s ≤ λ2; None = every layer

    def swaps_every_layer(self) -> bool:
        return self.layout_layers is None

    def copies_layout_at(self, name: str) -> bool:
        return self.layout_layers is None or name in self.layout_layers

    def with_layout_layers(self, layers: Optional[tuple[str, ...]]) -> "LayerTable":
        return LayerTable(self.name, self.reference_layers, self.mask_layers, self.blend_layers, layers)

    def check_against(self, unet: torch.nn.Module) -> None:
        names = set(attention_modules(unet))
        for group in ("reference_layers", "mask_layers", "blend_layers"):
            missing = [n for n in getattr(self, group) if n not in names]
            if missing:
                raise ValueError(f"layer table {self.name!r}: {group} not in this UNet: {missing[:3]}")


def _sd1_names(blocks: str, indices, attn: str) -> tuple[str, ...]:
    return tuple(f"{blocks}.{i}.1.transformer_blocks.0.{attn}" for i in indices)


# SD1.x (and SD2.x, same block layout). Reference layers: decoder transformer blocks 10–15 of 16
# (MasaCtrl start_layer=10, DreamMatcher initial_layer=10). Mask: the 16×16 cross-attentions.
# We blend in the same layers that receive the reference (ALGORITHM.md leaves the blend layers
# open; the blend exists to protect the layout where the reference K/V would repaint it).
SD1 = LayerTable(
    name="sd1",
    reference_layers=_sd1_names("output_blocks", range(6, 12), "attn1"),
    mask_layers=_sd1_names("input_blocks", (7, 8), "attn2") + _sd1_names("output_blocks", (3, 4, 5), "attn2"),
    blend_layers=_sd1_names("output_blocks", range(6, 12), "attn1"),
)


def _block_levels(blocks: torch.nn.ModuleList, step_class: str, start: int, delta: int) -> list[int]:
    """Resolution level (0 = full latent size) of each block, walking Downsample/Upsample ops."""
    levels, level = [], start
    for block in blocks:
        levels.append(level)
        if any(type(m).__name__ == step_class for m in block.modules()):
            level += delta
    return levels


def infer_layer_table(unet: torch.nn.Module) -> LayerTable:
    """The same rule the SD1 table follows, derived from the UNet's structure, for UNets we have no
    table for (and the tiny test models): mask = cross-attention at the coarsest input level that
    has attention (16×16 in SD1) and its decoder twin; reference/blend = decoder self-attention at
    the finer levels. For SD1 this gives exactly `SD1` (a test checks it)."""
    if not all(hasattr(unet, a) for a in ("input_blocks", "output_blocks")):
        raise ValueError("not an ldm UNetModel (no input_blocks/output_blocks); SDXL/other UNets need a layer table")
    in_levels = _block_levels(unet.input_blocks, "Downsample", 0, +1)
    n_levels = in_levels[-1] + 1
    out_levels = _block_levels(unet.output_blocks, "Upsample", n_levels - 1, -1)
    mods = attention_modules(unet)

    def level_of(name: str) -> Optional[tuple[str, int]]:
        part, idx = name.split(".")[:2]
        if part == "input_blocks":
            return part, in_levels[int(idx)]
        if part == "output_blocks":
            return part, out_levels[int(idx)]
        return None

    located = {n: level_of(n) for n in mods}
    attn_in_levels = [lv for n, loc in located.items() if loc and loc[0] == "input_blocks" for lv in [loc[1]]]
    if not attn_in_levels:
        raise ValueError("UNet has no attention in its input blocks")
    mask_level = max(attn_in_levels)
    mask = tuple(n for n, loc in located.items() if loc and loc[1] == mask_level and is_cross_attention(n))
    reference = tuple(n for n, loc in located.items()
                      if loc and loc[0] == "output_blocks" and loc[1] < mask_level and is_self_attention(n))
    if not reference:  # a one-level UNet: use every decoder self-attention
        reference = tuple(n for n, loc in located.items() if loc and loc[0] == "output_blocks" and is_self_attention(n))
    return LayerTable("inferred", reference, mask, reference)


def layer_table_for(unet: torch.nn.Module) -> LayerTable:
    """SD1 table when the UNet has SD1's layout, else the inferred one."""
    names = set(attention_modules(unet))
    if all(n in names for n in SD1.reference_layers + SD1.mask_layers) and len(names) == 32:
        return SD1
    return infer_layer_table(unet)
