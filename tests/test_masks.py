from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_layout_retouch import masks
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.masks import (
    LayerMasks,
    adaptive_mask,
    cross_attention_mask,
    normalize_cross_attention,
    remove_small_components,
    resize_nearest,
    sam_prompts_from_ca,
)


def square(n=11, lo=2, hi=9):
    m = np.zeros((n, n), dtype=bool)
    m[lo:hi, lo:hi] = True
    return m


# ---------------------------------------------------------------- cross-attention normalisation


def test_normalize_averages_leading_dims_then_min_max():
    a = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    b = torch.tensor([[2.0, 2.0], [4.0, 10.0]])
    maps = torch.stack([a, b])[None].to(torch.float16)  # (1, 2, 2, 2): e.g. steps x heads
    out = normalize_cross_attention(maps)
    # mean = [[1, 2], [4, 8]] -> (x - 1) / 7
    assert out.dtype == torch.float32 and out.shape == (2, 2)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1 / 7], [3 / 7, 1.0]]))


def test_normalize_constant_map_gives_zeros_and_empty_mask():
    out = normalize_cross_attention(torch.full((3, 4, 5), 0.7))
    assert torch.equal(out, torch.zeros(4, 5))
    norm, mc = cross_attention_mask(torch.full((4, 5), 0.7))
    assert not mc.any() and (norm == 0).all()


