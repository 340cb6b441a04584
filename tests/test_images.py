"""Reference images from the UI/API: decoding, preparation for the model, fingerprints."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from lib_layout_retouch import images
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.images import MAX_SIDE, decode_image, image_fingerprint, prepare_reference
from tests.paths import VICO

DOG = VICO / "brown_dog" / "00.jpg"  # 1440×1440
ELEPHANT = VICO / "elephant_statue" / "2.jpg"  # 1856×2475, portrait
needs_vico = pytest.mark.skipif(not DOG.exists(), reason="ViCo photos not on this machine")

NO_IMAGE = "no reference_image: upload one photo of your subject"
NOT_BASE64 = "reference_image is not valid base64 image data (PNG/JPEG"


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _pattern(w: int, h: int) -> Image.Image:
    """An RGB image whose every pixel differs from its neighbours (to see crops and flips)."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([(x * 7) % 256, (y * 5) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


# ---- decode_image ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", [None, "", "   ", b"", np.zeros((0, 0, 3), np.uint8), {"image": None}]
)
def test_no_image(value):
    with pytest.raises(LayoutRetouchError) as e:
        decode_image(value)
    assert e.value.parameter == "reference_image"
    assert str(e.value) == f"Layout-and-Retouch: {NO_IMAGE}"


@needs_vico
def test_decode_real_photo_every_way_gives_the_same_pixels():
    data = DOG.read_bytes()
    b64 = base64.b64encode(data).decode()
    want = image_fingerprint(Image.open(DOG))
    for value in (
        data,
        bytearray(data),
        b64,
        "data:image/jpeg;base64," + b64,
        b64[:100] + "\n" + b64[100:],  # line breaks, as some clients wrap base64
        base64.urlsafe_b64encode(data).decode().rstrip("="),
        {"image": b64, "mask": None},  # Gradio 3 sketch/editor dict
        Image.open(DOG),
        np.asarray(Image.open(DOG)),
    ):
        img = decode_image(value)
        assert img.size == (1440, 1440)
        assert image_fingerprint(img) == want


def test_decode_pil_is_returned_as_is():
    img = _pattern(8, 6)
    assert decode_image(img) is img


@pytest.mark.parametrize(
    "shape, dtype, mode",
    [
        ((6, 8), np.uint8, "L"),
        ((6, 8, 1), np.uint8, "L"),
        ((6, 8, 3), np.uint8, "RGB"),
        ((6, 8, 4), np.uint8, "RGBA"),
        ((6, 8), np.uint16, "I;16"),
        ((6, 8, 3), np.uint16, "RGB"),
        ((6, 8, 4), np.uint16, "RGBA"),
    ],
)
def test_decode_arrays(shape, dtype, mode):
    arr = (np.arange(np.prod(shape)).reshape(shape) * 3).astype(dtype)
    img = decode_image(arr)
    assert img.mode == mode and img.size == (8, 6)


def test_decode_uint16_colour_is_scaled_by_its_max():
    arr = np.zeros((2, 2, 3), np.uint16)
    arr[0, 0] = (4000, 2000, 0)
    img = decode_image(arr)
    assert img.getpixel((0, 0)) == (255, 128, 0)  # 2000/4000·255 = 127.5 → 128
    _, notes = prepare_reference(img, (2, 2))
    assert notes == ["16-bit reference scaled to 8 bits by its brightest value"]


@pytest.mark.parametrize(
    "arr, piece",
    [
        (np.zeros((4, 4), np.float32), "dtype float32"),
        (np.zeros((4, 4, 2), np.uint8), "shape (4, 4, 2)"),
        (np.zeros((4,), np.uint8), "shape (4,)"),
    ],
)
def test_decode_bad_arrays(arr, piece):
    with pytest.raises(LayoutRetouchError) as e:
        decode_image(arr)
    assert e.value.parameter == "reference_image" and piece in str(e.value)


