"""Layout diversity: centre points, σ²_avg (paper Fig. 1), heat maps, subject masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.evaluation import diversity


def _box_mask(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_full_mask_is_centred_whatever_the_size():
    for h, w in ((1, 1), (7, 13), (64, 48)):
        assert diversity.mask_centre(np.ones((h, w)), "bbox") == pytest.approx((0.5, 0.5))
        assert diversity.mask_centre(np.ones((h, w)), "centroid") == pytest.approx((0.5, 0.5))


def test_bbox_centre_and_centroid_of_known_masks():
    m = _box_mask(100, 200, 20, 10, 60, 30)  # x in [20, 60), y in [10, 30)
    assert diversity.mask_centre(m, "bbox") == pytest.approx((40 / 200, 20 / 100))
    assert diversity.mask_centre(m, "centroid") == pytest.approx((40 / 200, 20 / 100))
    # An L shape: the box centre and the centre of mass differ, in a known way.
    l_shape = _box_mask(10, 10, 0, 0, 10, 1) | _box_mask(10, 10, 0, 0, 1, 10)
    assert diversity.mask_centre(l_shape, "bbox") == pytest.approx((0.5, 0.5))
    ys, xs = np.nonzero(l_shape)
    assert diversity.mask_centre(l_shape, "centroid") == pytest.approx(
        ((xs.mean() + 0.5) / 10, (ys.mean() + 0.5) / 10)
    )
    assert diversity.mask_centre(np.zeros((5, 5)), "bbox") is None
    with pytest.raises(LayoutRetouchError):
        diversity.mask_centre(m, "peak")


def test_sigma2_avg_of_known_points():
    # x: 0.25, 0.75 -> Var 0.0625; y constant -> 0.  σ²_avg = (0.0625 + 0) / 2
    assert diversity.sigma2_avg([(0.25, 0.5), (0.75, 0.5)]) == pytest.approx(0.03125)
    # four corners of a square of side 0.5 around the centre: Var x = Var y = 0.0625
    pts = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    assert diversity.sigma2_avg(pts) == pytest.approx(0.0625)
    assert diversity.sigma2_avg([(0.3, 0.6)] * 5) == pytest.approx(0.0)
    rng = np.random.RandomState(0)
    p = rng.rand(50, 2)
    assert diversity.sigma2_avg(p) == pytest.approx((np.var(p[:, 0]) + np.var(p[:, 1])) / 2)
    assert math.isnan(diversity.sigma2_avg([]))


def test_heatmap_peaks_at_the_points_and_is_max_normalised():
    heat = diversity.centre_heatmap([(0.25, 0.75)], size=64, sigma=0.05)
    assert heat.max() == pytest.approx(1.0)
    iy, ix = np.unravel_index(np.argmax(heat), heat.shape)
    assert (ix, iy) in {(15, 47), (16, 48), (15, 48), (16, 47)}  # x right, y down
    assert heat[5, 60] < 1e-6  # far from the point
    two = diversity.centre_heatmap([(0.2, 0.5), (0.2, 0.5), (0.8, 0.5)], size=50, sigma=0.05)
    assert two[25, 10] == pytest.approx(1.0, abs=0.02) and two[25, 40] == pytest.approx(
        0.5, abs=0.02
    )
    assert not diversity.centre_heatmap([], size=8).any()


def test_heatmap_png_is_written(tmp_path):
    path = diversity.save_heatmap_png(
        [(0.5, 0.5), (0.5, 0.5), (0.1, 0.9)], tmp_path / "h" / "m.png", title="test", size=64
    )
    with Image.open(path) as im:
        assert im.size == (64, 64 + 34) and im.mode == "RGB"
        px = np.asarray(im)
    assert px[:64, :64].mean() > 0  # coloured map
    lum = px[:64, :64].astype(float) @ [0.299, 0.587, 0.114]
    iy, ix = np.unravel_index(np.argmax(lum), lum.shape)
    assert (
        abs(ix - 31.5) <= 1 and abs(iy - 31.5) <= 1
    )  # the brightest spot is at the (0.5, 0.5) point
    top = np.asarray(diversity.colorize(np.ones((1, 1))), dtype=float)[0, 0]
    assert np.abs(px[iy, ix] - top).max() <= 25


def test_colorize_is_monotone_in_brightness():
    ramp = np.asarray(diversity.colorize(np.linspace(0, 1, 32)[None, :]), dtype=float)[0]
    lum = ramp @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lum) > -1.0)
    assert lum[-1] > lum[0] + 200


def test_mask_png_beside_the_image_is_used(tmp_path):
    img_path = tmp_path / "p00_s0.png"
    Image.new("RGB", (40, 20)).save(img_path)
    m = np.zeros((10, 20), np.uint8)
    m[:, 10:] = 255  # right half, at half resolution: resized to the image
    Image.fromarray(m).save(diversity.mask_path_for(str(img_path)))
    mask, source = diversity.subject_mask(str(img_path), Image.open(img_path), "dog")
    assert source == "png" and mask.shape == (20, 40)
    assert diversity.mask_centre(mask) == pytest.approx((0.75, 0.5))
    # An RGBA cut-out: alpha is the mask.
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[:10, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(diversity.mask_path_for(str(img_path)))
    mask, _ = diversity.subject_mask(str(img_path), Image.open(img_path), "dog")
    assert diversity.mask_centre(mask) == pytest.approx((0.5, 0.25))
    none, source = diversity.subject_mask(str(tmp_path / "other.png"), Image.open(img_path), "dog")
    assert none is None and source == "none"


class _FakeGenerator:
    """SamAutomaticMaskGenerator's output format: dicts with segmentation, bbox (XYWH), predicted_iou."""

    def __init__(self, props):
        self.props = props

    def generate(self, rgb):
        return self.props


