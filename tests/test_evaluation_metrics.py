"""The paper's metric arithmetic on constructed cases, and the real architectures with tiny random weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.evaluation import metrics, models


def _noise_image(seed: int, size=(64, 48), mode="RGB") -> Image.Image:
    arr = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return models.build_random_clip(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def dino():
    return models.build_random_dino()


# ------------------------------------------------------------------------------- cosine arithmetic
def test_mean_cosine_identical_is_one_and_orthogonal_is_zero():
    e = torch.eye(4)
    assert metrics.mean_cosine(e[:1] * 3.0, e[:1]) == pytest.approx(1.0)  # scale does not matter
    assert metrics.mean_cosine(e[:1], e[1:2]) == pytest.approx(0.0)
    assert metrics.mean_cosine(e[:1], -e[:1]) == pytest.approx(-1.0)


def test_mean_cosine_averages_the_full_reference_by_generated_matrix():
    # DreamMatcher: (src @ gen.T).mean(), every reference against every generated image, not a diagonal.
    refs = np.array([[1.0, 0.0], [0.0, 1.0]])
    gens = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    expected = np.mean([1, 1, 1 / math.sqrt(2), 0, 0, 1 / math.sqrt(2)])
    assert metrics.mean_cosine(refs, gens) == pytest.approx(expected)
    assert math.isnan(metrics.mean_cosine(np.zeros((0, 2)), gens))
    with pytest.raises(ValueError):
        metrics.mean_cosine(np.ones((1, 3)), gens)


def test_tclip_text_modes():
    assert metrics.tclip_text("a {} in the jungle", "dog", "class") == "a dog in the jungle"
    assert (
        metrics.tclip_text("a {} in the jungle", "red vase", "class") == "a red vase in the jungle"
    )
    # DreamMatcher's evaluate.py hands CLIP the prompt-list line itself: the placeholder stays.
    assert metrics.tclip_text("a {} in the jungle", "dog", "keep") == "a {} in the jungle"
    with pytest.raises(LayoutRetouchError):
        metrics.tclip_text("a {}", "dog", "token")


# ------------------------------------------------------------------------------- inception score
def test_inception_score_uniform_classifier_is_one():
    probs = np.full((20, 10), 0.1)
    mean, std = metrics.inception_score(probs, splits=1)
    assert mean == pytest.approx(1.0)
    assert std == pytest.approx(0.0)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_inception_score_peaked_evenly_over_k_classes_is_k(k):
    n_classes, per_class = 1000, 4
    probs = np.zeros((k * per_class, n_classes))
    for i in range(k * per_class):
        probs[i, i % k] = 1.0
    assert metrics.inception_score(probs, splits=1)[0] == pytest.approx(k)
    # Splits of 2k consecutive images each still see all k classes evenly.
    assert metrics.inception_score(probs, splits=2)[0] == pytest.approx(k)


def test_inception_score_of_soft_predictions_matches_the_formula():
    rng = np.random.RandomState(0)
    p = rng.dirichlet(np.ones(6), size=12)
    py = p.mean(0)
    expected = math.exp(np.mean(np.sum(p * (np.log(p) - np.log(py)), axis=1)))
    assert metrics.inception_score(p, splits=1)[0] == pytest.approx(expected)
    two = [
        math.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), axis=1)))
        for q in (p[:6], p[6:])
    ]
    assert metrics.inception_score(p, splits=2) == pytest.approx((np.mean(two), np.std(two)))


def test_inception_score_splits_follow_openai_when_n_is_not_a_multiple():
    """n=10 in 3 splits: OpenAI's inception_score.py cuts at i*n//3 -> rows [0,3), [3,6), [6,10).
    One-hot predictions, classes 0,0,1 | 1,2,3 | 4,5,6,7. A split of one-hot rows scores
    exp(mean_x -log p(y_x)): (0,0,1) -> p(y) = (2/3, 1/3) -> exp((2 log 1.5 + log 3)/3) = 6.75^(1/3);
    three distinct classes -> 3; four -> 4. (np.array_split's 4,3,3 would give 2, 3, 3; torch.chunk's
    4,4,2 would give 2, 4, 2.)"""
    probs = np.zeros((10, 8))
    probs[np.arange(10), [0, 0, 1, 1, 2, 3, 4, 5, 6, 7]] = 1.0
    per_split = [6.75 ** (1 / 3), 3.0, 4.0]
    mean = (6.75 ** (1 / 3) + 3.0 + 4.0) / 3  # 2.963293858...
    std = math.sqrt(
        sum((v - mean) ** 2 for v in per_split) / 3
    )  # ddof=0, as np.std there: 0.86184...
    assert metrics.inception_score(probs, splits=3) == pytest.approx((mean, std), abs=1e-12)
    assert (round(mean, 6), round(std, 6)) == (2.963294, 0.861843)


def test_inception_score_split_count_is_clamped_for_small_sets():
    assert metrics.effective_splits(400, 10) == 10
    assert metrics.effective_splits(8, 10) == 4
    assert metrics.effective_splits(3, 10) == 1
    assert metrics.effective_splits(0, 10) == 0
    # One image per split would score exactly 1 whatever the images: never do that.
    probs = np.eye(4)
    assert metrics.inception_score(probs, splits=10)[0] == pytest.approx(
        2.0
    )  # 2 splits of 2 distinct classes
    with pytest.raises(ValueError):
        metrics.inception_score(np.ones((2, 3)), splits=1)  # rows do not sum to 1


def test_random_inception_gives_probabilities_and_a_score_in_range():
    inc = models.build_random_inception(input_size=75)
    imgs = [_noise_image(i, size=(40 + 7 * i, 30)) for i in range(4)]
    p = inc.probs(imgs)
    assert p.shape == (4, 1000)
    assert np.allclose(p.sum(1), 1.0)  # 1000 fp32 terms: ~eps·sqrt(1000) = 4e-6, within rtol 1e-5
    is_mean, _ = metrics.inception_score(p, splits=1)
    # exp(mean KL) lies in [1, number of images]; the bounds get float64 rounding room (one
    # image set gave 1 - 1.1e-16 on one CPU)
    assert 1.0 - 1e-9 <= is_mean <= 4.0 + 1e-9
    # deterministic in eval mode; another batch size only rounds differently: probabilities of a
    # random net are ~1e-3 (near uniform), so 1e-6 leaves ~8000 fp32 eps of room
    assert np.allclose(inc.probs(imgs[:1]), p[:1], atol=1e-6)


# ------------------------------------------------------------------------------ embedders (random)
def test_clip_identical_images_score_one_different_images_less(clip):
    a, b = _noise_image(0), _noise_image(1)
    ea, eb = clip.embed_images([a]), clip.embed_images([b])
    assert torch.allclose(ea.norm(dim=-1), torch.ones(1))
    # the cosine of a unit 16-vector with itself: 16 roundings of ≤ eps/2 each, ≤ 9.5e-7 < 1e-6
    assert metrics.mean_cosine(ea, clip.embed_images([a.copy()])) == pytest.approx(1.0, abs=1e-6)
    assert metrics.mean_cosine(ea, eb) < 0.9999  # the test above is not vacuous


def test_clip_image_embedding_ignores_mode_but_not_content(clip):
    a = _noise_image(3)
    same = clip.embed_images(
        [a, a.convert("RGBA"), a.convert("P", palette=Image.ADAPTIVE, colors=256)]
    )
    assert metrics.mean_cosine(same[:1], same[1:2]) == pytest.approx(
        1.0, abs=1e-6
    )  # RGBA -> RGB is lossless
    assert same.shape == (3, 16)


def test_clip_text_embeddings_tclip_modes_differ(clip):
    texts = [metrics.tclip_text("a {} in the jungle", "dog", m) for m in metrics.TCLIP_MODES]
    emb = clip.embed_texts(texts + texts[:1])
    assert emb.shape == (3, 16)
    assert metrics.mean_cosine(emb[0:1], emb[2:3]) == pytest.approx(1.0, abs=1e-6)
    assert metrics.mean_cosine(emb[0:1], emb[1:2]) < 0.9999
    # T_CLIP is the same cosine arithmetic between text and image embeddings.
    img = clip.embed_images([_noise_image(5)])
    t = metrics.mean_cosine(emb[:1], img)
    assert t == pytest.approx(float(emb[0] @ img[0]), abs=1e-6)


def test_tiny_tokenizer_round_trips_and_ends_with_endoftext(clip):
    tok = clip.tokenizer
    ids = tok("a {} in the jungle")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|startoftext|>")
    assert (
        ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>") == len(tok) - 1
    )  # argmax pooling finds it
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "a{}inthejungle"


@pytest.mark.parametrize("preprocess", ["dreammatcher", "imagenet"])
def test_dino_identical_images_score_one_and_any_size_works(preprocess):
    dino = models.build_random_dino(preprocess=preprocess)
    a, b = _noise_image(0, size=(300, 17)), _noise_image(1, size=(5, 5))
    e = dino.embed_images([a, a.copy(), b])
    assert e.shape == (3, 32)
    assert metrics.mean_cosine(e[0:1], e[1:2]) == pytest.approx(1.0, abs=1e-6)
    assert metrics.mean_cosine(e[0:1], e[2:3]) < 0.9999


def test_dino_preprocessing_follows_dreammatcher(dino):
    img = Image.new("RGB", (100, 60), (255, 0, 128))
    x = dino.preprocess([img])
    assert x.shape == (
        1,
        3,
        256,
        256,
    )  # squashed to 256x256, then fed at 256 with interpolated positions
    assert torch.allclose(
        x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1.0]), atol=1e-6
    )  # [-1, 1], no ImageNet norm
    imagenet = models.build_random_dino(preprocess="imagenet").preprocess([img])
    assert imagenet.shape == (1, 3, 32, 32)  # tiny model: crop to its own input size
    assert imagenet[0, 0, 0, 0].item() == pytest.approx((1.0 - 0.485) / 0.229, abs=1e-5)
    with pytest.raises(LayoutRetouchError):
        models.build_random_dino(preprocess="clip")


def test_clip_preprocessing_normalises_with_clip_statistics(clip):
    x = clip.preprocess([Image.new("RGB", (70, 30), (0, 0, 0))])
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(
        x[0, :, 5, 5], -torch.tensor(models.CLIP_MEAN) / torch.tensor(models.CLIP_STD), atol=1e-4
    )


def _columns_image(white_columns) -> Image.Image:
    """256x256 (the eval size: no PIL resize happens), black with white columns."""
    arr = np.zeros((256, 256, 3), dtype=np.uint8)
    arr[:, list(white_columns)] = 255
    return Image.fromarray(arr, "RGB")


def test_clip_resize_defaults_to_dreammatchers_bicubic_without_antialiasing(clip):
    """256 -> 32 (the tiny CLIP's input) without antialiasing, as torchvision 0.14's tensor Resize: output
    column j samples x = 8j + 3.5 from source columns 8j+2..8j+5 with the cubic kernel (a = -0.75) at
    distances 1.5, 0.5, 0.5, 1.5: weights -0.09375, 0.59375, 0.59375, -0.09375. A white column 3 gives
    0.59375 at output column 0; a white column 13 (distance 1.5 from 11.5) gives -0.09375 at column 1,
    not clamped; column 2 sees neither."""
    assert clip.resize == "dreammatcher" == models.DEFAULT_CLIP_RESIZE
    x = clip.preprocess([_columns_image([3, 13])])
    mean, std = torch.tensor(models.CLIP_MEAN).view(3, 1), torch.tensor(models.CLIP_STD).view(3, 1)
    unit = x[0] * std.view(3, 1, 1) + mean.view(3, 1, 1)  # back to [0, 1]
    assert unit.shape == (3, 32, 32)
    assert torch.allclose(unit[:, :, 0], torch.full((3, 32), 0.59375), atol=1e-6)
    assert torch.allclose(unit[:, :, 1], torch.full((3, 32), -0.09375), atol=1e-6)
    assert torch.allclose(unit[:, :, 2:], torch.zeros(3, 32, 30), atol=1e-6)


def test_clip_resize_antialias_is_the_option_and_matches_pils_bicubic(clip, tmp_path):
    aa = models.ClipEmbedder(clip.model, clip.tokenizer, resize="antialias")
    img = _columns_image([3, 13])
    x = aa.preprocess([img])[0, 0] * models.CLIP_STD[0] + models.CLIP_MEAN[0]
    # PIL's bicubic (a = -0.5, support widened by the scale) on the same [0, 1] plane: the antialiased arithmetic
    plane = Image.fromarray(np.asarray(img, dtype=np.float32)[:, :, 0] / 255.0, "F").resize(
        (32, 32), Image.BICUBIC
    )
    assert torch.allclose(x, torch.from_numpy(np.asarray(plane)), atol=1e-5)
    assert abs(float(x[0, 0]) - 0.59375) > 0.3  # the two resizes really differ
    with pytest.raises(LayoutRetouchError) as err:
        models.ClipEmbedder(clip.model, clip.tokenizer, resize="bilinear")
    assert err.value.parameter == "clip_resize"


def test_load_image_handles_odd_modes_and_reports_broken_files(tmp_path):
    arr16 = np.arange(12 * 7, dtype=np.uint16).reshape(7, 12) * 700
    Image.fromarray(arr16).save(tmp_path / "deep.png")
    img = models.load_image(tmp_path / "deep.png")
    assert img.mode == "RGB" and img.size == (12, 7)
    assert np.asarray(img)[..., 0].max() > 200  # rescaled, not clipped to all-white
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(LayoutRetouchError, match="broken.png"):
        models.load_image(tmp_path / "broken.png")
    with pytest.raises(LayoutRetouchError, match="not found"):
        models.load_image(tmp_path / "missing.png")


def test_loaders_give_clear_messages_offline(tmp_path):
    with pytest.raises(LayoutRetouchError, match="--clip"):
        models.load_clip(str(tmp_path / "no_such_clip"))
    with pytest.raises(LayoutRetouchError, match="does not exist"):
        models.load_dino(str(tmp_path / "no_such_dino"))
    with pytest.raises(LayoutRetouchError, match="--inception"):
        models.load_inception(str(tmp_path / "missing.pth"))
    empty = tmp_path / "empty_clip"
    empty.mkdir()
    with pytest.raises(LayoutRetouchError, match="Could not load CLIP"):
        models.load_clip(str(empty))


def test_saved_random_models_load_back_from_a_local_folder(tmp_path, clip, dino):
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    dino.model.save_pretrained(tmp_path / "dino")
    img = _noise_image(9)
    loaded_clip = models.load_clip(str(tmp_path / "clip"), device="cpu")
    loaded_dino = models.load_dino(str(tmp_path / "dino"), device="cpu")
    # the same weights and the same batch: the same operations (1e-5 ≫ any rounding of |e| ≤ 1)
    assert torch.allclose(loaded_clip.embed_images([img]), clip.embed_images([img]), atol=1e-5)
    assert torch.allclose(
        loaded_clip.embed_texts(["a dog"]), clip.embed_texts(["a dog"]), atol=1e-5
    )
    assert torch.allclose(loaded_dino.embed_images([img]), dino.embed_images([img]), atol=1e-5)


def test_image_reward_is_optional():
    scorer, reason = models.load_image_reward()
    try:
        import ImageReward  # noqa: F401
    except Exception:
        assert scorer is None
        assert "pip install image-reward" in reason
        with pytest.raises(LayoutRetouchError, match="image-reward"):
            models.load_image_reward(required=True)
    else:  # installed: loading may still fail offline, but never silently
        assert (scorer is None) == bool(reason), (scorer, reason)  # a scorer, or else a reason


def test_fmt_and_nanmean():
    assert metrics.fmt(float("nan")) == "n/a"
    assert metrics.fmt(0.12345) == "0.123"
    assert metrics.nanmean([1.0, float("nan"), 3.0]) == 2.0
    assert math.isnan(metrics.nanmean([]))


def test_image_reward_wrapper_always_returns_a_list_of_floats():
    class FakeModel:  # ImageReward's `score` returns a float for one image, a list for several
        def score(self, prompt, images):
            vals = [float(len(prompt)) + i for i in range(len(images))]
            return vals[0] if len(vals) == 1 else vals

    scorer = models.ImageRewardScorer(FakeModel())
    img = Image.new("RGB", (8, 8))
    assert scorer("abc", [img]) == [3.0]
    assert scorer("abc", [img, img]) == [3.0, 4.0]
