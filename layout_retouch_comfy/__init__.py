"""Layout-and-Retouch as ComfyUI nodes: a thin adapter over `lib_layout_retouch` (docs/comfyui.md).

`nodes` and `glue` import ComfyUI; `inputs`, `tensors` and `run` do not (the tests drive them), so
the mappings are loaded on first use."""

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name):
    if name in __all__:
        from layout_retouch_comfy import nodes

        return getattr(nodes, name)
    raise AttributeError(name)
