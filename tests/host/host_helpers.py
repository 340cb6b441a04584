"""Client-side helpers for the host tests: requests to a live WebUI, infotext parsing, reference images.

Everything here talks HTTP to the WebUI's `/sdapi/v1` API; nothing imports the WebUI.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import requests
from PIL import Image

SCRIPT = "Layout-and-Retouch"
LOG_PREFIX = "[Layout-and-Retouch]"
# Order of the positional form = order of the named parameters in the API contract (README.md, "API").
ARG_ORDER = (
    "enabled",
    "reference_image",
    "personalization",
    "vanilla_checkpoint",
    "concept_token",
    "class_phrase",
    "reference_prompt",
    "lambda1",
    "lambda2",
    "mask_start",
    "scale_with_steps",
    "sam_model",
    "ca_threshold",
    "show_intermediates",
    "layout_source",
    "reset_reference",
    "layer_preset",
    "stage1_text_encoder",
)
SIZE = 64
STEPS = 8
PROMPT = "a photo of sks dog jumping over a fence"
# SAM files the harness puts in <data-dir>/models/sam: garbage, and one the test deletes before use.
SAM_CORRUPT = "sam_vit_b_corrupt.pth"
SAM_MISSING = "sam_vit_b_missing.pth"


@dataclass
class Result:
    """One txt2img answer. `images` are uint8 arrays; `infotexts` one per image (as the WebUI gives them)."""

    status: int
    text: str
    seconds: float
    images: list = field(default_factory=list)
    infotexts: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def image(self) -> np.ndarray:
        assert self.images, f"no image in the answer (HTTP {self.status}): {self.text[:500]}"
        return self.images[0]

    @property
    def lr(self) -> dict:
        """The `LR ` keys of the first infotext."""
        return lr_params(self.infotexts[0]) if self.infotexts else {}

    def describe(self) -> str:
        it = self.infotexts[0] if self.infotexts else ""
        return f"HTTP {self.status}, {len(self.images)} image(s), infotext: {it!r}, body: {self.text[:800]!r}"


def decode_image(b64: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64))))


def txt2img(url: str, body: dict, timeout: float = 600) -> Result:
    """POST /sdapi/v1/txt2img; never raises on an HTTP error status (tests assert on it)."""
    return _generate(url, "txt2img", body, timeout)


def _generate(url: str, mode: str, body: dict, timeout: float) -> Result:
    """POST /sdapi/v1/<mode> (txt2img, img2img) and decode the answer's images and infotexts."""
    t0 = time.monotonic()
    r = requests.post(f"{url}/sdapi/v1/{mode}", json=body, timeout=timeout)
    res = Result(status=r.status_code, text=r.text, seconds=time.monotonic() - t0)
    if r.status_code == 200:
        j = r.json()
        res.images = [decode_image(i) for i in j.get("images") or []]
        try:
            res.info = json.loads(j.get("info") or "{}")
        except ValueError:
            res.info = {}
        res.infotexts = list(res.info.get("infotexts") or [])
    return res


def plain_body(prompt: str = PROMPT, **kw) -> dict:
    """A plain tiny txt2img request (DDIM, 64×64, fixed seed)."""
    body = dict(
        prompt=prompt,
        negative_prompt="",
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        seed=1234,
        sampler_name="DDIM",
        scheduler="Automatic",
        cfg_scale=5.0,
        batch_size=1,
        n_iter=1,
    )
    body.update(kw)
    return body


def lr_body(lr: dict | list, prompt: str = PROMPT, **kw) -> dict:
    """A txt2img request with the extension's args: a dict is sent as the named form, a list as is."""
    body = plain_body(prompt, **kw)
    args = [lr] if isinstance(lr, dict) else list(lr)
    body["alwayson_scripts"] = {SCRIPT: {"args": args}}
    return body


