"""Test-only ComfyUI custom node (the ComfyUI tier links it into custom_nodes/ beside ours): lets the
Layout-and-Retouch SAM loader read the tier's tiny random SAM (`tests/fixtures/sam.py`) — the kind
`tiny` in `SAM_BUILDERS`, told from a file by its image encoder's width, as the official ViT-B / L / H
kinds are. It adds no node; nothing of it ships."""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.realpath(__file__))  # <repo>/tests/host/comfy/tiny_sam_node
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(_HERE))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)
# by its path: a top-level `tests` is ComfyUI's own tests package in ComfyUI's process
_spec = importlib.util.spec_from_file_location(
    "layout_retouch_tiny_sam", os.path.join(_REPO, "tests", "fixtures", "sam.py")
)
_sam = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sam)

from lib_layout_retouch import segmentation  # noqa: E402

segmentation.SAM_BUILDERS[_sam.TINY_KIND] = _sam.build_tiny_sam
segmentation._KIND_BY_EMBED_DIM[_sam.TINY_EMBED_DIM] = _sam.TINY_KIND

NODE_CLASS_MAPPINGS: dict = {}
