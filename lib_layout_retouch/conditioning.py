"""Text conditionings as the families' networks take them, batched alike.

A conditioning is one tensor (B, tokens, dim) — SD1.x: the text encoder's hidden states — or a dict
of parts that share the batch: SDXL {"crossattn": (B, tokens, 2048), "vector": (B, 2816)} (the two
text encoders' hidden states side by side; the pooled OpenCLIP embedding followed by the Fourier-
embedded size terms), Flux {"crossattn": T5 states, "vector": pooled CLIP-L, "guidance"}.

Every function here takes either form, so the loop batches its three paths (reference, layout,
target × both CFG halves) without caring which model it drives. `SizeTerms` describe how an image
was prepared (original size, crop, fed size): what a family with size conditioning reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

Cond = Union[torch.Tensor, dict]
CHUNK = 77  # tokens per prompt chunk (A1111 encodes prompts over 75 tokens in 77-token chunks)


def is_dict(c: Cond) -> bool:
    return isinstance(c, dict)


def tokens(c: Cond) -> torch.Tensor:
    """The token-sequence part (what cross-attention attends to)."""
    return c["crossattn"] if is_dict(c) else c


def batch_size(c: Cond) -> int:
    return tokens(c).shape[0]


def _map(c: Cond, fn) -> Cond:
    return {k: fn(v) for k, v in c.items()} if is_dict(c) else fn(c)


def rows(c: Cond, index) -> Cond:
    """Rows `index` (a slice or an int range) of every part."""
    return _map(c, lambda t: t[index])


def expand(c: Cond, n: int) -> Cond:
    """A one-row conditioning repeated to n rows (a view, no copy); n-row input is returned as is."""
    if batch_size(c) == n:
        return c
    if batch_size(c) != 1:
        raise ValueError(f"cannot expand a conditioning of {batch_size(c)} rows to {n}")
    return _map(c, lambda t: t.expand(n, *t.shape[1:]))


def to(c: Cond, device=None, dtype=None) -> Cond:
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(
            device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None
        )

    return _map(c, move)


def like(c: Cond, reference: Cond) -> Cond:
    """`c` moved to `reference`'s device and dtype, part by part."""
    if is_dict(c):
        return {k: v.to(reference[k].device, reference[k].dtype) for k, v in c.items()}
    return c.to(reference.device, reference.dtype)


def pad_tokens(conds: Sequence[Cond]) -> list[Cond]:
    """Conditionings of different lengths (prompts over 75 tokens come in 77-token chunks) are
    padded to the longest by repeating their last chunk, so one batch can carry them."""
    longest = max(tokens(c).shape[1] for c in conds)
    out = []
    for c in conds:
        t = tokens(c)
        while t.shape[1] < longest:
            t = torch.cat([t, t[:, -CHUNK:]], dim=1)
        t = t[:, :longest]
        out.append({**c, "crossattn": t} if is_dict(c) else t)
    return out


def cat(conds: Sequence[Cond]) -> Cond:
    """Rows of several conditionings in one batch (token lengths padded first)."""
    conds = pad_tokens(conds)
    if is_dict(conds[0]):
        keys = conds[0].keys()
        if any(not is_dict(c) or c.keys() != keys for c in conds):
            raise ValueError("cannot batch conditionings of different kinds")
        return {k: torch.cat([c[k] for c in conds]) for k in keys}
    return torch.cat(list(conds))


def with_tokens_of(c: Cond, source: Cond) -> Cond:
    """`c` with its token sequence replaced by `source`'s (SDXL: `c`'s size terms kept)."""
    if is_dict(c):
        return {**c, "crossattn": tokens(source)}
    return tokens(source)


# -- SDXL size terms ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeTerms:
    """SDXL's micro-conditioning of one image, all as (height, width) / (top, left) in pixels.

    For a generated image all three are its own size and (0, 0) (what the WebUI passes, its crop
    settings aside). For the reference photo they describe the photo *as it is fed*: its original
    upright size, where the centre crop starts in the resized photo, and the size it is resized to.
    """

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]

    @classmethod
    def of_generation(
        cls, width: int, height: int, crop_top_left: tuple[int, int] = (0, 0)
    ) -> "SizeTerms":
        return cls(
            (int(height), int(width)),
            (int(crop_top_left[0]), int(crop_top_left[1])),
            (int(height), int(width)),
        )
