"""Installing the editor on a network: per-instance forwards that always restore.

The family's patch (`unet.attention.patched_attention`, `dit.flux.blocks.patched_blocks`) gives each
named module an instance `forward` that routes through the editor. Instance attributes survive a
host that swaps the CLASS forward meanwhile (A1111 does whenever the attention optimisation
changes), and on any exit — normal, exception or KeyboardInterrupt — each module gets back exactly
what it had before (or nothing, so the class forward applies again).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


class AttentionAlreadyPatched(RuntimeError):
    pass


@contextlib.contextmanager
def forwards_replaced(modules: dict, editor, make_wrapper: Callable) -> Iterator[None]:
    """Give each named module an instance `forward` = make_wrapper(name, module, editor, previous
    own forward or None) while the block runs. On any exit each module gets back exactly its
    previous instance attribute (or none); a module already patched by us is refused."""
    installed: list[tuple[torch.nn.Module, bool, object]] = []
    try:
        for name, module in modules.items():
            if getattr(module.__dict__.get("forward"), "_layout_retouch", False):
                raise AttentionAlreadyPatched(f"{name} is already patched by Layout-and-Retouch")
            had_own = "forward" in module.__dict__
            previous = module.__dict__.get("forward")
            module.forward = make_wrapper(name, module, editor, previous if had_own else None)
            installed.append((module, had_own, previous))
        yield
    finally:
        for module, had_own, previous in reversed(installed):
            if had_own:
                module.forward = previous
            else:
                del module.forward


def mark(forward: Callable) -> Callable:
    """Mark a wrapper as ours (a second patch of the same module is refused)."""
    forward._layout_retouch = True  # type: ignore[attr-defined]
    return forward