def default_lr(reference_b64: str, vanilla_title: str) -> dict:
    """Both tiers' default named args (conftest `lr_defaults`): DreamBooth mode against `vanilla_title`,
    λ1=2, λ2=3, mask start 6 taken literally (scale_with_steps off), no SAM."""
    return {
        "enabled": True,
        "reference_image": reference_b64,
        "personalization": "dreambooth",
        "vanilla_checkpoint": vanilla_title,
        "concept_token": "sks",
        "class_phrase": "dog",
        "reference_prompt": "a photo of sks dog",
        "lambda1": 2,
        "lambda2": 3,
        "mask_start": 6,
        "scale_with_steps": False,
        "sam_model": "none",
        "ca_threshold": 0.1,
        "show_intermediates": False,
        "layout_source": "inversion",
        "reset_reference": True,
        "layer_preset": "standard",
        "stage1_text_encoder": "vanilla",
    }


def positional(named: dict) -> list:
    """The positional form of a full named dict (contract order)."""
    missing = [k for k in ARG_ORDER if k not in named]
    assert not missing, f"positional form needs every value, missing {missing}"
    return [named[k] for k in ARG_ORDER]


# The WebUI's own infotext "key: value" syntax (modules/infotext_utils.py: re_param).
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(infotext: str) -> dict:
    """Key/value pairs of the infotext's last line (the parameters line); quoted values unquoted."""
    last = infotext.strip().split("\n")[-1]
    out = {}
    for k, v in _RE_PARAM.findall(last):
        v = v.strip()
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                v = v[1:-1]
        out[k.strip()] = v
    return out


def lr_params(infotext: str) -> dict:
    return {k: v for k, v in parse_infotext(infotext).items() if k.startswith("LR ")}


def lr_notes(res: Result) -> dict:
    """`LR note…` keys (notes about converted inputs, fallbacks)."""
    return {k: v for k, v in res.lr.items() if k.lower().startswith("lr note")}


