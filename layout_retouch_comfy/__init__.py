"""Layout-and-Retouch as ComfyUI nodes: a thin adapter over `lib_layout_retouch` (docs/comfyui.md).

`nodes` and `glue` import ComfyUI; `inputs`, `tensors` and `run` do not (the tests drive them)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