@pytest.mark.parametrize(
    "value",
    [
        "not base64 at all!",
        base64.b64encode(b"hello, this is not an image").decode(),
        "data:image/png;base64,@@@",
        b"GIF89a but truncated",
    ],
)
def test_decode_not_an_image(value):
    with pytest.raises(LayoutRetouchError) as e:
        decode_image(value)
    msg = str(e.value)
    assert e.value.parameter == "reference_image"
    assert NOT_BASE64 in msg
    assert "base64-encoded" in msg  # how to send it


def test_a_path_string_is_refused_never_opened(tmp_path, monkeypatch):
    path = tmp_path / "subject.png"
    path.write_bytes(_png_bytes(_pattern(8, 8)))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        images.Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k)
    )
    for value in (str(path), str(path.with_suffix("")), "~/subject.png", "C:\\photos\\dog.jpg"):
        with pytest.raises(LayoutRetouchError) as e:
            decode_image(value)
        assert NOT_BASE64 in str(e.value)
        assert "file path" in str(e.value)
    assert all(isinstance(fp, io.BytesIO) for fp in opened)  # never a filename


def test_decode_other_inputs():
    with pytest.raises(LayoutRetouchError) as e:
        decode_image({"name": "/tmp/x.png"})
    assert "without an 'image' entry (keys: name)" in str(e.value)
    with pytest.raises(LayoutRetouchError) as e:
        decode_image(42)
    assert "unsupported type (int)" in str(e.value)


# ---- prepare_reference -------------------------------------------------------------------------
@needs_vico
def test_prepare_real_square_photo():
    img, notes = prepare_reference(decode_image(DOG.read_bytes()), (512, 512))
    assert img.mode == "RGB" and img.size == (512, 512)
    assert notes == ["reference was 1440×1440: resized to 512×512"]
    direct = Image.open(DOG).convert("RGB").resize((512, 512), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(img), np.asarray(direct))


@needs_vico
def test_prepare_real_portrait_photo_is_centre_cropped():
    img, notes = prepare_reference(ELEPHANT.read_bytes(), (512, 512))
    assert img.size == (512, 512)
    assert notes == ["reference was 1856×2475: centre-cropped to 1:1 and resized to 512×512"]
    src = Image.open(ELEPHANT).convert("RGB")
    top = (2475 - 1856) // 2
    centre = src.crop((0, top, 1856, top + 1856)).resize((512, 512), Image.Resampling.LANCZOS)
    upper = src.crop((0, 0, 1856, 1856)).resize((512, 512), Image.Resampling.LANCZOS)
    got = np.asarray(img, np.float64)
    assert np.abs(got - np.asarray(centre, np.float64)).mean() < 1.0
    assert np.abs(got - np.asarray(upper, np.float64)).mean() > 5.0


def test_prepare_other_aspects_and_note_format():
    img, notes = prepare_reference(_pattern(300, 100), (64, 48))
    assert img.size == (64, 48)
    assert notes == ["reference was 300×100: centre-cropped to 4:3 and resized to 64×48"]
    img, notes = prepare_reference(_pattern(100, 300), (96, 64))
    assert notes == ["reference was 100×300: centre-cropped to 3:2 and resized to 96×64"]


def test_prepare_exact_size_rgb_is_a_copy_with_no_notes():
    src = _pattern(32, 24)
    img, notes = prepare_reference(src, (32, 24))
    assert notes == []
    assert img is not src and np.array_equal(np.asarray(img), np.asarray(src))
    # crop without resize (the centred box already has the target size)
    img, notes = prepare_reference(src, (24, 24))
    assert np.array_equal(np.asarray(img), np.asarray(src)[:, 4:28])
    assert notes == ["reference was 32×24: centre-cropped to 1:1 and resized to 24×24"]


def test_rgba_transparency_composited_on_white():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200  # red-ish everywhere
    arr[:2, :, 3] = 255  # top opaque
    arr[2:, :, 3] = 0  # bottom transparent
    arr[3, 3, 3] = 128  # half
    img, notes = prepare_reference(Image.fromarray(arr, "RGBA"), (4, 4))
    out = np.asarray(img)
    assert img.mode == "RGB"
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[2, 0]) == (255, 255, 255)
    assert tuple(out[3, 3]) == (227, 127, 127)  # 200·0.5 + 255·0.5
    assert notes == ["transparent parts of the reference filled with white"]


