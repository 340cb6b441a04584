from __future__ import annotations

import os
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.masks import cross_attention_mask
from lib_layout_retouch.segmentation import (
    SAM_BUILDERS,
    SubjectSegmenter,
    clear_sam_cache,
    load_sam,
    load_segmenter,
    sam_kind_from_filename,
)
from tests.fixtures.sam import build_tiny_sam
from tests.paths import DOG_PHOTO

DOG = str(DOG_PHOTO)


@pytest.fixture(autouse=True)
def tiny_kinds(monkeypatch):
    monkeypatch.setitem(SAM_BUILDERS, "tiny", partial(build_tiny_sam, 48))
    monkeypatch.setitem(SAM_BUILDERS, "tiny_wide", partial(build_tiny_sam, 64))
    clear_sam_cache()
    yield
    clear_sam_cache()


@pytest.fixture
def tiny_ckpt(tmp_path):
    path = tmp_path / "tiny_sam.pth"
    torch.save(build_tiny_sam(seed=0).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def dog():
    return np.asarray(Image.open(DOG).convert("RGB").resize((256, 256), Image.BICUBIC))


def ca_inputs():
    """A 16x16 attention map with a blob in the image centre (the dog) and a weak speck."""
    yy, xx = np.mgrid[0:16, 0:16]
    maps = np.exp(-((yy - 8.0) ** 2 + (xx - 7.0) ** 2) / 12.0)
    maps[1, 14] = 0.3
    return cross_attention_mask(torch.tensor(maps, dtype=torch.float32)[None], 0.1)


# ---------------------------------------------------------------- kinds from file names


@pytest.mark.parametrize(
    "name, kind",
    [
        ("sam_vit_b_01ec64.pth", "vit_b"),
        ("sam_vit_l_0b3195.pth", "vit_l"),
        ("sam_vit_h_4b8939.pth", "vit_h"),
        ("/models/sam/SAM_VIT_H_4B8939.PTH", "vit_h"),
    ],
)
def test_kind_from_official_filenames(name, kind):
    assert sam_kind_from_filename(name) == kind


@pytest.mark.parametrize(
    "name, family",
    [
        ("mobile_sam.pt", "MobileSAM"),
        ("sam_hq_vit_b.pth", "HQ-SAM"),
        ("sam2_hiera_large.pt", "SAM 2"),
        ("sam2.1_hiera_base_plus.pt", "SAM 2"),
    ],
)
def test_unsupported_variants_are_named(name, family):
    with pytest.raises(LayoutRetouchError) as e:
        sam_kind_from_filename(name)
    assert e.value.parameter == "sam_model"
    assert family in str(e.value) and "sam_vit_b_01ec64.pth" in str(e.value)


def test_filename_without_kind_is_an_error():
    with pytest.raises(LayoutRetouchError) as e:
        sam_kind_from_filename("segmenter.pth")
    assert e.value.parameter == "sam_model" and "vit_b" in str(e.value)


# ---------------------------------------------------------------- loading


def test_load_segmenter_none_means_no_sam():
    for p in (None, "", "  ", "none", "None"):
        assert load_segmenter(p) is None


def test_load_sam_weights_match_file(tiny_ckpt):
    sam = load_sam(tiny_ckpt, kind="tiny")
    ref = torch.load(tiny_ckpt, weights_only=True)
    got = sam.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not sam.training


def test_missing_and_corrupt_files_are_user_errors(tmp_path):
    with pytest.raises(LayoutRetouchError) as e:
        load_segmenter(str(tmp_path / "sam_vit_b_01ec64.pth"))
    assert e.value.parameter == "sam_model" and "does not exist" in str(e.value)

    bad = tmp_path / "sam_vit_b_01ec64.pth"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LayoutRetouchError) as e:
        load_segmenter(str(bad))
    assert e.value.parameter == "sam_model" and "is not a SAM checkpoint" in str(e.value)

    not_a_state_dict = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(LayoutRetouchError) as e:
        load_segmenter(str(not_a_state_dict))
    assert e.value.parameter == "sam_model" and "is not a SAM checkpoint" in str(e.value)


def test_pickled_objects_are_refused(tmp_path):
    # weights_only=True: a checkpoint that would run code on unpickling is rejected, not executed
    evil = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"w": torch.zeros(1), "obj": Image.new("RGB", (1, 1))}, evil)
    with pytest.raises(LayoutRetouchError) as e:
        load_segmenter(str(evil))
    assert "is not a SAM checkpoint" in str(e.value)


def test_state_dict_of_another_kind_names_file_and_kind(tiny_ckpt):
    with pytest.raises(LayoutRetouchError) as e:
        load_segmenter(tiny_ckpt, kind="tiny_wide")
    msg = str(e.value)
    assert e.value.parameter == "sam_model" and tiny_ckpt in msg and "'tiny_wide'" in msg
    with pytest.raises(LayoutRetouchError) as e:
        load_segmenter(tiny_ckpt, kind="vit_q")
    assert e.value.parameter == "sam_model"


