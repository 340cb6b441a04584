"""M^SAM: the subject's Segment-Anything mask in the layout image, prompted from M^c.

A thin wrapper over the official `segment_anything` package. Checkpoints are read with
`torch.load(weights_only=True)` ourselves: the package's own loader unpickles arbitrary objects.
No SAM file is a supported setup: `load_segmenter(None)` returns None and the pipeline uses M^c
alone (and says so).
"""

from __future__ import annotations

import functools
import os
import re
import threading
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import masks
from .errors import LayoutRetouchError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

SAM_KINDS = ("vit_b", "vit_l", "vit_h")
_KINDS_TEXT = ", ".join(SAM_KINDS[:-1]) + " or " + SAM_KINDS[-1]  # "vit_b, vit_l or vit_h"
OFFICIAL_SAM_FILES = ("sam_vit_b_01ec64.pth", "sam_vit_l_0b3195.pth", "sam_vit_h_4b8939.pth")


def _registry_builder(kind: str):
    from segment_anything import sam_model_registry

    # checkpoint=None: build random weights; we load the file ourselves (weights_only).
    return sam_model_registry[kind](checkpoint=None)


# kind -> builder of an untrained Sam of that architecture. Tests add tiny kinds here.
SAM_BUILDERS: dict[str, Callable[[], "Sam"]] = {
    k: functools.partial(_registry_builder, k) for k in SAM_KINDS
}

# Image-encoder width of each official kind, to tell the kind of a file that was renamed.
_KIND_BY_EMBED_DIM = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}

# Other SAM families whose files look alike but whose architecture `segment_anything` lacks.
_UNSUPPORTED_VARIANTS = (
    ("mobile", "MobileSAM"),
    ("hq", "HQ-SAM"),
    ("efficient", "EfficientSAM"),
    ("fastsam", "FastSAM"),
    ("edge", "EdgeSAM"),
    ("sam2", "SAM 2"),
    ("sam_2", "SAM 2"),
    ("hiera", "SAM 2"),
)


def _supported_files_hint() -> str:
    return "use one of the official Segment Anything checkpoints: " + ", ".join(OFFICIAL_SAM_FILES)


def _unsupported_variant(name: str) -> str | None:
    tokens = set(re.split(r"[^a-z0-9]+", name)) | {name}
    for marker, family in _UNSUPPORTED_VARIANTS:
        if marker in tokens or (
            marker in ("sam2", "sam_2", "mobile", "fastsam") and marker in name
        ):
            return family
    return None


def sam_kind_from_filename(path: str) -> str:
    """'sam_vit_b_01ec64.pth' -> 'vit_b'. Other SAM families, or names with no kind, are errors."""
    name = os.path.basename(str(path)).lower()
    family = _unsupported_variant(name)
    if family is not None:
        raise LayoutRetouchError(
            f"SAM file '{os.path.basename(path)}' looks like a {family} checkpoint, which this extension "
            f"does not support; {_supported_files_hint()}.",
            parameter="sam_model",
        )
    letters = "".join(kind[-1] for kind in SAM_KINDS)  # vit_b → b
    m = re.search(rf"vit[_-]?([{letters}])(?![a-z])", name)
    if m is None:
        raise LayoutRetouchError(
            f"cannot tell the SAM model kind ({_KINDS_TEXT}) from the file name "
            f"'{os.path.basename(path)}'; keep the official name ({', '.join(OFFICIAL_SAM_FILES)}) "
            f"or choose the kind explicitly.",
            parameter="sam_model",
        )
    return "vit_" + m.group(1)


def _kind_from_state_dict(state_dict: dict, path: str) -> str:
    w = state_dict.get("image_encoder.patch_embed.proj.weight")
    kind = (
        _KIND_BY_EMBED_DIM.get(int(w.shape[0]))
        if isinstance(w, torch.Tensor) and w.ndim == 4
        else None
    )
    if kind is None:
        raise LayoutRetouchError(
            f"'{path}' is not a Segment Anything ViT checkpoint (no {'/'.join(SAM_KINDS)} image encoder "
            f"found); {_supported_files_hint()}.",
            parameter="sam_model",
        )
    return kind


def _read_state_dict(path: str) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to unpickle means: not a usable checkpoint
        raise LayoutRetouchError(
            f"'{path}' is not a SAM checkpoint (corrupt or not a .pth state dict): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} -- {_supported_files_hint()}.",
            parameter="sam_model",
        ) from e
    # Some training repos wrap the weights: {"model": state_dict} / {"state_dict": ...}.
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise LayoutRetouchError(
            f"'{path}' is not a SAM checkpoint (corrupt or not a .pth state dict); {_supported_files_hint()}.",
            parameter="sam_model",
        )
    return obj


