"""The retouch at a joint-attention block of a DiT (docs/ALGORITHM.md, "DiT (Flux)"): the block's
Q, K, V over [text tokens ; image tokens] go through the shared edits of `retouch.editor` with the
joint token span; what is the DiT's own is where the keys sit (rotary positions) and where the
reference's image tokens are placed:

- copy (s ≤ λ2): the target rows take the layout rows' Q, K, V over the WHOLE joint sequence, text
  and image tokens (a UNet copies every self- AND cross-attention);
- paint (s > λ2): the target's image queries attend to [its own text K/V ; the reference's image
  K/V] (optionally also its own image tokens, `with_target_tokens`); the reference keys carry
  rotary positions `shared` with the target's grid or `shifted` past its right edge
  (`reference_rope`);
- maps (until mask start): the layout's image→text attention of the subject's text tokens;
- blend (s ≥ mask start): φ* = M⊙φ_t + (1−M)⊙φ_o on the image tokens, the text tokens untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..retouch.editor import (
    REFERENCE,
    LayerRoles,
    LayerStep,
    RetouchProcessor,
    StepResults,
    StepState,
    joint_span,
)
from .tokens import image_ids

SHARED, SHIFTED = "shared", "shifted"
ROPE_MODES = (SHARED, SHIFTED)

# place(x, pe): a DiT's rotary embedding of queries or keys (B, H, L, D) with positions pe
Place = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class JointOptions:
    """The DiT family's choices (docs/ALGORITHM.md, "DiT (Flux)"), shared by every block's processor."""

    grid: tuple[int, int]  # the image-token grid
    place: Place  # the family's rotary embedding
    rope_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # ids → pe (pe_embedder)
    reference_rope: str = SHIFTED
    with_target_tokens: bool = False
    _shifted: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.reference_rope not in ROPE_MODES:
            raise ValueError(
                f"reference_rope must be one of {ROPE_MODES}, got {self.reference_rope!r}"
            )
        if self.reference_rope == SHIFTED and self.rope_of is None:
            raise ValueError("shifted reference positions need the transformer's rope (rope_of)")

    def shifted_pe(self, device) -> torch.Tensor:
        """Rotary embedding of the image grid moved right by its width (the reference sits beside
        the target, as OminiControl places subject conditions), (1, 1, n, D/2, 2, 2)."""
        pe = self._shifted.get(device)
        if pe is None:
            ids = image_ids(self.grid, col_offset=self.grid[1], device=device)
            pe = self._shifted[device] = self.rope_of(ids)
        return pe


class JointProcessor(RetouchProcessor):
    """The retouch at ONE joint-attention block: `joint` is the block's attention in this call
    (q, k, v before their positions), the shared edits over the joint span."""

    def __init__(self, roles: LayerRoles, n_references: int, options: JointOptions):
        super().__init__(roles, n_references, options.with_target_tokens)
        self.options = options

    def joint(self, state: StepState, at: LayerStep, results: StepResults, q, k, v, pe, n_txt):
        """The block's joint attention output (B, H, L, D) in this call."""
        k_plain = k  # before the rotary embedding: the reference's keys may get other positions
        q, k = self.options.place(q, pe), self.options.place(k, pe)
        if at.copy_layout:
            v = v.clone()  # a view of the block's qkv projection, about to be written
        span = joint_span(n_txt)
        return self.edit(state, at, results, q, k, v, span, k_plain=k_plain, n_txt=n_txt)

    def reference_kv(self, state: StepState, half: str, q, k, v, k_plain=None, n_txt=0, **_):
        """The reference rows' image-token K (with the chosen positions) and V, (R, H, n, D)."""
        rows = state.plan.get(REFERENCE, half)
        if rows is None:
            _, kr, vr, _ = self.source(state, REFERENCE, half, q, k, v)
            return kr, vr
        if self.options.reference_rope == SHIFTED:
            kr = self.options.place(k_plain[rows, :, n_txt:], self.options.shifted_pe(k.device))
        else:
            kr = k[rows, :, n_txt:]
        return kr, v[rows, :, n_txt:]