def test_normalize_rejects_non_finite():
    with pytest.raises(ValueError):
        normalize_cross_attention(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


def test_threshold_is_inclusive_at_the_boundary():
    # values 0, 1, 2, ..., 10 -> normalised 0.0, 0.1, ..., 1.0 (0.1 exactly in float32 arithmetic)
    maps = torch.arange(11, dtype=torch.float32).reshape(1, 11)
    norm, mc = cross_attention_mask(maps, threshold=float(np.float32(1) / np.float32(10)))
    assert norm.dtype == np.float32 and mc.dtype == bool
    assert norm[0, 1] == np.float32(0.1)
    assert mc.tolist() == [[False] + [True] * 10]  # the cell exactly at the threshold is subject
    _, mc2 = cross_attention_mask(maps, threshold=0.1000001)
    assert mc2.tolist() == [[False, False] + [True] * 9]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_threshold_out_of_range_is_user_error(bad):
    with pytest.raises(LayoutRetouchError) as e:
        cross_attention_mask(torch.rand(4, 4), bad)
    assert e.value.parameter == "ca_threshold"


# ---------------------------------------------------------------- C(.) and resize


def test_remove_small_components_drops_speck_keeps_blob():
    m = np.zeros((16, 16), dtype=bool)
    m[4:10, 4:10] = True  # 36 cells = 14% of 256
    m[14, 1] = True  # a 1-cell speck = 0.4%
    m[0, 15] = m[1, 14] = True  # 2 diagonal cells: one component under 8-connectivity
    out = remove_small_components(m, 0.02)  # threshold 5.12 cells
    expected = np.zeros_like(m)
    expected[4:10, 4:10] = True
    assert np.array_equal(out, expected)
    # 8-connectivity: the diagonal pair counts as 2 cells, kept at a threshold of 2/256
    kept = remove_small_components(m, 2 / 256)
    assert kept[0, 15] and kept[1, 14] and not kept[14, 1]
    assert np.array_equal(remove_small_components(m, 0.0), m)
    with pytest.raises(LayoutRetouchError):
        remove_small_components(m, 1.5)


def test_resize_nearest_repeats_cells_and_samples_centres():
    a = np.array([[1, 2], [3, 4]])
    up = resize_nearest(a, (4, 6))
    assert up.tolist() == [[1, 1, 1, 2, 2, 2]] * 2 + [[3, 3, 3, 4, 4, 4]] * 2
    b = np.arange(16).reshape(4, 4)
    # centre sampling: output i reads floor((i + 0.5) * 2) = 1, 3
    assert resize_nearest(b, (2, 2)).tolist() == [[5, 7], [13, 15]]
    assert resize_nearest(np.ones((3, 3), bool), (5, 7)).dtype == bool


# ---------------------------------------------------------------- adaptive mask


def test_adaptive_mask_edt_ramp_on_7x7_square():
    sam = square()  # 7x7 square in an 11x11 frame
    m = adaptive_mask(np.zeros((11, 11), bool), sam)
    assert m.dtype == np.float32 and m.shape == (11, 11)
    # EDT of a 7x7 square: rim 1, next ring 2, then 3, centre 4 -> 0.5 + 0.5 * (d - 1) / 3
    assert m[5, 5] == pytest.approx(1.0)
    assert (
        m[2, 2] == pytest.approx(0.5)
        and m[2, 5] == pytest.approx(0.5)
        and m[8, 5] == pytest.approx(0.5)
    )
    assert m[3, 5] == pytest.approx(0.5 + 0.5 / 3)
    assert m[4, 4] == pytest.approx(0.5 + 1.0 / 3)
    assert m[3, 3] == pytest.approx(0.5 + 0.5 / 3)  # ring 2, diagonal position: still distance 2
    assert (m[~sam] == 0).all()  # background exactly 0


def test_adaptive_mask_ca_component_is_forced_to_one():
    mc = square()
    m = adaptive_mask(mc, None)  # no SAM: M^k = M^c
    assert (m[mc] == 1.0).all() and (m[~mc] == 0).all()


def test_adaptive_mask_c_drops_speck_to_ramp_value():
    mc = np.zeros((20, 20), bool)
    mc[5:15, 5:15] = True
    mc[0, 19] = True  # speck: 1/400 < 2%
    m = adaptive_mask(mc, None)
    assert (m[5:15, 5:15] == 1.0).all()
    assert m[0, 19] == pytest.approx(0.5)  # only its EDT ramp, min foreground distance -> 0.5
    m_keep = adaptive_mask(mc, None, min_component_fraction=0.0)
    assert m_keep[0, 19] == 1.0


def test_adaptive_mask_or_with_sam_enlarges_foreground_at_image_size():
    mc = np.zeros((4, 4), bool)
    mc[1:3, 1:3] = True  # 2x2 of a 4x4 map -> rows/cols 4..11 at 16x16
    sam = np.zeros((16, 16), bool)
    sam[2:14, 2:14] = True  # SAM extends the subject by 2 pixels each side
    m = adaptive_mask(mc, sam)
    assert m.shape == (16, 16)
    ca_up = resize_nearest(mc, (16, 16))
    assert (m[ca_up] == 1.0).all()
    ring = sam & ~ca_up
    assert ((m[ring] >= 0.5) & (m[ring] < 1.0)).any() and (m[ring] >= 0.5).all()
    assert m[2, 8] == pytest.approx(0.5)  # outermost SAM pixel: min distance 1 -> 0.5
    assert (m[~sam] == 0).all()
    assert (m > 0).sum() == sam.sum() > ca_up.sum()
    no_sam = adaptive_mask(mc, None, size=(16, 16))
    assert (no_sam > 0).sum() == ca_up.sum()


def test_adaptive_mask_range_and_edge_cases():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mc = rng.random((8, 8)) > 0.6
        sam = rng.random((32, 32)) > 0.5
        m = adaptive_mask(mc, sam)
        assert m.dtype == np.float32 and m.min() >= 0.0 and m.max() <= 1.0
    assert (adaptive_mask(np.zeros((4, 4), bool), np.zeros((8, 8), bool)) == 0).all()
    full = adaptive_mask(np.zeros((4, 4), bool), np.ones((8, 8), bool))
    assert (full == 1.0).all()  # no background: all distances equal -> 1
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    assert adaptive_mask(np.zeros((5, 5), bool), one)[2, 2] == 1.0  # single fg pixel: all equal


# ---------------------------------------------------------------- per-layer masks


@pytest.mark.parametrize(
    "latent, n_tokens, hw",
    [
        ((64, 64), 64 * 64, (64, 64)),
        ((64, 64), 32 * 32, (32, 32)),
        ((64, 64), 16 * 16, (16, 16)),
        ((64, 64), 8 * 8, (8, 8)),
        ((64, 96), 64 * 96, (64, 96)),
        ((64, 96), 32 * 48, (32, 48)),
        ((64, 96), 16 * 24, (16, 24)),
        ((64, 96), 8 * 12, (8, 12)),
        ((65, 97), 33 * 49, (33, 49)),  # odd latent: the UNet's stride-2 convs round up
        ((65, 97), 9 * 13, (9, 13)),
    ],
)
def test_layer_masks_shapes(latent, n_tokens, hw):
    H, W = latent[0] * 8, latent[1] * 8
    lm = LayerMasks(torch.rand(2, H, W), latent)
    out = lm.for_tokens(n_tokens)
    assert lm.layer_hw(n_tokens) == hw
    assert out.shape == (2, n_tokens, 1) and out.dtype == torch.float32
    assert lm.for_tokens(n_tokens) is out  # cached
    assert lm.for_tokens(n_tokens, torch.float16).dtype == torch.float16


def test_layer_masks_rejects_token_counts_that_do_not_fit():
    lm = LayerMasks(torch.rand(1, 64, 96), (64, 96))
    with pytest.raises(ValueError):
        lm.for_tokens(1000)
    with pytest.raises(ValueError):
        lm.for_tokens(0)


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_layer_masks_preserve_constant_masks_exactly(value):
    lm = LayerMasks(torch.full((2, 512, 768), value), (64, 96))
    for n in (64 * 96, 32 * 48, 16 * 24, 8 * 12):
        assert torch.equal(lm.for_tokens(n), torch.full((2, n, 1), value))
        assert torch.equal(
            lm.for_tokens(n, torch.float16), torch.full((2, n, 1), value, dtype=torch.float16)
        )


def test_layer_masks_layout_and_per_image():
    # image 0: left half ones; image 1: top half ones. Token order is row-major (h, w).
    m = torch.zeros(2, 64, 64)
    m[0, :, :32] = 1
    m[1, :32, :] = 1
    out = LayerMasks(m, (64, 64)).for_tokens(16 * 16).reshape(2, 16, 16)
    assert torch.equal(out[0, :, :7], torch.ones(16, 7)) and torch.equal(
        out[0, :, 9:], torch.zeros(16, 7)
    )
    assert torch.equal(out[1, :7], torch.ones(7, 16)) and torch.equal(
        out[1, 9:], torch.zeros(7, 16)
    )
    # antialiased 4x shrink = triangle filter of radius 4: the two cells at the edge see 7/8 and 1/8
    torch.testing.assert_close(out[0, :, 7:9], torch.tensor([0.875, 0.125]).expand(16, 2))
    torch.testing.assert_close(out[1, 7:9, :], torch.tensor([[0.875], [0.125]]).expand(2, 16))
    # an (H, W) mask is one image; a 2x2 checker shrinks to its mean under antialiasing
    checker = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(4, 4)
    small = LayerMasks(checker, (8, 8)).for_tokens(1)
    assert small.shape == (1, 1, 1) and small.item() == pytest.approx(0.5, abs=1e-6)


# ---------------------------------------------------------------- SAM prompts


def test_sam_prompts_from_ca_box_and_points():
    norm = np.zeros((8, 8), np.float32)
    mc = np.zeros((8, 8), bool)
    mc[2:6, 1:5] = True  # main blob: rows 2..5, cols 1..4
    mc[7, 7] = True  # speck, not in the largest component
    norm[2:6, 1:5] = 0.3
    norm[3, 2] = 1.0  # peak 1
    norm[5, 4] = 0.8  # peak 2 (corner of the blob)
    norm[2, 4] = 0.6  # peak 3
    norm[7, 7] = 0.9  # the speck's value is high but it is outside the blob
    box, pts = sam_prompts_from_ca(norm, mc, (80, 160))  # (H, W): sy = 10, sx = 20
    np.testing.assert_allclose(box, [1 * 20, 2 * 10, 5 * 20, 6 * 10])
    np.testing.assert_allclose(
        pts, [[2.5 * 20, 3.5 * 10], [4.5 * 20, 5.5 * 10], [4.5 * 20, 2.5 * 10]]
    )
    _, two = sam_prompts_from_ca(norm, mc, (80, 160), n_points=2)
    assert two.shape == (2, 2)


def test_sam_prompts_plateau_counts_once_and_empty_mask_raises():
    norm = np.zeros((5, 5), np.float32)
    mc = np.zeros((5, 5), bool)
    mc[1:4, 1:4] = True
    norm[1:4, 1:4] = 1.0  # one flat peak
    box, pts = sam_prompts_from_ca(norm, mc, (5, 5))
    np.testing.assert_allclose(box, [1, 1, 4, 4])
    np.testing.assert_allclose(pts, [[2.5, 2.5]])  # the plateau's centre cell
    with pytest.raises(ValueError):
        sam_prompts_from_ca(norm, np.zeros((5, 5), bool), (5, 5))


def test_defaults():
    assert masks.DEFAULT_CA_THRESHOLD == 0.1
    assert masks.DEFAULT_MIN_COMPONENT_FRACTION == 0.02