def load_sam(path: str, kind: str | None = None, device: str | torch.device = "cpu"):
    """Build the `kind` architecture (from the file name when None) and load `path` into it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LayoutRetouchError(
            f"SAM checkpoint '{path}' does not exist; download one ({', '.join(OFFICIAL_SAM_FILES)}) "
            f"or choose 'None' to use the cross-attention mask alone.",
            parameter="sam_model",
        )
    if kind is None:
        try:
            kind = sam_kind_from_filename(path)
        except LayoutRetouchError:
            if _unsupported_variant(os.path.basename(path).lower()) is not None:
                raise
            kind = None  # renamed file: tell the kind from its weights below
    state_dict = _read_state_dict(path)
    if kind is None:
        kind = _kind_from_state_dict(state_dict, path)
    if kind not in SAM_BUILDERS:
        raise LayoutRetouchError(
            f"unknown SAM model kind '{kind}'; choose one of {', '.join(SAM_BUILDERS)}.",
            parameter="sam_model",
        )
    sam = SAM_BUILDERS[kind]()
    try:
        sam.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        problems = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()][:3]
        raise LayoutRetouchError(
            f"SAM checkpoint '{path}' does not fit the SAM kind '{kind}' ({'; '.join(problems)[:400]}); "
            f"choose the kind the file was made for, or {_supported_files_hint()}.",
            parameter="sam_model",
        ) from e
    return sam.eval().to(device)


class SubjectSegmenter:
    """Segments the subject of a layout image with SAM, prompted by box + peaks of M^c."""

    def __init__(self, sam, device: str | torch.device = "cpu"):
        from segment_anything import SamPredictor

        self.device = torch.device(device)
        self.sam = sam.eval().to(self.device)
        self.predictor = SamPredictor(self.sam)

    @torch.no_grad()
    def segment(self, image: np.ndarray, norm_map: np.ndarray, ca_mask: np.ndarray) -> np.ndarray:
        """M^SAM (H, W) bool of the highest-scoring of SAM's three masks; all False if M^c is empty."""
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
        H, W = img.shape[:2]
        ca = np.asarray(ca_mask, dtype=bool)
        if not ca.any():
            return np.zeros((H, W), dtype=bool)
        box, points = masks.sam_prompts_from_ca(norm_map, ca, (H, W))
        self.predictor.set_image(np.ascontiguousarray(img), image_format="RGB")
        try:
            out, scores, _ = self.predictor.predict(
                point_coords=points,
                point_labels=np.ones(len(points), dtype=np.int64),
                box=box,
                multimask_output=True,
            )
        finally:
            self.predictor.reset_image()  # drop the image embedding between images
        return np.asarray(out[int(np.argmax(scores))], dtype=bool)


_cache_lock = threading.Lock()
_cache: tuple[tuple, SubjectSegmenter] | None = None


def clear_sam_cache() -> None:
    """Forget the cached SAM model so its memory can be freed."""
    global _cache
    with _cache_lock:
        _cache = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_segmenter(
    path: str | None, device: str | torch.device = "cpu", kind: str | None = None
) -> SubjectSegmenter | None:
    """SubjectSegmenter for the SAM file at `path`; None for no SAM (None, "" or "none").

    The last model stays cached (one entry, keyed by file identity and device) so that a batch or
    a series of generations loads it from disk once; a changed file is reloaded.
    """
    global _cache
    if path is None or str(path).strip() == "" or str(path).strip().lower() == "none":
        return None
    path = os.fspath(path)
    if not os.path.isfile(path):
        load_sam(path, kind, device)  # raises the user-facing error
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, str(torch.device(device)), kind)
    with _cache_lock:
        if _cache is not None and _cache[0] == key:
            return _cache[1]
        _cache = None  # free the old model before loading a new one
        seg = SubjectSegmenter(load_sam(path, kind, device), device)
        _cache = (key, seg)
        return seg


SAM_EXTENSIONS = (".pth", ".pt", ".safetensors")


def find_sam_checkpoints(folders) -> dict[str, str]:
    """SAM checkpoints in `folders` (not recursive), file name → path; the first folder wins on a
    name clash. The UI and API choose by NAME from this listing: a path from API input is never opened."""
    found: dict[str, str] = {}
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.lower().endswith(SAM_EXTENSIONS) and os.path.isfile(path) and name not in found:
                found[name] = path
    return found