def ints_in(value: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", value)]


def error_text(res: Result) -> str:
    """Everything the error answer says (FastAPI `detail`, the WebUI's `errors`/`body`), for matching."""
    try:
        j = json.loads(res.text)
    except ValueError:
        return res.text
    return json.dumps(j, ensure_ascii=False)


def assert_error_names(res: Result, *names: str) -> None:
    """An HTTP error (4xx/5xx) whose body names the parameter: one of `names` (its API key or the
    words for it: aliases of ONE parameter), compared case- and `_`/space-insensitively."""
    assert res.status >= 400, f"expected an HTTP error naming {names}, got {res.describe()}"
    text = _flat(error_text(res))
    assert any(_flat(n) in text for n in names), f"error does not name {names}: {text[:1000]}"


def _flat(text: str) -> str:
    """Lower case with spaces as underscores: "Concept token" and "concept_token" read the same."""
    return text.lower().replace(" ", "_")


def assert_retouched(res: Result) -> dict:
    """A 200 answer that only a working Layout-and-Retouch run produces: `LR ` infotext keys."""
    assert res.ok, f"expected a retouched image, got {res.describe()}"
    assert res.images and res.infotexts, res.describe()
    lr = res.lr
    assert lr, f"no 'LR ' keys in the infotext (the WebUI swallows script errors): {res.describe()}"
    return lr


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    """Any difference at all (one pixel by one level is enough): for "something happened" checks
    where `changed` is too strict; as evidence of an effect, prefer `changed`."""
    return a.shape != b.shape or not np.array_equal(a, b)


# A measurable change: the mean |Δ| over every pixel and channel, in 8-bit levels. One pixel of a
# 64×64 image, even changed from black to white, moves it by at most 255 / (64·64) ≈ 0.06.
MEASURABLE = 0.5


def mean_change(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a − b| over every pixel and channel, in 8-bit levels (0 … 255)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def changed(a: np.ndarray, b: np.ndarray, at_least: float = MEASURABLE) -> bool:
    """The images differ measurably (`MEASURABLE`), not by a stray pixel."""
    return mean_change(a, b) >= at_least


# ---------------------------------------------------------------- reference images (deterministic)


def reference_rgb(w: int = SIZE, h: int = SIZE) -> Image.Image:
    """A non-symmetric "subject": a red ellipse and a blue bar on a green-to-yellow gradient."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    img[..., 0] = 255 * xx / max(w - 1, 1)
    img[..., 1] = 160 + 60 * yy / max(h - 1, 1)
    img[..., 2] = 40
    ell = ((xx - 0.4 * w) / (0.22 * w)) ** 2 + ((yy - 0.55 * h) / (0.3 * h)) ** 2 <= 1
    img[ell] = (220, 30, 40)
    img[int(0.1 * h) : int(0.2 * h), int(0.6 * w) : int(0.9 * w)] = (30, 40, 220)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def png_b64(img: Image.Image, data_url: bool = False, **save_kw) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save_kw)
    s = base64.b64encode(buf.getvalue()).decode("ascii")
    return "data:image/png;base64," + s if data_url else s


def jpeg_b64(img: Image.Image, quality: int = 90) -> str:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def exif_rotated(img: Image.Image) -> tuple[Image.Image, bytes]:
    """Stored pixels rotated 90° counter-clockwise plus EXIF Orientation 6 ("rotate 90 CW to display"):
    a viewer that honours EXIF shows `img`."""
    stored = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return stored, exif.tobytes()


# ---------------------------------------------------------------- server state


def get(url: str, path: str, timeout: float = 60):
    r = requests.get(url + path, timeout=timeout)
    r.raise_for_status()
    return r.json()


def script_info(url: str, name: str, img2img: bool = False):
    for s in get(url, "/sdapi/v1/script-info"):
        if s.get("name", "").lower() == name.lower() and bool(s.get("is_img2img")) == img2img:
            return s
    return None


def xyz_axis_choices(url: str) -> list[str]:
    s = script_info(url, "x/y/z plot")
    assert s is not None, "x/y/z plot script missing from /sdapi/v1/script-info"
    return list(s["args"][0]["choices"])


def xyz_args(x_index: int, x_values: str) -> list:
    """Positional args of the WebUI's X/Y/Z script (scripts/xyz_grid.py ui() order): X only, no legend,
    sub-images included, margins 0 (so the grid is exactly n×SIZE wide)."""
    return [
        x_index,
        x_values,
        None,
        0,
        "",
        None,
        0,
        "",
        None,
        False,
        True,
        False,
        False,
        False,
        False,
        False,
        0,
        False,
    ]


def xyz_args_dropdown(x_index: int, x_values: list) -> list:
    """X/Y/Z args for an axis whose values come from a list (the API reads `x_values_dropdown`)."""
    args = xyz_args(x_index, ",".join(map(str, x_values)))
    args[2] = list(map(str, x_values))
    return args


def log_refusal_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(LOG_PREFIX + " refused:")]


TRACEBACK_MARKERS = (
    "Traceback (most recent call last)",
    "Error completing request",
    "Arguments: (",
    "API error:",
)


def set_checkpoint(url: str, title: str, timeout: float = 900) -> str:
    """Load a checkpoint as the WebUI's model (POST /sdapi/v1/options) and check that it took.
    Returns the title the options report (with the short hash, computed at load)."""
    r = requests.post(
        url + "/sdapi/v1/options", json={"sd_model_checkpoint": title}, timeout=timeout
    )
    assert r.status_code == 200, (
        f"setting sd_model_checkpoint={title!r}: HTTP {r.status_code} {r.text[:800]}"
    )
    got = get(url, "/sdapi/v1/options")["sd_model_checkpoint"]
    assert got.split(" [")[0] == title.split(" [")[0], (
        f"sd_model_checkpoint is {got!r} after setting {title!r}"
    )
    return got


def txt2img_while_polling(
    url: str, body: dict, poll, interval: float = 0.01, current_image: bool = False
) -> "Result":
    """Send a txt2img request while a thread reads /sdapi/v1/progress and hands each answer (a dict)
    to `poll`; polling stops when `poll` returns True or the request has returned."""
    done = threading.Event()
    query = "skip_current_image=" + ("false" if current_image else "true")

    def watch():
        while not done.is_set():
            try:
                j = requests.get(f"{url}/sdapi/v1/progress?{query}", timeout=10).json()
            except requests.RequestException:
                continue
            if poll(j):
                return
            time.sleep(interval)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        return txt2img(url, body)
    finally:
        done.set()
        t.join(30)


def interrupt_during_retouch(url: str, body: dict, at: float = 0.6, interval: float = 0.01):
    """txt2img `body` and POST /sdapi/v1/interrupt once the progress is in the retouch phase (`textinfo`
    names "retouch") with `sampling_step` at `at` or more of `sampling_steps` (the glue advances the
    WebUI's progress through stage 2). Returns (result, hit, seen): `hit` the (textinfo, step, steps)
    the interrupt was sent at (empty: the phase was never seen), `seen` every textinfo polled."""
    hit, seen = [], set()

    def poll(j):
        info, st = (j.get("textinfo") or ""), j.get("state") or {}
        seen.add(info)
        n, total = st.get("sampling_step") or 0, st.get("sampling_steps") or 0
        if "retouch" in info.lower() and total and n >= at * total:
            requests.post(url + "/sdapi/v1/interrupt", timeout=30)
            hit.append((info, n, total))
            return True
        return False

    return txt2img_while_polling(url, body, poll, interval=interval), hit, seen


# ---------------------------------------------------------------- img2img / inpaint


def img2img(url: str, body: dict, timeout: float = 600) -> Result:
    """POST /sdapi/v1/img2img; never raises on an HTTP error status (tests assert on it)."""
    return _generate(url, "img2img", body, timeout)


def input_rgb(w: int = SIZE, h: int = SIZE) -> Image.Image:
    """The img2img input: a scene unlike the reference (a dark disc on a blue-to-white sky)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    img[..., 0] = 90 + 150 * yy / max(h - 1, 1)
    img[..., 1] = 120 + 120 * yy / max(h - 1, 1)
    img[..., 2] = 250 - 40 * xx / max(w - 1, 1)
    disc = ((xx - 0.5 * w) ** 2 + (yy - 0.6 * h) ** 2) <= (0.25 * min(w, h)) ** 2
    img[disc] = (60, 50, 40)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def box_mask(w: int = SIZE, h: int = SIZE, box=(16, 16, 48, 48)) -> Image.Image:
    """A binary inpaint mask: white (inpaint) inside `box` = (x0, y0, x1, y1), black elsewhere."""
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m, mode="L")


def img2img_body(
    prompt: str = PROMPT, init: Image.Image | None = None, mask: Image.Image | None = None, **kw
) -> dict:
    """A plain tiny img2img request (DDIM, 64×64, fixed seed); with `mask` an inpaint request (mask
    blur 0, whole picture, masked content 'original', unless `kw` says otherwise)."""
    body = plain_body(prompt, init_images=[png_b64(init or input_rgb())], denoising_strength=0.75)
    if mask is not None:
        body.update(
            mask=png_b64(mask),
            mask_blur=0,
            inpainting_fill=1,
            inpaint_full_res=False,
            inpaint_full_res_padding=0,
            inpainting_mask_invert=0,
        )
    body.update(kw)
    return body


def lr_img2img_body(lr: dict | list, prompt: str = PROMPT, **kw) -> dict:
    body = img2img_body(prompt, **kw)
    body["alwayson_scripts"] = {SCRIPT: {"args": [lr] if isinstance(lr, dict) else list(lr)}}
    return body


def xyz_axis_choices_img2img(url: str) -> list[str]:
    s = script_info(url, "x/y/z plot", img2img=True)
    assert s is not None, "x/y/z plot script (img2img) missing from /sdapi/v1/script-info"
    return list(s["args"][0]["choices"])
