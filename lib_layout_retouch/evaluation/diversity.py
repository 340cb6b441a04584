"""Layout diversity: subject centre points, their averaged variance σ²_avg, and Fig. 1's heat map.

The paper (Fig. 1 caption): "For each subject, we locate the bounding box of an object. We then
compute the 2D center-point distribution by fitting Gaussian distributions to each center point,
with the mean being the center point itself and the variance fixed, and then normalize all
distributions. [...] σ²_avg denotes the averaged variances of 2D center points."

So, with centre points c_n = (x_n, y_n) in [0, 1]² (x to the right, y down, image coordinates):

    σ²_avg = ( Var_n(x_n) + Var_n(y_n) ) / 2          (population variances, ddof = 0)

computed per concept; tables report the mean over concepts. The centre of a subject is the centre of
its mask's bounding box by default (the paper's "bounding box"); `mode="centroid"` uses the mask's
centre of mass instead. The heat map is the sum of isotropic Gaussians N(c_n, s²·I) (s fixed,
default 0.05 of the image side) on the unit square, scaled to a maximum of 1.

A subject mask per image comes from a mask PNG saved beside it (`<image stem>.mask.png`, e.g. the
pipeline's own mask) or from Segment-Anything (`SamSubjectMasker`).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import LayoutRetouchError

CENTRE_MODES = ("bbox", "centroid")
DEFAULT_HEATMAP_SIGMA = 0.05
MASK_SUFFIX = ".mask.png"


def mask_centre(mask, mode: str = "bbox") -> tuple[float, float] | None:
    """Centre (x, y) of a boolean mask (H, W), normalised to [0, 1]² by pixel centres; None if empty.

    Pixel (i, j) covers [j, j+1) x [i, i+1), so its centre is ((j + .5)/W, (i + .5)/H): a full mask
    is centred at (0.5, 0.5) whatever the size.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if xs.size == 0:
        return None
    h, w = m.shape
    if mode == "bbox":
        cx, cy = (xs.min() + xs.max() + 1) / 2.0, (ys.min() + ys.max() + 1) / 2.0
    elif mode == "centroid":
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    else:
        raise LayoutRetouchError(
            f"Unknown centre mode '{mode}'; use one of {CENTRE_MODES}.", parameter="centre"
        )
    return float(cx / w), float(cy / h)


def sigma2_avg(points: Sequence[Sequence[float]]) -> float:
    """(Var(x) + Var(y)) / 2 over the centre points (population variance); NaN for no points."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if p.shape[0] == 0:
        return float("nan")
    return float(p.var(axis=0, ddof=0).mean())


def centre_heatmap(
    points: Sequence[Sequence[float]], size: int = 256, sigma: float = DEFAULT_HEATMAP_SIGMA
) -> np.ndarray:
    """(size, size) array in [0, 1]: sum of fixed-variance Gaussians at the points, max-normalised."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    grid = (np.arange(size) + 0.5) / size
    heat = np.zeros((size, size))
    for x, y in p:
        gx = np.exp(-((grid - x) ** 2) / (2 * sigma**2))
        gy = np.exp(-((grid - y) ** 2) / (2 * sigma**2))
        heat += np.outer(gy, gx)  # rows are y (down), columns x
    top = heat.max(initial=0.0)
    return heat / top if top > 0 else heat


# A perceptual dark-to-bright colour ramp (inferno-like anchors), so no plotting library is needed.
_RAMP = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


