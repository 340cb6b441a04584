"""Flux.1's layer table: which blocks take the reference, blend and give the subject maps
(docs/ALGORITHM.md, "DiT (Flux)"), and a block's roles (a joint block: no self/cross split)."""

from __future__ import annotations

import torch

from ...retouch.editor import LayerRoles
from ...retouch.layers import PRESETS, LayerTable

DOUBLE, SINGLE = "double_blocks", "single_blocks"

# Flux.1 (dev and schnell: 19 double-, 38 single-stream blocks; 57 in all, counted 0–56 in execution
# order). Reference = blend blocks, `standard`: Stable Flow's "vital layers" of Flux.1-dev (Avrahami
# et al. 2025, measured by bypassing each block: 0, 1, 17, 18, 25, 28, 53, 54, 56), which FreeCus also
# shares attention in: the blocks where replacing attention changes the image. `light`: the late ones
# only (17, 18, 53, 54, 56: the last two double blocks and the last single ones), where appearance
# rather than layout is set. Mask: every double block (text and image keep their own projections there,
# the closest a DiT has to a UNet cross-attention).
VITAL_FLUX1 = (0, 1, 17, 18, 25, 28, 53, 54, 56)
LIGHT_FLUX1 = (17, 18, 53, 54, 56)
FLUX1_DEPTH = (19, 38)


def _unified_names(indices, depth: int) -> tuple[str, ...]:
    return tuple(f"{DOUBLE}.{u}" if u < depth else f"{SINGLE}.{u - depth}" for u in indices)


def dit_layer_table(depth: int, depth_single: int, preset: str = "standard") -> LayerTable:
    """The DiT layer table for a Flux-architecture transformer of `depth` double- and `depth_single`
    single-stream blocks. Flux.1's size gets the written sets; other sizes get them placed at the
    same relative depth (index u of 57 → round(u·(N−1)/56) of N)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown layer preset {preset!r}; one of {', '.join(PRESETS)}")
    chosen = VITAL_FLUX1 if preset == "standard" else LIGHT_FLUX1
    n, full = depth + depth_single, sum(FLUX1_DEPTH)
    if (depth, depth_single) != FLUX1_DEPTH:
        chosen = tuple(sorted({int(u * (n - 1) / (full - 1) + 0.5) for u in chosen}))
    reference = _unified_names(chosen, depth)
    mask = tuple(f"{DOUBLE}.{i}" for i in range(depth))
    name = ("flux" if (depth, depth_single) == FLUX1_DEPTH else "flux-inferred") + (
        "-light" if preset == "light" else ""
    )
    return LayerTable(name, reference, mask, reference)


def layer_table_for_dit(transformer: torch.nn.Module, preset: str = "standard") -> LayerTable:
    return dit_layer_table(
        len(getattr(transformer, DOUBLE)), len(getattr(transformer, SINGLE)), preset
    )


def layer_roles(table: LayerTable, name: str) -> LayerRoles:
    """A joint block's roles: every edit the table gives it (text and image share its attention)."""
    return LayerRoles(
        name,
        copies_layout=table.copies_layout_at(name),
        paints=name in table.reference_layers,
        blends=name in table.blend_layers,
        records_maps=name in table.mask_layers,
    )
