"""The reference photo `I_r`, as it arrives from the UI or the API, made ready for the model.

`decode_image` accepts what Gradio and API clients send (PIL image, numpy array, image-file bytes,
base64 text, Gradio's ``{"image": ...}`` dict). A string is only ever base64: a filesystem path sent
through the API is refused, never opened.

`prepare_reference` turns it into an RGB image of exactly the generation size and says, in short
notes for the user/infotext, what it had to fix (orientation, transparency, bit depth, crop).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import LayoutRetouchError

# Images with a longer side are reduced while decoding (JPEG draft / integer `reduce`) before any
# other work, so a 50-megapixel photo is never processed at full size.
MAX_SIDE = 4096

_PARAM = "reference_image"
NO_IMAGE = "no reference_image: upload one photo of your subject"
# Image files by their extension (folders of photos; a string that names a file, not base64 data).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# A fingerprint (`image_fingerprint`): 16 lowercase hex characters.
FINGERPRINT = re.compile(r"[0-9a-f]{16}")
_HOW_TO_SEND = (
    "send the image file's bytes base64-encoded (optionally with a 'data:image/png;base64,' prefix), "
    "or upload it in the UI"
)
_SCALED_16BIT = "16-bit reference scaled to 8 bits by its brightest value"
_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Marks an image that `decode_image` already scaled from 16 bits (numpy colour input).
_INFO_16BIT = "layout_retouch_16bit"


def _bad_data(detail: str = "") -> LayoutRetouchError:
    return LayoutRetouchError(
        f"reference_image is not valid base64 image data (PNG/JPEG/WebP…){detail}: {_HOW_TO_SEND}",
        parameter=_PARAM,
    )


def decode_image(value: Any) -> Image.Image:
    """Whatever the UI/API sent → a PIL image (not yet loaded; `prepare_reference` finishes it)."""
    if isinstance(value, dict):
        if "image" not in value:
            keys = ", ".join(map(str, value)) or "none"
            raise LayoutRetouchError(
                f"reference_image is a dict without an 'image' entry (keys: {keys}): {_HOW_TO_SEND}",
                parameter=_PARAM,
            )
        value = value["image"]
    if value is None:
        raise LayoutRetouchError(NO_IMAGE, parameter=_PARAM)
    if isinstance(value, Image.Image):
        if value.width == 0 or value.height == 0:
            raise LayoutRetouchError(NO_IMAGE, parameter=_PARAM)
        return value
    if isinstance(value, np.ndarray):
        return _from_array(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _from_bytes(bytes(value))
    if isinstance(value, str):
        return _from_base64(value)
    raise LayoutRetouchError(
        f"reference_image has an unsupported type ({type(value).__name__}): {_HOW_TO_SEND}",
        parameter=_PARAM,
    )


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.size == 0:
        raise LayoutRetouchError(NO_IMAGE, parameter=_PARAM)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise LayoutRetouchError(
            f"reference_image array has shape {arr.shape}; expected H×W, H×W×1, H×W×3 or H×W×4",
            parameter=_PARAM,
        )
    if arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.dtype == np.uint16:
        if arr.ndim == 2:
            return Image.fromarray(np.ascontiguousarray(arr))  # mode I;16, scaled later
        # PIL has no 16-bit colour mode: scale by the image's brightest value here.
        img = Image.fromarray(_to_uint8_by_max(arr))
        img.info[_INFO_16BIT] = True
        return img
    raise LayoutRetouchError(
        f"reference_image array has dtype {arr.dtype}; expected uint8 or uint16", parameter=_PARAM
    )


def _to_uint8_by_max(arr: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    peak = a.max()
    if peak <= 0:
        return np.zeros(arr.shape, np.uint8)
    return np.round(a * (255.0 / peak)).astype(np.uint8)


def _from_bytes(data: bytes) -> Image.Image:
    if not data:
        raise LayoutRetouchError(NO_IMAGE, parameter=_PARAM)
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise _too_large(e) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _bad_data(" (the data is not an image file)") from e


def _too_large(error: Exception) -> LayoutRetouchError:
    return LayoutRetouchError(
        f"reference_image is too large to open safely ({error}): send a smaller photo",
        parameter=_PARAM,
    )


def _looks_like_path(text: str) -> bool:
    return bool(
        re.match(r"^(~|\.{0,2}/|[A-Za-z]:[\\/]|\\\\|file:)", text)
        or text.lower().endswith(IMAGE_EXTENSIONS + (".gif",))
    )


def _from_base64(text: str) -> Image.Image:
    stripped = text.strip()
    if not stripped:
        raise LayoutRetouchError(NO_IMAGE, parameter=_PARAM)
    body = _DATA_URL.sub("", stripped, count=1)
    body = re.sub(r"\s+", "", body)
    body += "=" * (-len(body) % 4)
    data: bytes | None = None
    for decode in (
        lambda b: base64.b64decode(b, validate=True),
        lambda b: base64.urlsafe_b64decode(b.encode("ascii")),
    ):
        try:
            data = decode(body)
            break
        except (binascii.Error, ValueError):
            continue
    path_hint = (
        " (it looks like a file path; paths are never opened, for safety)"
        if _looks_like_path(stripped)
        else ""
    )
    if not data:
        raise _bad_data(path_hint)
    try:
        return _from_bytes(data)
    except LayoutRetouchError as e:
        if path_hint:
            raise _bad_data(path_hint) from e
        raise


def find_fingerprints(text: str) -> list[str]:
    """The fingerprints in a text (an infotext's "LR reference" value), in order."""
    return FINGERPRINT.findall(text.lower())


def image_fingerprint(img: Any) -> str:
    """16 hex chars of sha256 over mode, size and RGB pixels: a stable id for caches and infotext."""
    if not isinstance(img, Image.Image):
        img = decode_image(img)
    h = hashlib.sha256()
    h.update(img.mode.encode())
    h.update(f"{img.width}x{img.height}".encode())
    h.update(img.convert("RGB").tobytes())
    return h.hexdigest()[:16]


def _aspect(w: int, h: int) -> str:
    g = math.gcd(w, h)
    return f"{w // g}:{h // g}"


def _crop_box(w: int, h: int, tw: int, th: int) -> tuple[int, int, int, int]:
    """The largest centred box of the target's aspect ratio."""
    if w * th > h * tw:  # too wide
        cw, ch = max(1, round(h * tw / th)), h
    else:
        cw, ch = w, max(1, round(w * th / tw))
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def _reduction(w: int, h: int, tw: int, th: int) -> int:
    """Integer shrink factor that still leaves the crop at least twice the target size."""
    left, top, right, bottom = _crop_box(w, h, tw, th)
    return max(1, min((right - left) // (2 * tw), (bottom - top) // (2 * th)))


def reference_size_terms(img: Any, size: tuple[int, int]):
    """SDXL's size terms of the reference *as it is fed* (conditioning.SizeTerms): its upright
    original size, the top-left of the centre crop in the resized photo, and `size` = (w, h)
    it is resized to — the same geometry `prepare_reference` applies."""
    from .conditioning import SizeTerms

    tw, th = size
    if not isinstance(img, Image.Image):
        img = decode_image(img)
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    w0, h0 = img.size
    if orientation in (5, 6, 7, 8):
        w0, h0 = h0, w0
    left, top, right, bottom = _crop_box(w0, h0, tw, th)
    scale = tw / max(1, right - left)  # original pixels → fed pixels
    return SizeTerms((h0, w0), (int(round(top * scale)), int(round(left * scale))), (th, tw))


def prepare_reference(img: Any, size: tuple[int, int]) -> tuple[Image.Image, list[str]]:
    """An RGB image of exactly `size` = (width, height), and notes on what was fixed.

    Order: EXIF orientation, early reduction of huge images, 16 → 8 bit, transparency on white,
    other modes → RGB, centre crop to the target aspect, LANCZOS resize.
    """
    tw, th = size
    if not (isinstance(tw, int) and isinstance(th, int) and tw > 0 and th > 0):
        raise ValueError(f"size must be (width, height) positive ints, got {size!r}")
    if not isinstance(img, Image.Image):
        img = decode_image(img)
    notes: list[str] = []
    try:
        img, notes = _prepare(img, tw, th, notes)
    except LayoutRetouchError:
        raise
    except Image.DecompressionBombError as e:
        raise _too_large(e) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise _bad_data(f" (the image data is damaged: {e})") from e
    return img, notes


_MODE_NAMES = {
    "L": "grayscale",
    "1": "black-and-white",
    "P": "palette",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
}


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """8-bit RGB: 16-bit scaled by its brightest value, transparency on white, other modes
    converted — each said in a note."""
    if img.mode in _SIXTEEN_BIT:
        img = Image.fromarray(_to_uint8_by_max(np.asarray(img)))  # 2-D uint8 → "L"
        notes.append(_SCALED_16BIT)
    elif img.info.get(_INFO_16BIT):
        notes.append(_SCALED_16BIT)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            notes.append("transparent parts of the reference filled with white")
            return Image.alpha_composite(white, rgba).convert("RGB")
        return rgba.convert("RGB")
    if img.mode != "RGB":
        notes.append(f"reference converted from {_MODE_NAMES.get(img.mode, img.mode)} to RGB")
        return img.convert("RGB")
    return img


def _prepare(img: Image.Image, tw: int, th: int, notes: list[str]) -> tuple[Image.Image, list[str]]:
    original = img
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    w0, h0 = img.size
    if orientation in (5, 6, 7, 8):
        w0, h0 = h0, w0  # the upright size, as the user sees the photo
    huge = max(w0, h0) > MAX_SIDE
    if huge and img.format == "JPEG":
        k = _reduction(w0, h0, tw, th)
        if k >= 2:  # decode at 1/2, 1/4 or 1/8 scale: never holds the full-size pixels
            img.draft(None, (math.ceil(img.width / k), math.ceil(img.height / k)))

    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
        notes.append("reference rotated upright from its EXIF orientation")
    else:
        img.load()

    img = _to_rgb(img, notes)
    if huge:
        k = _reduction(img.width, img.height, tw, th)
        if k >= 2:
            img = img.reduce(k)

    box = _crop_box(img.width, img.height, tw, th)
    cropped = box != (0, 0, img.width, img.height)
    if cropped or img.size != (tw, th):
        img = img.resize((tw, th), Image.Resampling.LANCZOS, box=box)
        what = f"centre-cropped to {_aspect(tw, th)} and resized" if cropped else "resized"
        notes.append(f"reference was {w0}×{h0}: {what} to {tw}×{th}")
    if img is original:
        img = img.copy()  # never hand back (or later modify) the caller's object
    img.info = {}
    return img, notes
