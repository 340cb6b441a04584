"""The conditionings of the retouch's three paths (y_r, y_p, the negative prompt), as a family's
`encode_conds` makes them and the loop batches them (`conditioning.Cond`: a tensor or a dict)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import conditioning as C
from .editor import LAYOUT, REFERENCE, TARGET


@dataclass
class RetouchConds:
    """One-row conditionings (conditioning.Cond: a tensor, or a dict of parts): y_r for the
    reference and target paths, y_p for the layout path, the negative prompt for every uncond half.

    A family whose conditioning carries the image's size (SDXL's size terms) gives the reference
    path the reference photo's: `reference`/`reference_uncond`/`reference_empty` carry the
    reference's, everything else the generation's; `target` is y_r's tokens with the layout's
    non-attention part (a pooled vector). Where a family needs none of these the optional ones stay
    None (the defaults below)."""

    reference: C.Cond
    layout: C.Cond
    uncond: C.Cond
    target: Optional[C.Cond] = None  # y_r's tokens with the layout's vector (default: reference)
    reference_uncond: Optional[C.Cond] = (
        None  # negative prompt with the reference's size terms (default: uncond)
    )
    reference_empty: Optional[C.Cond] = (
        None  # "" for the reference inversion (default: model.conditioning([""]))
    )
    layout_empty: Optional[C.Cond] = None  # "" for the layout inversion (default: likewise)

    def cond_of(self, path: str) -> C.Cond:
        if path == TARGET and self.target is not None:
            return self.target
        return self.layout if path == LAYOUT else self.reference

    def uncond_of(self, path: str) -> C.Cond:
        return (
            self.reference_uncond
            if (path == REFERENCE and self.reference_uncond is not None)
            else self.uncond
        )
