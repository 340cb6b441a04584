"""Float tolerances that follow from what is compared, not from one CPU's luck.

Two fp32 computations of the same value that differ only in HOW they round (another batch size, so
another GEMM blocking; SDPA instead of an einsum softmax; AVX-512 here, AVX2 on another CI machine)
drift apart by rounding noise. Each multiply-add on the chain that produced an element rounds by at
most eps/2 relative; independent roundings add like a random walk, so the drift is about
eps · |x| · sqrt(n) for n roundings on the chain — with |x| the largest magnitude compared, as an
error made in a large intermediate lands in every element after the next mixing layer.

`roundings` is that n, counted from the network (`network_roundings`) or the operation, never fitted to
a measured difference. Every test that allows this drift also checks that the behaviour it guards
moves the result by far more (`assert_differs_beyond`), so the test can still fail.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7: the spacing of fp32 numbers at 1


def network_roundings(net: torch.nn.Module) -> int:
    """Roundings on the way to one output element of one forward of `net` (a UNet, a text encoder):
    the reduction length of every Linear (in_features) and Conv2d (in_channels/groups · kernel area),
    summed — such a network is a chain of them (the attention products add their own, fewer than the
    projections around them)."""
    n = 0
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            n += m.in_features
        elif isinstance(m, torch.nn.Conv2d):
            n += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
    return n


def rounding_atol(
    reference: torch.Tensor, roundings: int, gain: float = 1.0, dtype: torch.dtype = torch.float32
) -> float:
    """gain · eps · max|reference| · sqrt(roundings): the rounding drift between two fp32
    computations of `reference` that differ only in the order of their `roundings` sequential
    roundings. `gain`: what amplifies an error on the way (classifier-free guidance g multiplies the
    error of ε_c − ε_u by g). `dtype`: the precision that rounds (fp16: eps 9.8e-4)."""
    eps = torch.finfo(dtype).eps
    return gain * eps * float(reference.detach().abs().max()) * math.sqrt(roundings)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def assert_rounding_close(
    a: torch.Tensor, b: torch.Tensor, roundings: int, gain: float = 1.0
) -> float:
    """|a − b| within `rounding_atol(b, roundings, gain)` everywhere; returns that tolerance."""
    tol = rounding_atol(b, roundings, gain)
    diff = _max_diff(a, b)
    assert diff <= tol, f"max |a - b| = {diff:.3g} > {tol:.3g} (fp32 rounding of {roundings} ops)"
    return tol


def assert_differs_beyond(a: torch.Tensor, b: torch.Tensor, tol: float, factor: float = 1) -> None:
    """max |a − b| above `factor` × `tol`: a change that the rounding drift a test allows cannot
    explain (`tol` already bounds that drift from above), so the test guarding it can fail."""
    diff = _max_diff(a, b)
    assert diff > factor * tol, f"max |a - b| = {diff:.3g}, not above {factor:g} × {tol:.3g}"


def attention_roundings(module: torch.nn.Module, tokens: int) -> int:
    """Roundings on the way to one output element of one attention module over `tokens` keys: its
    projections (`network_roundings`), then Q·Kᵀ (head width), the softmax sum and P·V (`tokens` each)."""
    head_width = module.to_q.out_features // module.heads
    return network_roundings(module) + head_width + 2 * tokens


class SubjectMapGain:
    """While in its `with` block, the largest gain of the subject maps' min-max normalisation
    (`masks.normalize_cross_attention`, the map M^c thresholds): a rounding δ of the raw averaged map
    becomes up to 4δ/(hi − lo) in the normalised one (δ on the cell, on lo and on hi), so relative to
    the raw map's largest value hi the gain is 4·hi/(hi − lo)."""

    def __init__(self):
        self.value = 0.0

    def __enter__(self) -> "SubjectMapGain":
        from lib_layout_retouch import masks

        self._masks, self._real = masks, masks.normalize_cross_attention

        def recording(maps):
            m = torch.as_tensor(maps).detach().float().reshape(-1, *maps.shape[-2:]).mean(0)
            lo, hi = float(m.min()), float(m.max())
            if hi > lo:
                self.value = max(self.value, 4 * max(abs(hi), abs(lo)) / (hi - lo))
            return self._real(maps)

        masks.normalize_cross_attention = recording
        return self

    def __exit__(self, *exc) -> None:
        self._masks.normalize_cross_attention = self._real


def assert_same_mask(a, b, roundings: int, map_gain: float) -> None:
    """The retouch mask M of two runs that round differently (`a`, `b`: RetouchResults of the same
    layouts, ≥ 2 images). M thresholds the normalised subject map (then a distance transform of that
    binary), so it is the same bit for bit unless a cell of the map lies within the maps' rounding
    drift of the threshold: the maps agree up to that drift, the fixture keeps clear of the
    threshold by more than it (else this comparison could not tell), and then M must be equal.
    `map_gain`: `SubjectMapGain().value` of the runs; the two layouts' maps differ beyond the drift,
    so the map comparison can fail."""
    from lib_layout_retouch.masks import DEFAULT_CA_THRESHOLD

    assert map_gain > 0, "no subject map was normalised inside SubjectMapGain's block"
    tol = assert_rounding_close(a.ca_maps, b.ca_maps, roundings, gain=map_gain)
    assert_differs_beyond(b.ca_maps[0], b.ca_maps[1], tol)
    margin = float((b.ca_maps - DEFAULT_CA_THRESHOLD).abs().min())
    assert margin > tol, f"a map cell {margin:.3g} from the threshold, within the drift {tol:.3g}"
    assert torch.equal(a.masks, b.masks)