def test_renamed_official_file_is_told_by_its_weights(tmp_path, monkeypatch):
    # a vit_b-shaped patch embedding in a file with no kind in its name -> vit_b builder is used
    built = []
    monkeypatch.setitem(SAM_BUILDERS, "vit_b", lambda: built.append("vit_b") or build_tiny_sam(48))
    sd = build_tiny_sam(48, seed=0).state_dict()
    path = tmp_path / "segmenter.pth"
    torch.save(sd, path)
    with pytest.raises(LayoutRetouchError) as e:  # embed dim 48 is no official kind
        load_sam(str(path))
    assert "not a Segment Anything ViT checkpoint" in str(e.value)
    sd["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)
    torch.save(sd, path)
    with pytest.raises(LayoutRetouchError):  # told vit_b, but the weights do not fit it
        load_sam(str(path))
    assert built == ["vit_b"]


def test_cache_keeps_one_model_until_the_file_changes(tiny_ckpt):
    a = load_segmenter(tiny_ckpt, kind="tiny")
    assert isinstance(a, SubjectSegmenter)
    assert load_segmenter(tiny_ckpt, kind="tiny") is a
    assert load_segmenter(tiny_ckpt, device=torch.device("cpu"), kind="tiny") is a

    torch.save(build_tiny_sam(seed=1).state_dict(), tiny_ckpt)
    st = os.stat(tiny_ckpt)
    os.utime(tiny_ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    b = load_segmenter(tiny_ckpt, kind="tiny")
    assert b is not a
    w = "mask_decoder.iou_prediction_head.layers.0.weight"
    assert not torch.equal(a.sam.state_dict()[w], b.sam.state_dict()[w])
    assert load_segmenter(tiny_ckpt, kind="tiny") is b
    clear_sam_cache()
    assert load_segmenter(tiny_ckpt, kind="tiny") is not b


# ---------------------------------------------------------------- segmentation


def test_segment_real_photo_is_deterministic(tiny_ckpt, dog):
    seg = load_segmenter(tiny_ckpt, kind="tiny")
    norm, mc = ca_inputs()
    m1 = seg.segment(dog, norm, mc)
    m2 = seg.segment(dog, norm, mc)
    assert m1.shape == (256, 256) and m1.dtype == bool
    assert 0 < m1.sum() < m1.size  # a real (random-weight) mask, not a constant
    assert np.array_equal(m1, m2)


def test_segment_prompts_and_picks_best_mask(tiny_ckpt, dog, monkeypatch):
    seg = load_segmenter(tiny_ckpt, kind="tiny")
    wide = np.ascontiguousarray(np.concatenate([dog, dog[:, :128]], axis=1))  # 256 x 384
    norm, mc = ca_inputs()
    calls = {}
    real_predict = seg.predictor.predict

    def spy(**kw):
        masks_, scores, low = real_predict(**kw)
        calls.update(kw, masks=masks_, scores=scores)
        return masks_, scores, low

    monkeypatch.setattr(seg.predictor, "predict", spy)
    out = seg.segment(wide, norm, mc)
    assert out.shape == (256, 384) and out.dtype == bool
    assert calls["multimask_output"] is True
    # box of the blob in image pixels, positive points inside it
    box, pts = calls["box"], calls["point_coords"]
    assert box.shape == (4,) and pts.ndim == 2 and 1 <= len(pts) <= 3
    assert (calls["point_labels"] == 1).all()
    assert box[0] < pts[:, 0].min() and pts[:, 0].max() < box[2]
    assert box[1] < pts[:, 1].min() and pts[:, 1].max() < box[3]
    assert box[2] <= 384 and box[3] <= 256
    # the speck at (1, 14) is outside the box
    assert not (box[0] <= 14.5 * 24 <= box[2] and box[1] <= 1.5 * 16 <= box[3])
    assert calls["masks"].shape == (3, 256, 384)
    assert np.array_equal(out, calls["masks"][int(np.argmax(calls["scores"]))])


def test_segment_empty_ca_mask_gives_empty_mask_without_running_sam(tiny_ckpt, dog, monkeypatch):
    seg = load_segmenter(tiny_ckpt, kind="tiny")
    monkeypatch.setattr(seg.predictor, "set_image", lambda *a, **k: pytest.fail("SAM ran"))
    out = seg.segment(dog, np.zeros((16, 16), np.float32), np.zeros((16, 16), bool))
    assert out.shape == (256, 256) and out.dtype == bool and not out.any()


def test_segment_rejects_non_rgb_uint8(tiny_ckpt, dog):
    seg = load_segmenter(tiny_ckpt, kind="tiny")
    norm, mc = ca_inputs()
    with pytest.raises(ValueError):
        seg.segment(dog.astype(np.float32), norm, mc)
    with pytest.raises(ValueError):
        seg.segment(dog[..., 0], norm, mc)
