"""A checkpoint's UNet architecture from its file's header, without loading a tensor.

A `.safetensors` file starts with an 8-byte length and a JSON header naming every tensor with its
shape: enough to tell whether a file's UNet can stand in for the loaded model's (the vanilla
checkpoint of a DreamBooth model has exactly its UNet's keys and shapes) before reading gigabytes.
Other formats (pickled `.ckpt`) cannot be read without loading: they are `None` (unknown).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Mapping, Optional

from .dit.flux.family import FLUX_FAMILY
from .unet.family import SD1_FAMILY, SDXL_FAMILY

UNET_PREFIX = "model.diffusion_model."
MAX_HEADER = 100 * 2**20  # a real header is a few MB at most


@dataclass(frozen=True)
class _Shape:
    shape: tuple


_CACHE: dict[tuple, Optional[dict]] = {}


def unet_shapes(path: str, prefix: str = UNET_PREFIX) -> Optional[dict[str, tuple]]:
    """{UNet key without `prefix`: shape} from a .safetensors header; None when the file is no
    readable .safetensors (other formats, damaged files)."""
    if not str(path).lower().endswith(".safetensors"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size, prefix)
    if key not in _CACHE:
        _CACHE[key] = _read(path, prefix)
    return _CACHE[key]


def _read(path: str, prefix: str) -> Optional[dict[str, tuple]]:
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if not 0 < n <= MAX_HEADER:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    return {
        k[len(prefix) :]: tuple(v["shape"])
        for k, v in header.items()
        if k.startswith(prefix) and isinstance(v, dict) and "shape" in v
    }


def unet_family(state: dict) -> str:
    """'SDXL' or 'SD1.x'/'SD2.x' (or 'Flux': a BFL transformer's double blocks) from a UNet state dict
    (keys without `model.diffusion_model.`):
    SDXL's UNet takes the pooled-text/size vector through `label_emb`; SD1 and SD2 differ in their
    text width (768 vs 1024)."""
    if any(k.startswith("double_blocks.") for k in state):
        return FLUX_FAMILY
    if any(k.startswith("label_emb.") for k in state):
        return SDXL_FAMILY
    widths = {tuple(v.shape)[-1] for k, v in state.items() if k.endswith("attn2.to_k.weight")}
    if widths == {1024}:
        return "SD2.x"
    return SD1_FAMILY


def family(shapes: Mapping[str, tuple]) -> str:
    """`unet_family` of a shapes-only UNet."""
    return unet_family({k: _Shape(tuple(s)) for k, s in shapes.items()})


def unet_mismatch(file_shapes: Mapping[str, tuple], own_shapes: Mapping[str, tuple]) -> str:
    """Why a file's UNet cannot stand in for the loaded one ("" when it can)."""
    loaded = family(own_shapes)
    if not file_shapes:
        return f"has no SD UNet weights (model.diffusion_model.*): choose an {loaded} checkpoint"
    theirs = family(file_shapes)
    if theirs != loaded:
        return f"is an {theirs} model but the loaded model is {loaded}"
    differ = [k for k in own_shapes if tuple(file_shapes.get(k, ())) != tuple(own_shapes[k])]
    if differ or len(file_shapes) != len(own_shapes):
        return f"is an {theirs} model of another size than the loaded one ({len(differ)} UNet weights differ)"
    return ""