def test_opaque_rgba_and_la():
    arr = np.full((4, 4, 4), 255, np.uint8)
    arr[..., :3] = 10
    img, notes = prepare_reference(Image.fromarray(arr, "RGBA"), (4, 4))
    assert notes == [] and tuple(np.asarray(img)[0, 0]) == (10, 10, 10)
    la = Image.fromarray(
        np.stack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA"
    )
    img, notes = prepare_reference(la, (4, 4))
    assert tuple(np.asarray(img)[0, 0]) == (255, 255, 255)
    assert notes == ["transparent parts of the reference filled with white"]


def test_palette_with_transparency_through_png_bytes():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] + [255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    data = _png_bytes(pal, transparency=0)  # index 0 (blue) is transparent
    img, notes = prepare_reference(base64.b64encode(data).decode(), (4, 4))
    out = np.asarray(img)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert notes == ["transparent parts of the reference filled with white"]


@pytest.mark.parametrize(
    "img, note, pixel",
    [
        (Image.new("P", (4, 4), 1), "reference converted from palette to RGB", (255, 0, 0)),
        (Image.new("L", (4, 4), 77), "reference converted from grayscale to RGB", (77, 77, 77)),
        (
            Image.new("CMYK", (4, 4), (0, 255, 255, 0)),
            "reference converted from CMYK to RGB",
            (255, 0, 0),
        ),
    ],
)
def test_modes_converted_to_rgb(img, note, pixel):
    if img.mode == "P":
        img.putpalette([0, 0, 255] + [255, 0, 0] + [0] * 762)
    out, notes = prepare_reference(img, (4, 4))
    assert out.mode == "RGB" and notes == [note]
    assert tuple(np.asarray(out)[2, 2]) == pixel


def test_sixteen_bit_png_scaled_by_its_max():
    arr = np.zeros((4, 4), np.uint16)
    arr[0, 0] = 1000
    arr[1, 1] = 400
    data = _png_bytes(Image.fromarray(arr))
    decoded = decode_image(data)
    assert decoded.mode in ("I;16", "I")
    img, notes = prepare_reference(decoded, (4, 4))
    out = np.asarray(img)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (102, 102, 102)  # 400/1000·255
    assert tuple(out[3, 3]) == (0, 0, 0)
    assert notes[0] == "16-bit reference scaled to 8 bits by its brightest value"
    assert notes[1:] == ["reference converted from grayscale to RGB"]


def test_float_and_int32_images_scaled_by_max():
    f = Image.fromarray(np.array([[0.0, 0.5], [2.0, 1.0]], np.float32), "F")
    img, _ = prepare_reference(f, (2, 2))
    assert np.asarray(img)[..., 0].tolist() == [[0, 64], [255, 128]]
    i = Image.fromarray(np.array([[0, 70000], [35000, 0]], np.int32), "I")
    img, _ = prepare_reference(i, (2, 2))
    assert np.asarray(img)[..., 0].tolist() == [[0, 255], [128, 0]]


def test_exif_orientation_1_or_invalid_adds_no_note():
    for orientation in (1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _png_bytes(_pattern(8, 4), exif=exif.tobytes())
        img, notes = prepare_reference(data, (8, 4))
        assert notes == [] and np.array_equal(np.asarray(img), np.asarray(_pattern(8, 4)))


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_applied(orientation):
    src = Image.new("RGB", (80, 40), (255, 0, 0))
    src.paste((0, 0, 255), (40, 0, 80, 40))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg_bytes(src, exif=exif.tobytes(), quality=95)
    size = (80, 40) if orientation == 3 else (40, 80)
    img, notes = prepare_reference(data, size)
    assert img.size == size
    assert notes == ["reference rotated upright from its EXIF orientation"]
    out = np.asarray(img).astype(int)
    # 6 = rotate 90° clockwise to view: the left (red) half ends on top; 8 = counter-clockwise: bottom
    first, last = out[2, 2], out[-3, -3]
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    if orientation == 6:
        assert np.abs(first - red).max() < 20 and np.abs(last - blue).max() < 20
    else:  # 8 and 3 both put the blue half first
        assert np.abs(first - blue).max() < 20 and np.abs(last - red).max() < 20


def test_huge_jpeg_is_drafted_before_decoding():
    src = Image.new("RGB", (8000, 6000), (30, 90, 150))
    src.paste((250, 250, 0), (3000, 2000, 5000, 4000))
    data = _jpeg_bytes(src, quality=80)
    del src
    decoded = decode_image(data)
    img, notes = prepare_reference(decoded, (512, 512))
    assert img.size == (512, 512) and img.mode == "RGB"
    assert notes == ["reference was 8000×6000: centre-cropped to 1:1 and resized to 512×512"]
    # the JPEG was decoded at 1/4 scale (draft): never 48 megapixels in memory
    assert decoded.size == (2000, 1500)
    # centre square 1000..7000 × 0..6000 → yellow box at 2000..4000 of 6000 → 171..341 of 512
    out = np.asarray(img).astype(int)
    assert np.abs(out[256, 256] - [250, 250, 0]).max() < 12
    assert np.abs(out[20, 20] - [30, 90, 150]).max() < 12


def test_huge_png_is_reduced_early(monkeypatch):
    side = MAX_SIDE + 104  # 4200
    src = Image.new("L", (side, side), 40)
    data = _png_bytes(src, compress_level=1)
    reduced = []
    real_reduce = Image.Image.reduce
    monkeypatch.setattr(
        Image.Image,
        "reduce",
        lambda self, f, *a: reduced.append((self.size, f)) or real_reduce(self, f, *a),
    )
    img, notes = prepare_reference(data, (256, 256))
    assert reduced == [((side, side), 8)]  # 4200 // 512
    assert img.size == (256, 256) and tuple(np.asarray(img)[5, 5]) == (40, 40, 40)
    assert notes == [
        "reference converted from grayscale to RGB",
        f"reference was {side}×{side}: resized to 256×256",
    ]


def test_damaged_jpeg_is_a_user_error():
    full = _jpeg_bytes(_pattern(256, 256))
    data = full[: len(full) // 2]  # headers intact, scan data cut: opens, fails to load
    assert decode_image(data).size == (256, 256)
    with pytest.raises(LayoutRetouchError) as e:
        prepare_reference(data, (32, 32))
    assert e.value.parameter == "reference_image"
    assert "damaged" in str(e.value)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10.0, 10)])
def test_bad_size_is_a_programming_error(size):
    with pytest.raises(ValueError) as e:
        prepare_reference(_pattern(4, 4), size)
    assert not isinstance(e.value, LayoutRetouchError)


# ---- image_fingerprint -------------------------------------------------------------------------
def test_fingerprint_is_stable_and_sensitive():
    a = _pattern(16, 16)
    fp = image_fingerprint(a)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    # the documented recipe: sha256 over mode, size and RGB bytes
    assert fp == hashlib.sha256(b"RGB" + b"16x16" + a.tobytes()).hexdigest()[:16]
    assert fp == "1ee787ec89def9d7"  # cache keys and infotexts must not change between versions
    assert image_fingerprint(a.copy()) == fp
    assert image_fingerprint(_png_bytes(a)) == fp  # through decode
    b = a.copy()
    b.putpixel((3, 3), (0, 0, 0))
    assert image_fingerprint(b) != fp
    assert image_fingerprint(a.crop((0, 0, 16, 8))) != image_fingerprint(a.crop((0, 0, 8, 16)))
    gray = Image.new("L", (4, 4), 9)
    assert image_fingerprint(gray) != image_fingerprint(gray.convert("RGB"))  # mode is part of it
