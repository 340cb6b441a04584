"""The protocol runner: ViCo concepts x prompts x seeds, Layout-and-Retouch on and off, via the WebUI API.

For every (concept, prompt, seed) it asks `POST {url}/sdapi/v1/txt2img` twice with the same seed:
"off" (the personalized model alone; the script is sent with enabled=False, or left out when the
WebUI lacks the extension) and "on" (Layout-and-Retouch enabled with the concept's reference photo;
its infotext must show the script ran, see `RunSettings.on_marker`). Each result is written as

    <out>/images/<method>/<concept>/p<prompt index:02d>_s<seed>.png   (+ .json sidecar)

atomically, so a run that stops (Ctrl-C, WebUI down, errors) keeps what it made, and running the
same command again skips every image already on disk. Only the standard library speaks HTTP.

The concept file (JSON) maps ViCo concept names to what the WebUI needs:

    {"defaults": {"personalization": "dreambooth", "vanilla_checkpoint": "v1-5-pruned-emaonly.safetensors"},
     "concepts": {
        "brown_dog":  {"token": "sks", "class": "dog", "checkpoint": "db_brown_dog.safetensors"},
        "cat_statue": {"folder": "cat-toy", "token": "<cat-toy>", "class": "cat statue",
                       "personalization": "textual_inversion"}}}

Per concept: token, class (required); folder (default: the name), subject (text put into the
prompt's "{}", default "{token} {class}"), reference_image (default: the concept's entry in
imgs_source.txt, else the first image of the folder), personalization, checkpoint (sent as
override_settings.sd_model_checkpoint), prompt_extra (appended to the prompt, e.g. "<lora:dog:1>"),
live (which prompt list; default from ViCo's five animals), and the script arguments
vanilla_checkpoint, lambda1, lambda2, mask_start, sam_model, ca_threshold. "defaults" may hold any
of these except token/class/folder/reference_image.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Sequence

from PIL import Image

from .. import NAME
from ..errors import LayoutRetouchError
from ..images import IMAGE_EXTENSIONS
from ..masks import DEFAULT_CA_THRESHOLD
from ..params import PERSONALIZATION_KINDS
from ..schedule import (
    PAPER_LAMBDA1,
    PAPER_LAMBDA1_CHALLENGING,
    PAPER_LAMBDA2,
    PAPER_MASK_START,
    PAPER_STEPS,
)
from .diversity import mask_path_for

SCRIPT_TITLE = NAME
METHODS = ("off", "on")
METHOD_LABELS = {"off": "Baseline (Layout-and-Retouch off)", "on": "Layout-and-Retouch (on)"}
LIVE_CONCEPTS = (
    "black_cat",
    "brown_cat",
    "brown_dog",
    "brown_dog2",
    "fat_dog",
)  # ViCo / DreamMatcher
PROMPT_SETS = ("normal", "challenging")
SCRIPT_ARG_KEYS = (
    "vanilla_checkpoint",
    "lambda1",
    "lambda2",
    "mask_start",
    "sam_model",
    "ca_threshold",
)
CONCEPT_KEYS = (
    "token",
    "class",
    "folder",
    "subject",
    "reference_image",
    "personalization",
    "checkpoint",
    "prompt_extra",
    "live",
) + SCRIPT_ARG_KEYS


@dataclass
class ConceptSpec:
    name: str
    folder: str  # absolute path of the concept's photos
    token: str
    class_phrase: str
    subject: str
    reference_image: str  # absolute path
    personalization: str = "dreambooth"
    checkpoint: str = ""
    prompt_extra: str = ""
    live: bool = False
    script: dict = field(default_factory=dict)  # overrides of SCRIPT_ARG_KEYS

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunSettings:
    """Generation settings shared by every request (the paper: SD1.4, DDIM 50 steps, 8 images)."""

    n: int = 8  # images per (concept, prompt) and method
    n_prompts: int | None = None  # first K prompts of each list; None = all
    prompt_set: str = "normal"
    seed: int = 0  # seeds are seed, seed+1, ..., seed+n-1 for every prompt and both methods
    steps: int = PAPER_STEPS
    cfg_scale: float = 7.5
    width: int = 512
    height: int = 512
    sampler: str = "DDIM"
    negative_prompt: str = ""
    methods: tuple = METHODS
    lambda1: int | None = None  # None: the paper's, for normal or challenging prompts
    lambda2: int = PAPER_LAMBDA2
    mask_start: int = PAPER_MASK_START
    ca_threshold: float = DEFAULT_CA_THRESHOLD
    sam_model: str = ""
    vanilla_checkpoint: str = ""
    max_reference_side: int = 1024  # the reference photo is downscaled to this before upload
    # Text an "on" image's infotext holds only when the script really ran (the extension writes its
    # parameters as "LR ..." keys). The WebUI swallows script errors and still answers 200 with a
    # plain image, so without this check a misconfigured run would quietly be a second baseline.
    on_marker: str = "LR lambda1"
    keep_masks: bool = True  # save the extension's mask of each ON image as <image>.mask.png

    def generation_key(self) -> dict:
        """The settings that change an image: a resumed run must match them."""
        keys = (
            "steps",
            "cfg_scale",
            "width",
            "height",
            "sampler",
            "negative_prompt",
            "prompt_set",
            "lambda2",
            "mask_start",
            "ca_threshold",
            "sam_model",
            "vanilla_checkpoint",
            "max_reference_side",
        )
        d = {k: getattr(self, k) for k in keys}
        d["lambda1"] = self.effective_lambda1()
        return d

    def effective_lambda1(self) -> int:
        if self.lambda1 is not None:
            return int(self.lambda1)
        return PAPER_LAMBDA1_CHALLENGING if self.prompt_set == "challenging" else PAPER_LAMBDA1


@dataclass
class RunSummary:
    out_dir: str
    total: int
    generated: int
    skipped: int
    warnings: list = field(default_factory=list)


# ------------------------------------------------------------------------------------ ViCo inputs
def _check_dir(path: str, what: str, parameter: str) -> str:
    if not path or not os.path.isdir(path):
        raise LayoutRetouchError(f"{what} folder '{path}' does not exist.", parameter=parameter)
    return os.path.abspath(path)


def _image_files(folder: str) -> list[str]:
    return sorted(
        f
        for f in os.listdir(folder)
        if not f.startswith(".")
        and f.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(folder, f))
    )


def read_prompts(vico_dir: str, live: bool, prompt_set: str = "normal") -> list[str]:
    """The ViCo prompt list for a live/non-live concept: templates with "{}" for the subject."""
    if prompt_set not in PROMPT_SETS:
        raise LayoutRetouchError(
            f"Unknown prompt set '{prompt_set}'; use one of {PROMPT_SETS}.", parameter="prompt_set"
        )
    name = f"prompts_{'live' if live else 'nonlive'}_objects{'_challenging' if prompt_set == 'challenging' else ''}.txt"
    path = os.path.join(vico_dir, name)
    if not os.path.isfile(path):
        raise LayoutRetouchError(
            f"Prompt list {path} is missing: --vico must be the ViCo folder with the "
            f"prompts_*_objects*.txt files.",
            parameter="vico",
        )
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    bad = [p for p in prompts if "{}" not in p]
    if bad:
        raise LayoutRetouchError(
            f"{path}: every prompt needs '{{}}' where the subject goes; these do not: {bad[:3]}",
            parameter="vico",
        )
    if not prompts:
        raise LayoutRetouchError(f"Prompt list {path} is empty.", parameter="vico")
    return prompts


def load_concepts(path: str, vico_dir: str) -> list[ConceptSpec]:
    """Read and check the concept file (format in the module docstring) against the ViCo folder."""
    vico_dir = _check_dir(vico_dir, "ViCo", "vico")
    defaults, concepts = _read_concept_file(path)
    sources = _reference_sources(vico_dir)
    available = sorted(d for d in os.listdir(vico_dir) if os.path.isdir(os.path.join(vico_dir, d)))
    return [
        _concept_spec(
            name, _merged_concept(name, raw, defaults, path), path, vico_dir, sources, available
        )
        for name, raw in concepts.items()
    ]


def _read_concept_file(path: str) -> tuple[dict, dict]:
    """(defaults, {name: raw concept}) of the JSON concept file, or a message naming what is wrong."""
    if not os.path.isfile(path):
        raise LayoutRetouchError(f"Concept file '{path}' does not exist.", parameter="concepts")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutRetouchError(
            f"Concept file '{path}' is not valid JSON ({e}).", parameter="concepts"
        ) from None
    if not isinstance(data, dict):
        raise LayoutRetouchError(
            f"Concept file '{path}' must hold a JSON object.", parameter="concepts"
        )
    defaults = data.get("defaults", {})
    concepts = (
        data["concepts"]
        if "concepts" in data
        else {k: v for k, v in data.items() if k != "defaults"}
    )
    if not isinstance(concepts, dict) or not concepts or not isinstance(defaults, dict):
        raise LayoutRetouchError(
            f"Concept file '{path}' names no concepts: expected "
            '{"concepts": {"brown_dog": {"token": "sks", "class": "dog"}, ...}}.',
            parameter="concepts",
        )
    return defaults, concepts


def _reference_sources(vico_dir: str) -> dict:
    """ViCo's imgs_source.txt ({folder: the photo the paper used as reference}), {} without it."""
    src_file = os.path.join(vico_dir, "imgs_source.txt")
    if not os.path.isfile(src_file):
        return {}
    try:
        with open(src_file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError:
        return {}


def _merged_concept(name: str, raw, defaults: dict, path: str) -> dict:
    """The concept's keys over the file's defaults (which never give token, class, folder or
    reference); unknown keys and an empty token or class are refused."""
    if not isinstance(raw, dict):
        raise LayoutRetouchError(
            f"Concept '{name}' in {path} must be an object with token and class.",
            parameter="concepts",
        )
    unknown = sorted(set(raw) - set(CONCEPT_KEYS)) + sorted(set(defaults) - set(CONCEPT_KEYS))
    if unknown:
        raise LayoutRetouchError(
            f"Unknown key(s) {unknown} for concept '{name}' in {path}; known keys: "
            f"{', '.join(CONCEPT_KEYS)}.",
            parameter="concepts",
        )
    own_only = ("token", "class", "folder", "reference_image")
    merged = {**{k: v for k, v in defaults.items() if k not in own_only}, **raw}
    for key in ("token", "class"):
        if not str(merged.get(key, "")).strip():
            raise LayoutRetouchError(
                f"Concept '{name}' in {path} needs a non-empty '{key}'.", parameter="concepts"
            )
    return merged


def _reference_path(name: str, merged: dict, folder: str, folder_name: str, sources: dict) -> str:
    """The concept's reference photo: its own `reference_image`, else ViCo's source list's, else
    the folder's first image (also when the source list names a file this copy lacks)."""
    images = _image_files(folder)
    if not images:
        raise LayoutRetouchError(
            f"Concept '{name}': no images in '{folder}'.", parameter="concepts"
        )
    ref = merged.get("reference_image") or sources.get(folder_name) or images[0]
    ref_path = ref if os.path.isabs(ref) else os.path.join(folder, ref)
    if os.path.isfile(ref_path):
        return os.path.abspath(ref_path)
    if merged.get("reference_image"):
        raise LayoutRetouchError(
            f"Concept '{name}': reference image '{ref_path}' does not exist.", parameter="concepts"
        )
    return os.path.abspath(os.path.join(folder, images[0]))


def _concept_spec(
    name: str, merged: dict, path: str, vico_dir: str, sources: dict, available: list
) -> ConceptSpec:
    folder_name = str(merged.get("folder", name))
    folder = os.path.join(vico_dir, folder_name)
    if not os.path.isdir(folder):
        raise LayoutRetouchError(
            f"Concept '{name}': folder '{folder}' does not exist. Set \"folder\" to one of: "
            f"{', '.join(available)}.",
            parameter="concepts",
        )
    reference = _reference_path(name, merged, folder, folder_name, sources)
    pers = str(merged.get("personalization", "dreambooth"))
    if pers not in PERSONALIZATION_KINDS:
        raise LayoutRetouchError(
            f"Concept '{name}': personalization '{pers}' is not one of {PERSONALIZATION_KINDS}.",
            parameter="concepts",
        )
    token, cls = str(merged["token"]).strip(), str(merged["class"]).strip()
    return ConceptSpec(
        name=name,
        folder=folder,
        token=token,
        class_phrase=cls,
        subject=str(merged.get("subject") or f"{token} {cls}"),
        reference_image=reference,
        personalization=pers,
        checkpoint=str(merged.get("checkpoint", "")),
        prompt_extra=str(merged.get("prompt_extra", "")),
        live=bool(merged.get("live", folder_name in LIVE_CONCEPTS or name in LIVE_CONCEPTS)),
        script={k: merged[k] for k in SCRIPT_ARG_KEYS if k in merged},
    )


def encode_reference(path: str, max_side: int = 1024) -> str:
    """The reference photo as base64 PNG (no data: prefix), longest side capped at `max_side`."""
    from .models import load_image  # lazy: keeps `runner` free of torch until scoring

    img = load_image(path)
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------- the API
class WebUIError(LayoutRetouchError):
    """The WebUI could not be reached or kept failing; `transient` says whether retrying might help."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message, parameter="url")
        self.transient = transient


class WebUIClient:
    """A1111's HTTP API with retries: connection errors, timeouts and 5xx are retried with
    exponential backoff (backoff, 2*backoff, 4*backoff ... seconds); 4xx fail at once."""

    def __init__(
        self,
        url: str,
        timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 2.0,
        auth: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not url.startswith(("http://", "https://")):
            raise LayoutRetouchError(
                f"WebUI URL '{url}' must start with http:// or https://.", parameter="url"
            )
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.sleep = sleep
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            self.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()

    def _once(self, method: str, path: str, payload: dict | None) -> dict:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(
            self.url + path, data=data, headers=self.headers, method=method
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            if e.code == 404:
                raise WebUIError(
                    f"{self.url}{path} answered 404: start the WebUI with --api (and check the URL). "
                    f"{detail}",
                    transient=False,
                ) from None
            if e.code in (401, 403):
                raise WebUIError(
                    f"{self.url}{path} answered {e.code}: pass --api-auth user:password. {detail}",
                    transient=False,
                ) from None
            if e.code == 422:
                raise WebUIError(
                    f"The WebUI rejected the request (422): {detail}", transient=False
                ) from None
            raise WebUIError(
                f"HTTP {e.code} from {self.url}{path}: {detail}",
                transient=e.code >= 500 or e.code == 429,
            ) from None
        except (
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            socket.timeout,
            TimeoutError,
        ) as e:
            reason = getattr(e, "reason", e)
            raise WebUIError(
                f"could not reach the WebUI at {self.url} ({type(reason).__name__}: {reason})"
            ) from None
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WebUIError(
                f"{self.url}{path} sent a reply that is not JSON ({body[:80]!r}...)"
            ) from None

    def call(
        self,
        method: str,
        path: str,
        payload: dict | None = None,
        check: Callable[[dict], None] | None = None,
    ) -> dict:
        """One API call with retries; `check(reply)` may raise WebUIError to retry a bad 200 reply too."""
        last: WebUIError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._once(method, path, payload)
                if check is not None:
                    check(reply)
                return reply
            except WebUIError as e:
                if not e.transient:
                    raise
                last = e
        raise WebUIError(
            f"{last.args[0] if last else 'no attempt'} — gave up after {self.retries + 1} attempts",
            transient=True,
        )

    def txt2img(self, payload: dict) -> dict:
        """POST /sdapi/v1/txt2img; the reply must carry at least one decodable image."""

        def check(reply: dict) -> None:
            if (
                not isinstance(reply, dict)
                or not isinstance(reply.get("images"), list)
                or not reply["images"]
            ):
                keys = sorted(reply) if isinstance(reply, dict) else type(reply).__name__
                raise WebUIError(f"the txt2img reply has no images (keys: {keys})")
            try:
                _decode_image(reply["images"][0])
            except Exception as e:
                raise WebUIError(
                    f"the txt2img reply's image is unreadable ({type(e).__name__}: {e})"
                ) from None

        return self.call("POST", "/sdapi/v1/txt2img", payload, check=check)

    def txt2img_scripts(self) -> list[str] | None:
        """Script titles the txt2img API accepts (lower case), or None when the WebUI has no such endpoint."""
        try:
            reply = self.call("GET", "/sdapi/v1/scripts")
        except WebUIError as e:
            if not e.transient and "404" in str(e):
                return None
            raise
        return (
            [str(s).lower() for s in reply.get("txt2img", [])] if isinstance(reply, dict) else None
        )


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", "replace")
    except Exception:
        return str(e.reason)
    try:
        j = json.loads(body)
        if isinstance(j, dict):
            parts = [str(j[k]) for k in ("error", "detail", "errors") if j.get(k)]
            return "; ".join(parts)[:500] or body[:500]
    except json.JSONDecodeError:
        pass
    return body[:500]


def pipeline_mask(reply: dict, payload: dict) -> bytes | None:
    """The blend mask the extension returned for a one-image ON request, as PNG bytes, or None.

    With show_intermediates the images are [result, layout, mask, cross-attention map]; the mask's
    foreground is ≥ 0.5 (≥ 128 grey), which `diversity.load_mask_png` reads as subject."""
    args = payload.get("alwayson_scripts", {}).get(SCRIPT_TITLE, {}).get("args") or [{}]
    if not (
        isinstance(args[0], dict) and args[0].get("enabled") and args[0].get("show_intermediates")
    ):
        return None
    images = reply.get("images") or []
    if len(images) < 4:
        return None
    try:
        return base64.b64decode(images[2].split(",", 1)[-1])
    except (ValueError, TypeError):
        return None


def build_payload(
    spec: ConceptSpec,
    template: str,
    seed: int,
    method: str,
    settings: RunSettings,
    reference_b64: str,
    include_script: bool = True,
) -> dict:
    """The /sdapi/v1/txt2img request for one image. "on" and "off" differ only in the script's args.

    "off" sends the script with enabled=False (the same code path as "on", minus the work), or no
    script at all when `include_script` is False (a WebUI without the extension answers 422 to an
    unknown alwayson script)."""
    prompt = " ".join(template.replace("{}", spec.subject).split())
    if spec.prompt_extra:
        prompt = f"{prompt} {spec.prompt_extra}"
    enabled = method == "on"
    script = {
        "enabled": enabled,
        "reference_image": reference_b64 if enabled else "",
        "personalization": spec.personalization,
        "vanilla_checkpoint": spec.script.get("vanilla_checkpoint", settings.vanilla_checkpoint),
        "concept_token": spec.token,
        "class_phrase": spec.class_phrase,
        "lambda1": int(spec.script.get("lambda1", settings.effective_lambda1())),
        "lambda2": int(spec.script.get("lambda2", settings.lambda2)),
        "mask_start": int(spec.script.get("mask_start", settings.mask_start)),
        "ca_threshold": float(spec.script.get("ca_threshold", settings.ca_threshold)),
        # ON: ask for the intermediates, to keep the pipeline's own subject mask for σ²_avg.
        "show_intermediates": enabled and settings.keep_masks,
    }
    sam_model = spec.script.get("sam_model", settings.sam_model)
    if sam_model:  # absent: the extension's own default (its settings may name a SAM model)
        script["sam_model"] = sam_model
    payload = {
        "prompt": prompt,
        "negative_prompt": settings.negative_prompt,
        "seed": int(seed),
        "subseed": -1,
        "subseed_strength": 0,
        "steps": int(settings.steps),
        "cfg_scale": float(settings.cfg_scale),
        "width": int(settings.width),
        "height": int(settings.height),
        "sampler_name": settings.sampler,
        "batch_size": 1,
        "n_iter": 1,
        "send_images": True,
        "save_images": False,
    }
    if include_script or enabled:
        payload["alwayson_scripts"] = {SCRIPT_TITLE: {"args": [script]}}
    if spec.checkpoint:
        payload["override_settings"] = {"sd_model_checkpoint": spec.checkpoint}
        # Not restored after each request: that would reload the weights twice per image. The WebUI
        # keeps the last concept's checkpoint loaded when the run ends.
        payload["override_settings_restore_afterwards"] = False
    return payload


# ------------------------------------------------------------------------------------- the files
def image_path(out_dir: str, method: str, concept: str, prompt_index: int, seed: int) -> str:
    return os.path.join(out_dir, "images", method, concept, f"p{prompt_index:02d}_s{seed}.png")


def _atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def image_done(path: str) -> bool:
    """An image counts as done when it exists and decodes; a broken one is moved aside (kept)."""
    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        os.replace(path, path + ".broken")
        return False


def _decode_image(b64: str) -> bytes:
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[1]
    raw = base64.b64decode(b64)
    with Image.open(io.BytesIO(raw)) as im:
        im.load()
        if im.format == "PNG":
            return raw
        buf = io.BytesIO()
        im.save(buf, format="PNG")  # JPEG/WebP replies are stored losslessly as PNG
        return buf.getvalue()


def _parse_info(reply: dict) -> dict:
    info = reply.get("info", {})
    if isinstance(info, str):
        try:
            info = json.loads(info)
        except json.JSONDecodeError:
            info = {"raw": info}
    return info if isinstance(info, dict) else {}


def _check_run_file(
    out_dir: str,
    settings: RunSettings,
    concepts: Sequence[ConceptSpec],
    vico_dir: str,
    urls: Sequence[str],
) -> None:
    """Write run.json; refuse to mix images made with other generation settings into one folder."""
    path = os.path.join(out_dir, "run.json")
    current = settings.generation_key()
    old_concepts = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (json.JSONDecodeError, OSError):
            old = {}
        diff = {
            k: (old.get("generation", {}).get(k), v)
            for k, v in current.items()
            if k in old.get("generation", {}) and old["generation"][k] != v
        }
        if diff:
            pretty = ", ".join(f"{k}: {a!r} before, {b!r} now" for k, (a, b) in diff.items())
            raise LayoutRetouchError(
                f"{out_dir} holds images made with other settings ({pretty}). Use the same "
                f"settings to resume, or another --out.",
                parameter="out",
            )
        old_concepts = old.get("concepts", {})
    record = {
        "vico": vico_dir,
        "url": urls[0],
        "urls": list(urls),
        "generation": current,
        "n": settings.n,
        "n_prompts": settings.n_prompts,
        "seed": settings.seed,
        "methods": list(settings.methods),
        "concepts": {**old_concepts, **{c.name: c.to_json() for c in concepts}},
    }
    _atomic_write(path, json.dumps(record, indent=2).encode("utf-8"))


@dataclass
class _Job:
    index: int  # place in the sweep's order
    spec: ConceptSpec
    prompt_index: int
    template: str
    seed: int
    method: str

    def describe(self) -> str:
        return f"{self.spec.name} / prompt {self.prompt_index} / seed {self.seed} / {self.method}"


@dataclass
class _Server:
    client: WebUIClient
    has_script: bool = True
    loaded: str | None = None  # the checkpoint this run last sent it (None: not known)
    alive: bool = True
    served: int = 0
    error: str = ""


class Dispatcher:
    """Hands the sweep's requests to the WebUIs, each concept's checkpoint kept where it is loaded.

    A server first gets more of the checkpoint it was last sent; otherwise the earliest request whose
    checkpoint no other live server holds (no two servers load the same weights while others wait);
    only when every checkpoint left is held elsewhere does it help with one of those. Requests
    without a checkpoint (Textual Inversion, LoRA) run on whatever is loaded. A request given back
    (its server stopped answering) goes to the front of its queue. `take` waits while requests are in
    flight elsewhere (one may come back) and returns None when nothing is left or the run stops.
    """

    def __init__(self, jobs: Sequence[_Job], servers: Sequence[_Server]):
        self.queues: dict[str, list[_Job]] = {}
        for job in jobs:
            self.queues.setdefault(job.spec.checkpoint, []).append(job)
        self.servers = list(servers)
        self.in_flight = 0
        self.stopped = False
        self.cond = threading.Condition()

    def pending(self) -> int:
        with self.cond:
            return sum(len(q) for q in self.queues.values())

    def _pick(self, server: _Server) -> str | None:
        ready = [k for k, q in self.queues.items() if q]
        if not ready:
            return None
        if server.loaded is not None and server.loaded in ready:
            return server.loaded
        held = {s.loaded for s in self.servers if s is not server and s.alive and s.loaded}
        free = [k for k in ready if k == "" or k not in held]
        return min(free or ready, key=lambda k: self.queues[k][0].index)

    def take(self, server: _Server, poll: float = 0.5) -> _Job | None:
        with self.cond:
            while not self.stopped and server.alive:
                key = self._pick(server)
                if key is not None:
                    job = self.queues[key].pop(0)
                    if key:
                        server.loaded = key
                    self.in_flight += 1
                    return job
                if self.in_flight == 0:
                    return None
                self.cond.wait(poll)
            return None

    def finish(self, job: _Job, done: bool) -> None:
        with self.cond:
            self.in_flight -= 1
            if not done:
                queue = self.queues.setdefault(job.spec.checkpoint, [])
                queue.insert(0, job)
                queue.sort(key=lambda j: j.index)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def run_protocol(
    vico_dir: str,
    concepts_path: str,
    url: str | Sequence[str],
    out_dir: str,
    settings: RunSettings | None = None,
    client: WebUIClient | Sequence[WebUIClient] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    per_server: int = 1,
) -> RunSummary:
    """Generate every missing image of the sweep on one or several WebUIs.

    `url` (and `client`) may name several WebUIs: the requests are spread over them, `per_server` in
    flight on each, each concept's checkpoint kept on the server that has it loaded (`Dispatcher`). A
    server that stops answering (its retries spent) is dropped and its requests go to the others.
    Raises LayoutRetouchError when no server is left or a reply shows a wrong setup, after saving
    everything made so far (the message says how many, and that rerunning resumes)."""
    from tqdm import tqdm

    settings = settings or RunSettings()
    _check_run_settings(settings, per_server)
    clients = _clients_for(url, client)
    concepts = load_concepts(concepts_path, vico_dir)
    vico_dir = os.path.abspath(vico_dir)
    out_dir = _make_out_dir(out_dir)
    jobs = _plan_jobs(concepts, vico_dir, settings)
    todo = [
        j
        for j in jobs
        if not image_done(image_path(out_dir, j.method, j.spec.name, j.prompt_index, j.seed))
    ]
    summary = RunSummary(
        out_dir=out_dir, total=len(jobs), generated=0, skipped=len(jobs) - len(todo)
    )
    _check_run_file(out_dir, settings, concepts, vico_dir, [c.url for c in clients])
    say = log or (lambda msg: tqdm.write(msg))
    if not todo:
        return summary
    refs: dict[str, str] = {}  # every reference photo is checked before the first request
    for spec in {j.spec.name: j.spec for j in todo if j.method == "on"}.values():
        refs[spec.name] = encode_reference(spec.reference_image, settings.max_reference_side)
    servers = _probe_servers(clients, todo, summary, say)
    sweep = _Sweep(settings, out_dir, refs, summary, servers, Dispatcher(todo, servers), say)
    sweep.run(per_server, progress)
    return summary


def _check_run_settings(settings: RunSettings, per_server: int) -> None:
    if settings.n < 1:
        raise LayoutRetouchError("--n must be at least 1.", parameter="n")
    if per_server < 1:
        raise LayoutRetouchError("--per-server must be at least 1.", parameter="per_server")
    for name in ("width", "height"):
        v = getattr(settings, name)
        if v < 8 or v % 8:
            raise LayoutRetouchError(
                f"--{name} {v}: Stable Diffusion draws on an 8-pixel latent grid; use a positive "
                f"multiple of 8 (e.g. {max(8, v // 8 * 8)}).",
                parameter=name,
            )
    bad = [m for m in settings.methods if m not in METHODS]
    if bad or not settings.methods:
        raise LayoutRetouchError(
            f"Unknown method(s) {bad} in --methods; use some of {','.join(METHODS)}.",
            parameter="methods",
        )


def _clients_for(
    url: str | Sequence[str], client: WebUIClient | Sequence[WebUIClient] | None
) -> list[WebUIClient]:
    urls = [url] if isinstance(url, str) else list(url)
    clients = [client] if isinstance(client, WebUIClient) else list(client or [])
    if not clients:
        clients = [WebUIClient(u) for u in urls]
    if not clients or len({c.url for c in clients}) != len(clients):
        raise LayoutRetouchError("Give each WebUI once (--url).", parameter="url")
    return clients


def _make_out_dir(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise LayoutRetouchError(
            f"Cannot create output folder {out_dir} ({e}).", parameter="out"
        ) from None
    return out_dir


def _plan_jobs(concepts: list[ConceptSpec], vico_dir: str, settings: RunSettings) -> list[_Job]:
    """Every request of the sweep, in order: concept, prompt, seed, then method (a pair of methods
    stays together)."""
    jobs: list[_Job] = []
    for spec in concepts:
        prompts = read_prompts(vico_dir, spec.live, settings.prompt_set)
        if settings.n_prompts is not None:
            prompts = prompts[: max(0, int(settings.n_prompts))]
        for pi, template in enumerate(prompts):
            for k in range(settings.n):
                for method in settings.methods:
                    jobs.append(_Job(len(jobs), spec, pi, template, settings.seed + k, method))
    return jobs


def _probe_servers(
    clients: list[WebUIClient], todo: list[_Job], summary: RunSummary, say: Callable[[str], None]
) -> list[_Server]:
    """The WebUIs that answer, each knowing whether it has the script; one that does not answer is
    left out (an error when it is the only one)."""
    servers = []
    for c in clients:
        try:
            titles = c.txt2img_scripts()
        except WebUIError as e:
            if len(clients) == 1:
                raise WebUIError(
                    f"{e.args[0]}. Start the WebUI with --api, check --url, then run again. "
                    f"{summary.skipped} of {summary.total} images already on disk.",
                    transient=False,
                ) from None
            say(f"note: {c.url} left out: {e.args[0]}")
            summary.warnings.append(f"{c.url} left out: {e.args[0]}")
            continue
        has_script = (
            titles is None or SCRIPT_TITLE.lower() in titles
        )  # None: an old WebUI without /scripts
        if not has_script:
            if any(j.method == "on" for j in todo):
                raise LayoutRetouchError(
                    f"The WebUI at {c.url} has no '{SCRIPT_TITLE}' txt2img script: install and "
                    f"enable the extension, restart the WebUI, run again.",
                    parameter="url",
                )
            msg = f"note: the WebUI at {c.url} has no '{SCRIPT_TITLE}' script; 'off' requests are sent without it."
            summary.warnings.append(msg)
            say(msg)
        servers.append(_Server(c, has_script=has_script))
    if not servers:
        raise LayoutRetouchError(
            f"None of the WebUIs answered ({', '.join(c.url for c in clients)}): start them with "
            f"--api, check --url, then run again.",
            parameter="url",
        )
    return servers


class _Sweep:
    """The requests of one run in flight: worker threads (`per_server` per WebUI) take jobs from
    the dispatcher, save each image with its sidecar, and drop a WebUI that stops answering."""

    def __init__(self, settings, out_dir, refs, summary, servers, dispatcher, say):
        self.settings = settings
        self.out_dir = out_dir
        self.refs = refs  # concept name -> its reference photo, base64
        self.summary = summary
        self.servers = servers
        self.dispatcher = dispatcher
        self.say = say
        self.lock = threading.Lock()  # summary, bar, `fatal`
        self.fatal: list[BaseException] = []
        self.bar = None

    def run(self, per_server: int, progress: bool) -> None:
        from tqdm import tqdm

        summary = self.summary
        self.bar = tqdm(
            total=summary.total,
            initial=summary.skipped,
            desc="txt2img",
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
        )
        self.bar.set_postfix_str(f"{len(self.servers)} WebUI(s)")
        threads = [
            threading.Thread(
                target=self.work, args=(srv,), name=f"txt2img {srv.client.url} #{i}", daemon=True
            )
            for srv in self.servers
            for i in range(per_server)
        ]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self.dispatcher.stop()  # requests in flight finish (or not); every file written is whole
            raise
        finally:
            self.bar.close()
        if self.fatal:
            raise self.fatal[0]
        self._raise_if_unfinished()

    def _raise_if_unfinished(self) -> None:
        if not self.dispatcher.pending():
            return
        errors = [s.error for s in self.servers if s.error]
        if len(self.servers) == 1:
            what = (
                f"The WebUI failed on {errors[0].split(' failed on ', 1)[1]}"
                if errors
                else "The WebUI stopped"
            )
        else:
            what = f"All {len(self.servers)} WebUIs stopped answering ({'; '.join(errors)})"
        raise LayoutRetouchError(f"{what}. {self.saved()}.", parameter="url")

    def saved(self) -> str:
        s = self.summary
        return (
            f"{s.skipped + s.generated} of {s.total} images are saved in {self.out_dir}; run the same "
            f"command again to resume (or `score` to score what is there)"
        )

    def webui(self, server: _Server) -> str:
        return "The WebUI" + (f" at {server.client.url}" if len(self.servers) > 1 else "")

    def work(self, server: _Server) -> None:
        dispatcher = self.dispatcher
        while True:
            job = dispatcher.take(server)
            if job is None:
                return
            try:
                self.one(server, job)
            except WebUIError as e:
                dispatcher.finish(job, done=False)
                self._webui_failed(server, job, e)
                return
            except BaseException as e:  # a wrong setup (no LR marker) or a bug: stop everything
                dispatcher.finish(job, done=False)
                with self.lock:
                    self.fatal.append(e)
                dispatcher.stop()
                return
            dispatcher.finish(job, done=True)
            with self.lock:
                server.served += 1
                self.summary.generated += 1
                self.bar.update(1)

    def _webui_failed(self, server: _Server, job: _Job, e: WebUIError) -> None:
        """A wrong request (4xx) stops the run: every server would say the same. A server that
        stops answering is dropped; its requests go to the others."""
        with self.lock:
            if not e.transient:
                self.fatal.append(
                    LayoutRetouchError(
                        f"{self.webui(server)} failed on {job.describe()}: {e.args[0]}. {self.saved()}.",
                        parameter="url",
                    )
                )
                self.dispatcher.stop()
                return
            if server.alive:
                server.alive = False
                server.error = f"{server.client.url} failed on {job.describe()}: {e.args[0]}"
                left = sum(s.alive for s in self.servers)
                self.bar.set_postfix_str(f"{left} WebUI(s)")
                if left:
                    self.say(
                        f"{server.client.url} stopped answering ({e.args[0]}); its requests go to the other "
                        f"{left} WebUI(s)."
                    )
        with self.dispatcher.cond:
            self.dispatcher.cond.notify_all()

    def one(self, server: _Server, job: _Job) -> None:
        """One request: the image, its sidecar and the pipeline's mask, written atomically."""
        spec, settings = job.spec, self.settings
        payload = build_payload(
            spec,
            job.template,
            job.seed,
            job.method,
            settings,
            self.refs.get(spec.name, ""),
            include_script=server.has_script,
        )
        reply = server.client.txt2img(payload)
        data = _decode_image(reply["images"][0])
        info = _parse_info(reply)
        infotexts = info.get("infotexts") or []
        infotext = infotexts[0] if infotexts else str(info.get("raw", ""))
        script_ran = self._check_script_ran(server, job, infotext)
        path = image_path(self.out_dir, job.method, spec.name, job.prompt_index, job.seed)
        sidecar = {
            "concept": spec.name,
            "method": job.method,
            "prompt_index": job.prompt_index,
            "template": job.template,
            "prompt": payload["prompt"],
            "seed": job.seed,
            "class": spec.class_phrase,
            "token": spec.token,
            "subject": spec.subject,
            "folder": spec.folder,
            "info_seed": info.get("seed"),
            "infotext": infotext,
            "script_ran": script_ran,
            "extra_images": max(0, len(reply["images"]) - 1),
            "size": list(Image.open(io.BytesIO(data)).size),
            "webui": server.client.url,
        }
        _atomic_write(
            os.path.splitext(path)[0] + ".json", json.dumps(sidecar, indent=1).encode("utf-8")
        )
        mask = pipeline_mask(reply, payload)
        if mask is not None:
            _atomic_write(mask_path_for(path), mask)
        _atomic_write(path, data)  # last: the image's presence is what "done" means

    def _check_script_ran(self, server: _Server, job: _Job, infotext: str) -> bool | None:
        """For an "on" image: whether the infotext carries the marker (None when not checked);
        without it the script did not run and the run stops."""
        marker = self.settings.on_marker
        if job.method != "on" or not marker:
            return None
        if marker.lower() in infotext.lower():
            return True
        s = self.summary
        raise LayoutRetouchError(
            f"{self.webui(server)} answered {job.spec.name} / prompt {job.prompt_index} / seed {job.seed} / on with an "
            f"image whose infotext has no '{marker}': Layout-and-Retouch did not run "
            f"(the WebUI hides script errors; its console says why, e.g. a wrong "
            f"vanilla_checkpoint). That image was not saved; "
            f"{s.skipped + s.generated} of {s.total} are in {self.out_dir}. "
            f"Fix the concept file and run again (--on-marker '' turns this check off).",
            parameter="concepts",
        )
