"""Stage 1's vanilla text encoder (DreamBooth).

DreamBooth training often fine-tunes the text encoder too. Stage 1's vanilla steps should then read
y_p⁻ through the *vanilla* checkpoint's text encoder — what the vanilla UNet understands — not the
personalized one's. The host's encoder object stays in place (so its prompt syntax, emphasis,
BREAK, long prompts and embeddings still apply); only its inner transformer is swapped, by
reference, for a copy holding the vanilla checkpoint's weights.

Where the weights live in a checkpoint (`TEXT_ENCODER_PREFIXES`) and how the host names the slots
is data; the swap is a context manager that always restores.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Mapping, Sequence

import torch

from ..errors import LayoutRetouchError

# Where each text transformer's weights live in a checkpoint (ldm / sgm key prefixes), by the
# transformer's attribute in its encoder: SD1's CLIP-L, SD2's OpenCLIP, SDXL's CLIP-L and OpenCLIP-G.
TEXT_ENCODER_PREFIXES = {
    "sd1": "cond_stage_model.transformer.",
    "sd2": "cond_stage_model.model.",
    "sdxl_clip_l": "conditioner.embedders.0.transformer.",
    "sdxl_clip_g": "conditioner.embedders.1.model.",
}

# A slot: (the module holding the transformer, its attribute name, the checkpoint key prefix).
Slot = tuple[torch.nn.Module, str, str]

# The WebUI wraps token embeddings (Textual-Inversion "fixes") in a module whose parameters sit under
# `.wrapped.`; the checkpoint names them without it.
_HOST_WRAPPER = ".wrapped."


def checkpoint_key(own_key: str, prefix: str) -> str:
    return prefix + own_key.replace(_HOST_WRAPPER, ".")


def copy_with_weights(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], prefix: str, checkpoint_name: str
) -> torch.nn.Module:
    """A copy of `module` (a text transformer of the loaded model) with the weights found under
    `prefix` in `state` (another checkpoint's state dict). Every parameter must be there with its
    shape; buffers the checkpoint lacks (e.g. `position_ids`) keep the module's."""
    own = module.state_dict()
    params = {n for n, _ in module.named_parameters()}
    new_state, missing = {}, []
    for key, value in own.items():
        found = state.get(checkpoint_key(key, prefix))
        if found is None or tuple(found.shape) != tuple(value.shape):
            if key in params:
                missing.append(key)
            new_state[key] = value
        else:
            new_state[key] = found.to(value.dtype)
    if missing:
        raise LayoutRetouchError(
            f"vanilla checkpoint '{checkpoint_name}' has no text encoder matching the loaded model's "
            f"({len(missing)} weights under '{prefix}' missing or of another shape); set stage1_text_encoder "
            "to 'loaded' to use the loaded model's",
            parameter="stage1_text_encoder",
        )
    clone = copy.deepcopy(module)
    for m in clone.modules():  # a per-instance patch must not be copied along
        m.__dict__.pop("forward", None)
    clone.load_state_dict(new_state)
    return clone.eval().requires_grad_(False)


@contextlib.contextmanager
def swapped(slots: Sequence[Slot], replacements: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Put each replacement in its slot for the block (by reference); every slot restored on any exit."""
    previous = []
    try:
        for (holder, attr, _prefix), new in zip(slots, replacements):
            previous.append((holder, attr, getattr(holder, attr)))
            setattr(holder, attr, new)
        yield
    finally:
        for holder, attr, old in reversed(previous):
            setattr(holder, attr, old)