def colorize(heat: np.ndarray) -> Image.Image:
    """Map [0, 1] values through the colour ramp to an RGB image."""
    t = np.clip(np.asarray(heat, dtype=np.float64), 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    return Image.fromarray(np.round(rgb).astype(np.uint8), "RGB")


def save_heatmap_png(
    points: Sequence[Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
    size: int = 256,
    sigma: float = DEFAULT_HEATMAP_SIGMA,
) -> str:
    """Write the heat map with a caption strip (title, n, σ²_avg) below it; returns the path."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    img = colorize(centre_heatmap(pts, size=size, sigma=sigma))
    canvas = Image.new("RGB", (size, size + 34), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    s2 = sigma2_avg(pts)
    caption2 = f"n={len(pts)}  sigma2_avg=" + ("n/a" if not math.isfinite(s2) else f"{s2:.4f}")
    draw.text((4, size + 3), title[:48], fill=(0, 0, 0))
    draw.text((4, size + 18), caption2, fill=(0, 0, 0))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


# ------------------------------------------------------------------------------------------ masks
def mask_path_for(image_path: str) -> str:
    """Where a mask for `image_path` is looked up: `<stem>.mask.png` beside it."""
    return os.path.splitext(image_path)[0] + MASK_SUFFIX


def load_mask_png(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask PNG as a bool array (foreground = brighter than half); resized (nearest) to `size`=(W, H)."""
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA"):  # a transparent cut-out: alpha is the mask
                m = im.getchannel("A")
            else:
                m = im.convert("L")
    except (OSError, ValueError) as e:
        raise LayoutRetouchError(
            f"Cannot read mask {path} ({e}). Replace or delete it.", parameter="mask"
        ) from None
    if size is not None and m.size != tuple(size):
        m = m.resize(tuple(size), Image.NEAREST)
    return np.asarray(m) > 127


class SamSubjectMasker:
    """The subject's mask in an image from Segment-Anything's automatic masks.

    SAM proposes masks for everything; the subject is the proposal whose bounding-box crop CLIP finds
    closest to "a photo of a <class>" (when a `ClipEmbedder` is given), else the proposal with the
    best predicted IoU. Proposals covering under 0.5 % or over 90 % of the image are ignored
    (specks, background).
    """

    def __init__(self, generator, clip=None, min_area: float = 0.005, max_area: float = 0.9):
        self.generator = generator
        self.clip = clip
        self.min_area = min_area
        self.max_area = max_area

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        model_type: str | None = None,
        device: str | None = None,
        clip=None,
        points_per_side: int = 16,
    ) -> "SamSubjectMasker":
        """SAM's automatic mask generator over `checkpoint`, read by the extension's one SAM loader
        (`segmentation.load_sam`: weights only, never segment-anything's own unpickling loader)."""
        try:
            from segment_anything import SamAutomaticMaskGenerator
        except ImportError:
            raise LayoutRetouchError(
                "segment_anything is not installed: pip install segment-anything==1.0",
                parameter="sam",
            ) from None
        from ..segmentation import load_sam
        from .models import resolve_device

        try:
            sam = load_sam(checkpoint, model_type, resolve_device(device))
        except LayoutRetouchError as e:  # named for the CLI: --sam FILE, --sam-type KIND
            raise LayoutRetouchError(
                f"{e} (scoring: --sam is the checkpoint; --sam-type vit_h|vit_l|vit_b its kind, "
                "when the file name does not say it)",
                parameter="sam",
            ) from None
        return cls(SamAutomaticMaskGenerator(sam, points_per_side=points_per_side), clip=clip)

    def __call__(self, image: Image.Image, class_phrase: str = "") -> np.ndarray | None:
        rgb = np.asarray(image.convert("RGB"))
        h, w = rgb.shape[:2]
        props = [
            p
            for p in self.generator.generate(rgb)
            if self.min_area * h * w
            <= int(np.asarray(p["segmentation"]).sum())
            <= self.max_area * h * w
        ]
        if not props:
            return None
        if self.clip is not None and class_phrase:
            crops = []
            for p in props:
                x, y, bw, bh = (int(round(v)) for v in p["bbox"])
                crops.append(image.crop((x, y, x + max(bw, 1), y + max(bh, 1))))
            text = self.clip.embed_texts([f"a photo of a {class_phrase}"])
            scores = (self.clip.embed_images(crops) @ text.T).squeeze(1).tolist()
        else:
            scores = [float(p.get("predicted_iou", 0.0)) for p in props]
        best = int(np.argmax(scores))
        return np.asarray(props[best]["segmentation"]).astype(bool)


def build_random_sam(seed: int = 0, img_size: int = 64, points_per_side: int = 4):
    """Segment-Anything's architecture, tiny and random, in an automatic mask generator (tests only).

    Quality thresholds are off: random weights never pass SAM's default IoU/stability filters.
    """
    from functools import partial

    import torch
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    dim, patch = 32, 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=dim,
            depth=1,
            num_heads=2,
            mlp_ratio=2,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img_size // patch, img_size // patch),
            input_image_size=(img_size, img_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=16,
        ),
    ).eval()
    return SamAutomaticMaskGenerator(
        sam,
        points_per_side=points_per_side,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
    )


MaskFn = Callable[[str, Image.Image, str], "np.ndarray | None"]


def subject_mask(
    image_path: str, image: Image.Image, class_phrase: str, sam: SamSubjectMasker | None = None
) -> tuple[np.ndarray | None, str]:
    """(mask, source): a saved `<stem>.mask.png` first, else SAM, else (None, "none")."""
    mp = mask_path_for(image_path)
    if os.path.isfile(mp):
        return load_mask_png(mp, size=image.size), "png"
    if sam is not None:
        return sam(image, class_phrase), "sam"
    return None, "none"
