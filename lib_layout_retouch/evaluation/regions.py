"""Each subject's region in a generated image, and the crop its identity is measured on.

Where the regions come from (several-subjects protocol):

- the extension's **regions picture**: with several subjects and show_intermediates the WebUI
  returns, per image, one drawn by `job.regions_to_image` (one colour per subject,
  `job.SUBJECT_COLOURS`, black where no subject is). The runner keeps it beside the image as
  `<image>.regions.png`; you may put your own there too (same colours). It is read back with
  `job.regions_from_image` after snapping each pixel to the nearest colour of the palette, so a
  lossy copy (a WebUI set to send JPEG) reads the same;
- else Segment-Anything prompted per subject with its class phrase (`SamSubjectMasker`): the
  baseline's images have no intermediates.

A subject whose region covers less than `MIN_REGION_AREA` of the image counts as missing there.

The crop (`region_crop`): the region's bounding box; "masked" (default) fills the pixels of the box
outside the region with grey, "bbox" keeps them. The box is then padded with grey to a square, so
the metrics' square resize keeps the subject's aspect.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..ui_text import INTERMEDIATE_KEY

REGIONS_SUFFIX = ".regions.png"
REGION_SOURCES = ("auto", "picture", "sam")  # --regions
DEFAULT_REGION_SOURCE = "auto"
CROP_MODES = ("masked", "bbox")  # --region-crop
DEFAULT_CROP_MODE = "masked"
CROP_FILL = (128, 128, 128)  # outside the region (masked) and the square's padding
MIN_REGION_AREA = 0.005  # a region under 0.5 % of the image is a speck: the subject is missing
# How far (largest channel difference) a pixel may be from a palette colour and still be read as
# it: JPEG at the WebUI's default quality stays well within this; the colours are ≥ 86 apart.
PALETTE_TOLERANCE = 40
# A picture is a regions picture when this share of its pixels is near a palette colour and at
# least one is near a subject's colour (a grey mask or a photo never is).
REGIONS_PICTURE_SHARE = 0.98
_LABEL = re.compile(re.escape(INTERMEDIATE_KEY) + r':\s*"?([^,\n"]*)')


def regions_path_for(image_path: str) -> str:
    """Where an image's regions picture is kept / looked up: `<stem>.regions.png` beside it."""
    return os.path.splitext(image_path)[0] + REGIONS_SUFFIX


def _palette() -> np.ndarray:
    """Black (no subject), then each subject's colour: index 0 is "none", k + 1 subject k."""
    from ..job import SUBJECT_COLOURS

    return np.array([(0, 0, 0), *SUBJECT_COLOURS], dtype=np.int16)


def _nearest_palette(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(palette index of each pixel's nearest colour, whether it is within PALETTE_TOLERANCE)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.int16)
    dist = np.abs(arr[:, :, None, :] - _palette()[None, None]).max(axis=-1)  # (H, W, 1 + K)
    return dist.argmin(axis=-1), dist.min(axis=-1) <= PALETTE_TOLERANCE


def snap_to_palette(image: Image.Image) -> Image.Image:
    """The picture with each pixel near a palette colour set to it exactly (others black)."""
    nearest, close = _nearest_palette(image)
    arr = _palette()[nearest].astype(np.uint8)
    arr[~close] = 0
    return Image.fromarray(arr, mode="RGB")


def looks_like_regions(image: Image.Image) -> bool:
    """Whether a picture is a regions picture (see REGIONS_PICTURE_SHARE)."""
    nearest, close = _nearest_palette(image)
    return bool(close.mean() >= REGIONS_PICTURE_SHARE and ((nearest > 0) & close).any())


def read_regions(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """A regions picture → subject index (H, W), -1 where no subject; resized (nearest) to `size`
    (W, H), the generated image's."""
    from ..job import regions_from_image

    snapped = snap_to_palette(image)
    if size is not None and snapped.size != tuple(size):
        snapped = snapped.resize(tuple(size), Image.NEAREST)
    return regions_from_image(snapped)


def intermediate_label(infotext: str) -> str:
    """The label an intermediate's infotext carries ("" for a generated image)."""
    found = _LABEL.search(infotext or "")
    return found.group(1).strip() if found else ""


def find_regions_picture(images: Sequence[Image.Image], infotexts: Sequence[str]) -> int | None:
    """Which of a reply's images (after the first, the result) is the first image's regions
    picture: those labelled as regions first, then any other; each must look like one."""
    extra = range(1, len(images))
    labelled = [
        i
        for i in extra
        if i < len(infotexts) and "region" in intermediate_label(str(infotexts[i])).lower()
    ]
    for i in labelled + [i for i in extra if i not in labelled]:
        if looks_like_regions(images[i]):
            return i
    return None


def subject_masks(index: np.ndarray, n_subjects: int) -> list[np.ndarray | None]:
    """Each subject's region (bool (H, W)) from a subject index, None where it is missing."""
    return [_kept(index == k) for k in range(n_subjects)]


def _kept(mask: np.ndarray | None) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    return mask if mask.mean() >= MIN_REGION_AREA else None


SamFn = Callable[[Image.Image, str], "np.ndarray | None"]


def image_regions(
    image_path: str,
    image: Image.Image,
    class_phrases: Sequence[str],
    sam: SamFn | None = None,
    source: str = DEFAULT_REGION_SOURCE,
) -> tuple[list[np.ndarray | None], str]:
    """(each subject's region or None, where they came from: "picture", "sam" or "none").

    "auto": the regions picture beside the image, else SAM; "picture": the picture only; "sam":
    SAM for every image (the same measurement for both methods)."""
    path = regions_path_for(image_path)
    if source != "sam" and os.path.isfile(path):
        with Image.open(path) as pic:
            index = read_regions(pic, size=image.size)
        return subject_masks(index, len(class_phrases)), "picture"
    if source != "picture" and sam is not None:
        return [_kept(sam(image, phrase)) for phrase in class_phrases], "sam"
    return [None] * len(class_phrases), "none"


def region_crop(image: Image.Image, mask: np.ndarray, mode: str = DEFAULT_CROP_MODE) -> Image.Image:
    """The region's bounding box (outside the region grey when "masked"), padded to a square."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    source = image.convert("RGB")
    if mode == "masked":
        grey = Image.new("RGB", source.size, CROP_FILL)
        source = Image.composite(source, grey, Image.fromarray(np.uint8(mask) * 255, mode="L"))
    box = source.crop((int(left), int(top), int(right), int(bottom)))
    side = max(box.size)
    square = Image.new("RGB", (side, side), CROP_FILL)
    square.paste(box, ((side - box.width) // 2, (side - box.height) // 2))
    return square
