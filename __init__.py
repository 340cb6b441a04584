"""ComfyUI custom-node entry point (ComfyUI imports this file from custom_nodes/<this repo>/).

The A1111/Forge extension does not use it (the WebUIs load scripts/). Outside ComfyUI — pytest, which
imports the repository root as a package because this file exists — it defines empty mappings and
imports nothing, so the library's tests never need ComfyUI.
"""

import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if "comfy.model_management" in sys.modules:  # inside ComfyUI (nodes.py imported it already)
    _root = os.path.dirname(os.path.abspath(__file__))
    if _root not in sys.path:  # lib_layout_retouch and layout_retouch_comfy are top-level packages
        sys.path.insert(0, _root)
    from layout_retouch_comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
