"""The layer table: which attention layers of a network do what in the retouch (docs/ALGORITHM.md).
Data, not code: each family supplies its tables (unet/layers.py: SD1, SDXL; dit/flux/layers.py:
Flux.1) and the rule that turns a table into a layer's roles (`LayerRoles`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Presets: how much of the decoder receives the reference identity. "standard" is the paper's
# (MasaCtrl's) choice; "light" keeps only the finer of its levels — less of the reference's
# structure, fewer layers edited — for subjects whose reference pose or background bleeds in.
PRESETS = ("standard", "light")
DEFAULT_PRESET = "standard"


@dataclass(frozen=True)
class LayerTable:
    """The layer sets of docs/ALGORITHM.md for one network (a UNet's attention modules, a DiT's
    blocks), by name."""

    name: str
    reference_layers: tuple[str, ...]  # take the reference path's K, V when s > λ2
    mask_layers: tuple[str, ...]  # whose subject-token maps make M^c
    blend_layers: tuple[str, ...]  # whose output is blended with the layout's when s ≥ mask_start
    layout_layers: Optional[tuple[str, ...]] = (
        None  # swapped with the layout path when s ≤ λ2; None = every layer
    )

    def swaps_every_layer(self) -> bool:
        return self.layout_layers is None

    def copies_layout_at(self, name: str) -> bool:
        return self.layout_layers is None or name in self.layout_layers

    def with_layout_layers(self, layers: Optional[tuple[str, ...]]) -> "LayerTable":
        return LayerTable(
            self.name, self.reference_layers, self.mask_layers, self.blend_layers, layers
        )