def _prop(h, w, x0, y0, x1, y1, iou):
    return {
        "segmentation": _box_mask(h, w, x0, y0, x1, y1),
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "predicted_iou": iou,
        "area": (x1 - x0) * (y1 - y0),
    }


def test_sam_masker_picks_the_subject_and_ignores_specks_and_background():
    h, w = 100, 100
    props = [
        _prop(h, w, 0, 0, 100, 100, 0.99),  # whole image: background, ignored
        _prop(h, w, 0, 0, 2, 2, 0.98),  # speck, ignored
        _prop(h, w, 10, 10, 40, 40, 0.90),
        _prop(h, w, 50, 50, 90, 90, 0.95),
    ]
    masker = diversity.SamSubjectMasker(_FakeGenerator(props))
    mask = masker(Image.new("RGB", (w, h)), "dog")
    assert diversity.mask_centre(mask) == pytest.approx((0.7, 0.7))
    assert (
        diversity.SamSubjectMasker(_FakeGenerator(props[:2]))(Image.new("RGB", (w, h)), "dog")
        is None
    )


def test_sam_masker_with_clip_picks_the_crop_closest_to_the_class_text(tmp_path):
    from lib_layout_retouch.evaluation import models

    clip = models.build_random_clip(tmp_path / "tok")
    h, w = 64, 64
    rng = np.random.RandomState(0)
    img = Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
    props = [
        _prop(h, w, 0, 0, 30, 30, 0.5),
        _prop(h, w, 30, 30, 64, 64, 0.6),
        _prop(h, w, 0, 34, 30, 64, 0.7),
    ]
    text = clip.embed_texts(["a photo of a dog"])
    crops = [
        img.crop(
            (p["bbox"][0], p["bbox"][1], p["bbox"][0] + p["bbox"][2], p["bbox"][1] + p["bbox"][3])
        )
        for p in props
    ]
    best = int(np.argmax((clip.embed_images(crops) @ text.T).squeeze(1).numpy()))
    mask = diversity.SamSubjectMasker(_FakeGenerator(props), clip=clip)(img, "dog")
    assert np.array_equal(mask, props[best]["segmentation"])


def test_real_sam_architecture_tiny_random_gives_an_image_sized_mask_or_none():
    generator = diversity.build_random_sam()
    masker = diversity.SamSubjectMasker(generator, min_area=0.0, max_area=1.0)
    img = Image.fromarray((np.random.RandomState(1).rand(48, 80, 3) * 255).astype(np.uint8))
    mask = masker(img, "dog")
    assert mask is not None, "this seed's random SAM proposes regions: the masker must pick one"
    assert mask.shape == (48, 80) and mask.dtype == bool and 0 < mask.sum() < 48 * 80
    raw = generator.generate(np.asarray(img))
    assert raw and raw[0]["segmentation"].shape == (48, 80)  # the plumbing really ran


def test_sam_checkpoint_is_read_by_the_extensions_safe_loader(tmp_path, monkeypatch):
    """The scoring's SAM goes through segmentation.load_sam (weights_only): the file's weights are
    loaded into the kind's architecture, and a pickled object is refused, not unpickled."""
    import torch

    from lib_layout_retouch import segmentation

    monkeypatch.setitem(
        segmentation.SAM_BUILDERS,
        "tiny",
        lambda: diversity.build_random_sam(seed=0).predictor.model,
    )
    saved = diversity.build_random_sam(seed=1).predictor.model.state_dict()
    path = tmp_path / "tiny_sam.pth"
    torch.save(saved, path)
    masker = diversity.SamSubjectMasker.from_checkpoint(str(path), "tiny", device="cpu")
    loaded = masker.generator.predictor.model.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not all(
        torch.equal(v, diversity.build_random_sam(seed=0).predictor.model.state_dict()[k])
        for k, v in saved.items()
    )  # seed 1's weights, not the builder's own
    evil = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"w": torch.zeros(1), "obj": Image.new("RGB", (1, 1))}, evil)
    with pytest.raises(LayoutRetouchError, match="is not a SAM checkpoint") as e:
        diversity.SamSubjectMasker.from_checkpoint(str(evil))
    assert e.value.parameter == "sam"


def test_sam_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(LayoutRetouchError, match="does not exist"):
        diversity.SamSubjectMasker.from_checkpoint(str(tmp_path / "sam_vit_b.pth"))
    (tmp_path / "weights.pth").write_bytes(b"")
    with pytest.raises(LayoutRetouchError, match="--sam-type"):
        diversity.SamSubjectMasker.from_checkpoint(str(tmp_path / "weights.pth"))
