"""The adaptive blend mask M of the retouch stage (docs/ALGORITHM.md, "The adaptive mask M").

    M^c  = threshold(min-max(mean cross-attention of the subject tokens))      low-res (h, w)
    M^k  = OR(Resize(M^c), M^SAM)                                              image res (H, W)
    M    = clip(Normalize(EDT(M^k)) + Resize(C(M^c)), 0, 1)

`Normalize` maps the foreground distances linearly onto [0.5, 1]: the subject's rim is blended
half-and-half with the layout, its core is the target's own. `C` drops specks of M^c (attention
noise) so they are not forced to 1. Where C(M^c) holds, M is 1; the soft ramp only appears where
SAM extended the subject beyond the attention map. `LayerMasks` then resizes M once per
self-attention resolution for  phi* = M * phi_t + (1 - M) * phi_o.

Everything here is plain numpy/scipy on small maps except `LayerMasks`, which stays on the
attention's device.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import LayoutRetouchError, check_range

# The threshold of M^c on the normalised map (MasaCtrl's; DreamMatcher uses 0.05): strictly inside
# (0, 1), so a constant map (normalised to zeros) gives an empty M^c.
DEFAULT_CA_THRESHOLD = 0.1
CA_THRESHOLD_RANGE = (0.0, 1.0)  # both ends excluded
CA_THRESHOLD_MEANING = "the threshold of the cross-attention mask"
CA_THRESHOLD_FIX = f"try {DEFAULT_CA_THRESHOLD} (MasaCtrl) or 0.05 (DreamMatcher)"
# Components of M^c smaller than 2% of the map are dropped by C(.). The paper only says "a volume
# threshold"; 2% of a 16x16 map is ~5 cells, i.e. larger than single-cell attention specks.
DEFAULT_MIN_COMPONENT_FRACTION = 0.02

# 8-connectivity: diagonal neighbours belong to the same component (a subject drawn at an angle
# on a 16x16 map is often only diagonally connected).
_EIGHT = np.ones((3, 3), dtype=bool)


def normalize_cross_attention(maps: torch.Tensor) -> torch.Tensor:
    """Average any leading dims of `maps` (..., h, w) and min-max normalise to [0, 1].

    Leading dims are whatever the caller collected (steps, layers, heads, subject tokens). The mean
    is taken in float32 so half-precision maps do not lose their small values. A constant map has
    no subject to find and comes back as zeros.
    """
    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(np.asarray(maps))
    if maps.ndim < 2 or maps.shape[-1] == 0 or maps.shape[-2] == 0:
        raise ValueError(
            f"cross-attention maps must be (..., h, w) with h, w > 0, got {tuple(maps.shape)}"
        )
    m = maps.detach().to(torch.float32).reshape(-1, maps.shape[-2], maps.shape[-1]).mean(dim=0)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("cross-attention maps contain NaN/inf (the layout pass overflowed)")
    lo, hi = m.min(), m.max()
    if hi - lo <= 0:
        return torch.zeros_like(m)
    return ((m - lo) / (hi - lo)).clamp_(0.0, 1.0)


def _check_threshold(threshold: float) -> float:
    """ca_threshold strictly inside CA_THRESHOLD_RANGE (the parameter table's rule too)."""
    low, high = CA_THRESHOLD_RANGE
    return check_range(
        "ca_threshold",
        float(threshold),
        low,
        high,
        exclusive=True,
        meaning=CA_THRESHOLD_MEANING,
        fix=CA_THRESHOLD_FIX,
    )


def cross_attention_mask(
    maps: torch.Tensor, threshold: float = DEFAULT_CA_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """(normalised map float32 (h, w), M^c bool (h, w)).

    M^c = normalised >= threshold (inclusive: a cell exactly at the threshold is subject). The
    threshold must be in (0, 1) (the parameter table's rule), so a constant map (normalised to zeros)
    gives an empty M^c.
    """
    t = _check_threshold(threshold)
    norm = normalize_cross_attention(maps).cpu().numpy().astype(np.float32, copy=False)
    return norm, norm >= np.float32(t)


def _as_bool_2d(mask: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name} must be 2-D (h, w), got shape {m.shape}")
    return m.astype(bool, copy=False)


def remove_small_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """C(.): keep the 8-connected components with area >= min_fraction * mask.size."""
    m = _as_bool_2d(mask, "mask")
    if not (0.0 <= float(min_fraction) <= 1.0):
        raise LayoutRetouchError(
            f"minimum component fraction {min_fraction!r} is outside [0, 1]; it is a share of the "
            f"attention map (default {DEFAULT_MIN_COMPONENT_FRACTION}).",
            parameter="min_component_fraction",
        )
    labels, n = ndimage.label(m, structure=_EIGHT)
    if n == 0:
        return np.zeros_like(m)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= float(min_fraction) * m.size
    keep[0] = False  # label 0 is the background
    return keep[labels]


def resize_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to size (H, W), sampling at pixel centres.

    Output pixel i reads input pixel floor((i + 0.5) * h / H): integer up-scaling repeats each cell
    exactly k times, and down-scaling does not drift towards the top-left like floor(i * h / H).
    """
    a = np.asarray(mask)
    if a.ndim != 2:
        raise ValueError(f"mask must be 2-D (h, w), got shape {a.shape}")
    H, W = int(size[0]), int(size[1])
    if H <= 0 or W <= 0:
        raise ValueError(f"size must be positive (H, W), got {size}")
    h, w = a.shape
    if (h, w) == (H, W):
        return a.copy()
    rows = np.minimum(((np.arange(H) + 0.5) * (h / H)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * (w / W)).astype(np.int64), w - 1)
    return a[rows[:, None], cols[None, :]]


def _normalize_distances(d: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Foreground distances linearly from [min, max] to [0.5, 1]; background 0; all equal -> 1."""
    out = np.zeros(d.shape, dtype=np.float64)
    if not fg.any():
        return out
    vals = d[fg]
    lo, hi = float(vals.min()), float(vals.max())
    out[fg] = 1.0 if hi - lo <= 0 else 0.5 + 0.5 * (vals - lo) / (hi - lo)
    return out


def adaptive_mask(
    ca_mask: np.ndarray,
    sam_mask: np.ndarray | None,
    size: tuple[int, int] | None = None,
    min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
) -> np.ndarray:
    """M = clip(Normalize(EDT(OR(Resize(M^c), M^SAM))) + Resize(C(M^c)), 0, 1), float32 (H, W).

    `size` defaults to the SAM mask's shape (image resolution), else to M^c's. Without SAM
    (`sam_mask=None`), M^k = M^c as the spec says. The EDT measures distance to the nearest
    background pixel inside the frame; the frame border is not background, so a subject cut by
    the frame keeps a high weight at the border.
    """
    mc = _as_bool_2d(ca_mask, "ca_mask")
    sam = None if sam_mask is None else _as_bool_2d(sam_mask, "sam_mask")
    if size is None:
        size = sam.shape if sam is not None else mc.shape
    size = (int(size[0]), int(size[1]))

    mk = resize_nearest(mc, size)
    if sam is not None:
        mk = mk | resize_nearest(sam, size)
    if mk.all():
        d = np.ones(size, dtype=np.float64)  # no background to measure from: uniform distances
    else:
        d = ndimage.distance_transform_edt(mk)
    m = _normalize_distances(d, mk)
    m += resize_nearest(remove_small_components(mc, min_component_fraction), size)
    return np.clip(m, 0.0, 1.0).astype(np.float32)


def layer_hw(latent_hw: tuple[int, int], n_tokens: int) -> tuple[int, int]:
    """The (h, w) of an attention layer with n_tokens tokens over a latent of latent_hw.

    First the UNet's own chain (each down-sample is a stride-2 conv with padding 1: ceil(x / 2)),
    which is exact for odd latent sizes; then the aspect-ratio formula h = lh / f,
    f = sqrt(lh * lw / n_tokens).
    """
    lh, lw = latent_hw
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    h, w = lh, lw
    while h * w > n_tokens and (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w == n_tokens:
        return h, w
    f = math.sqrt(lh * lw / n_tokens)
    h = max(1, round(lh / f))
    if n_tokens % h == 0:
        w = n_tokens // h
        if abs(w - lw / f) < 1.0:
            return h, w
    raise ValueError(f"no (h, w) with h*w == {n_tokens} fits the latent aspect {lh}x{lw}")


class LayerMasks:
    """The blend mask resized once per attention-layer resolution, on the mask's device.

    `mask` is (B, H, W) (or (H, W) for one image) with values in [0, 1]. `for_tokens(n)` gives a
    (B, n, 1) tensor to broadcast over the channels of a self-attention output with n tokens.
    """

    def __init__(self, mask: torch.Tensor, latent_hw: tuple[int, int]):
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(np.asarray(mask))
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim != 3:
            raise ValueError(f"mask must be (B, H, W), got {tuple(mask.shape)}")
        if not mask.is_floating_point():
            mask = mask.to(torch.float32)
        self.mask = mask
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        if self.latent_hw[0] <= 0 or self.latent_hw[1] <= 0:
            raise ValueError(f"latent_hw must be positive, got {latent_hw}")
        self._cache: dict[tuple[int, torch.dtype, bool], torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    def layer_hw(self, n_tokens: int) -> tuple[int, int]:
        return layer_hw(self.latent_hw, int(n_tokens))

    def for_tokens(
        self, n_tokens: int, dtype: torch.dtype | None = None, complement: bool = False
    ) -> torch.Tensor:
        """(B, n_tokens, 1) mask at the layer's resolution; bilinear, antialiased when shrinking.
        `complement=True` gives 1 − M (the weight of an in-place `φ_t.lerp_(φ_o, 1 − M)`), also cached."""
        dtype = dtype or self.mask.dtype
        key = (int(n_tokens), dtype, bool(complement))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        h, w = self.layer_hw(n_tokens)
        H, W = self.mask.shape[-2:]
        # float64 so that constant regions come back exactly (the antialias weights sum to 1 only
        # up to rounding): M == 1 must give exactly the target's own output, M == 0 the layout's.
        # MPS has no float64: resize those on the CPU (once per resolution, small).
        work = torch.device("cpu") if self.mask.device.type == "mps" else self.mask.device
        src = self.mask[:, None].to(work, torch.float64)
        if (h, w) == (H, W):
            out = src
        else:
            shrink = h < H or w < W
            out = F.interpolate(
                src, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink
            )
        out = out.clamp(0.0, 1.0).reshape(self.batch_size, h * w, 1)
        if complement:
            out = 1.0 - out  # in float64: 1 − 1 and 1 − 0 stay exact
        out = out.to(self.mask.device, dtype)
        self._cache[key] = out
        return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros_like(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0
    return labels == int(np.argmax(areas))  # ties: the first in raster order


def sam_prompts_from_ca(
    norm_map: np.ndarray,
    ca_mask: np.ndarray,
    image_size: tuple[int, int],
    n_points: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """SAM prompts from the attention map: (box (4,) xyxy, points (k, 2) xy), in image pixels.

    `image_size` is (H, W). The box is the outer edge of the largest 8-connected component of M^c
    (cell c spans [c, c+1) * scale). The points are the centres of the top-`n_points` local maxima
    of `norm_map` (3x3 neighbourhood) inside that same component, highest first; points in other
    components would contradict the box. A flat-topped peak counts once, at its cell nearest the
    plateau's centroid. k <= n_points; k >= 1 whenever M^c is non-empty.
    """
    norm = np.asarray(norm_map, dtype=np.float64)
    mc = _as_bool_2d(ca_mask, "ca_mask")
    if norm.shape != mc.shape:
        raise ValueError(f"norm_map {norm.shape} and ca_mask {mc.shape} differ in shape")
    if not mc.any():
        raise ValueError("ca_mask is empty: there is no subject to prompt SAM with")
    H, W = int(image_size[0]), int(image_size[1])
    h, w = mc.shape
    sy, sx = H / h, W / w

    blob = _largest_component(mc)
    rows = np.flatnonzero(blob.any(axis=1))
    cols = np.flatnonzero(blob.any(axis=0))
    box = np.array(
        [cols[0] * sx, rows[0] * sy, (cols[-1] + 1) * sx, (rows[-1] + 1) * sy], dtype=np.float32
    )

    inside = np.where(blob, norm, -np.inf)
    peaks = blob & (inside >= ndimage.maximum_filter(inside, size=3, mode="constant", cval=-np.inf))
    labels, n = ndimage.label(peaks, structure=_EIGHT)
    found = []
    for lab in range(1, n + 1):
        rr, cc = np.nonzero(labels == lab)
        k = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
        found.append((-norm[rr[k], cc[k]], int(rr[k]), int(cc[k])))
    found.sort()  # highest value first; ties in raster order
    pts = [((c + 0.5) * sx, (r + 0.5) * sy) for _, r, c in found[: max(0, int(n_points))]]
    return box, np.array(pts, dtype=np.float32).reshape(-1, 2)


# -- several subjects: disjoint regions ---------------------------------------------------------------
NO_REGION = -1


def regions_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """(K, N, h, w) per-subject scores (0 = not that subject) → (N, h, w) region index: the subject
    with the highest score where any is above 0 (ties: the first subject), NO_REGION elsewhere. The
    regions are disjoint by construction: a cell belongs to one subject or to none."""
    best, index = scores.max(dim=0)
    return torch.where(best > 0, index, torch.full_like(index, NO_REGION))


def regions_from_maps(maps: Sequence[torch.Tensor], threshold: float) -> torch.Tensor:
    """Each subject's region from its own cross-attention maps: (N, h, w) per subject → (N, h, w)
    region index. Per image each subject's map is min-max normalised and thresholded as M^c; where
    two subjects' M^c overlap the cell goes to the higher normalised map."""
    t = _check_threshold(threshold)
    per_subject = []
    for m in maps:
        norm = torch.stack([normalize_cross_attention(m[i]) for i in range(m.shape[0])])
        per_subject.append(torch.where(norm >= t, norm, torch.zeros_like(norm)))
    return regions_from_scores(torch.stack(per_subject))


class LayerRegions:
    """A region index (N, H, W) (NO_REGION outside every subject) at each attention layer's
    resolution, nearest-neighbour, cached per resolution and device: `for_tokens(n)` → (N, n)."""

    def __init__(self, index: torch.Tensor, latent_hw: tuple[int, int]):
        if index.ndim != 3:
            raise ValueError(f"region index must be (N, H, W), got {tuple(index.shape)}")
        self.index = index.long()
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self._cache: dict[tuple, torch.Tensor] = {}

    def for_tokens(self, n_tokens: int, device=None) -> torch.Tensor:
        device = torch.device(device) if device is not None else self.index.device
        key = (int(n_tokens), device)
        hit = self._cache.get(key)
        if hit is None:
            h, w = layer_hw(self.latent_hw, int(n_tokens))
            src = self.index[:, None].float()
            if tuple(src.shape[-2:]) != (h, w):
                src = F.interpolate(src, size=(h, w), mode="nearest")
            hit = self._cache[key] = src.reshape(self.index.shape[0], h * w).long().to(device)
        return hit

    def subjects_present(self, k: int) -> list[bool]:
        """Per image: does subject k have any cell?"""
        return [bool((self.index[i] == k).any()) for i in range(self.index.shape[0])]
