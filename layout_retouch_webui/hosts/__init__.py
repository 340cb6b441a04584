"""Host adapters: what the glue needs from the WebUI, answered once per host.

The library talks to a model through `LdmModel`'s interface (ε at timestep t, ᾱ, text encoding,
VAE); the glue also needs to swap the UNet for stage 1, switch a LoRA off and on, read checkpoint
files and list them. AUTOMATIC1111 and Forge answer each of these differently (Forge wraps the UNet
in a `UnetPatcher`, predicts the denoised image on a σ scale, bakes LoRA into patcher clones), so each
has its adapter (`a1111.A1111Host`, `forge.ForgeHost`) with the same methods, and the rest of the glue
never asks which host it runs in.
"""

from __future__ import annotations

import functools

from layout_retouch_webui.hosts.base import Host


@functools.lru_cache(maxsize=1)
def current() -> Host:
    """The adapter of the WebUI this process runs (Forge has a `backend` package and
    `modules_forge`; AUTOMATIC1111 has neither)."""
    try:
        import modules_forge  # noqa: F401

        is_forge = True
    except ImportError:
        is_forge = False
    if is_forge:
        from layout_retouch_webui.hosts.forge import ForgeHost

        return ForgeHost()
    from layout_retouch_webui.hosts.a1111 import A1111Host

    return A1111Host()


__all__ = ["Host", "current"]
