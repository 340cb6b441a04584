"""The model-family contract: everything that differs between model families, so that one loop
(`retouch.loop`), one stage 1 (`stage1`) and the hosts' glue serve every family without asking
which one they hold. A family is one folder supplying this contract: `unet/` (SD1.x, SDXL: ε-UNets,
DDIM), `dit/flux/` (Flux.1: a joint-attention DiT, rectified flow).

A model (the adapter over a host's model objects) names its family by its `family` attribute. The
loop and stage 1 only ever:
- ask the family for its `Sampler`: the model-time of step s, the inversion level a path is re-set
  to before step s, the model's prediction for a batch, CFG, one sampling step (and, for a second-
  order sampler, the midpoint evaluation) and an inversion;
- ask the family for the conditionings of the three paths (`encode_conds`), a prompt's
  conditioning (`conditioning`: stage 1's y_p⁻), the subject's conditioning rows
  (`subject_tokens`), the CFG halves every call carries (`halves`) and stage 1's vanilla model
  (`vanilla`: a context in which the model is the vanilla one);
- ask the family for its layer table, a retouch editor (`retouch.editor.RetouchEditor` with the
  family's processor) and a context manager that routes the model's attention through that editor
  and always restores it;
- hand the editor one `retouch.editor.StepState` per model call and read its results back.

Levels are counted as in DDIM: level 0 is the clean latent, level T the noisiest; step s
(1 … T, denoising order) goes from level T−s+1 to level T−s; `invert` returns levels 0 … T.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional, Protocol, Sequence

import torch

from .conds import RetouchConds
from .editor import RetouchEditor
from .layers import LayerTable

# (step, total)
StepCallback = Callable[[int, int], None]
ImageSize = tuple[int, int]  # (width, height) in pixels


class Sampler(Protocol):
    steps: int
    second_order: bool  # True: `midpoint`/`time_of_midpoint` exist (a second evaluation per step)

    def time_of_step(self, s: int):
        """The time value the model is called with at denoising step s (a timestep, a σ, a t)."""

    def level_before_step(self, s: int) -> int:
        """The inversion level a path sits at before step s (T−s+1)."""

    def predict(self, model, x: torch.Tensor, t, cond) -> torch.Tensor:
        """The model's output for a batch x at time t (ε, a velocity, …) that `step` consumes."""

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance of two predictions."""

    def step(self, x: torch.Tensor, prediction: torch.Tensor, s: int) -> torch.Tensor:
        """One sampling step s: level T−s+1 → T−s."""

    def invert(
        self,
        predict: Callable[[torch.Tensor, object], torch.Tensor],
        z0: torch.Tensor,
        callback: Optional[StepCallback] = None,
    ) -> list[torch.Tensor]:
        """Deterministic inversion of z0 with `predict(x, t)`: levels [z_0, …, z_T]."""


class ModelFamily(Protocol):
    name: str  # what the user reads: "SD1.x", "SDXL", "Flux"

    def sampler(self, model, steps: int, latent_hw: Sequence[int]) -> Sampler:
        """`latent_hw`: the latent's size, for samplers whose schedule depends on it (Flux's shift)."""

    def halves(self, guidance_scale: float) -> tuple[str, ...]:
        """The CFG halves every model call carries (`editor.UNCOND`, `editor.COND`)."""

    def encode_conds(
        self,
        model,
        prompts,
        negative_prompt: str = "",
        *,
        image_size: Optional[ImageSize] = None,
        reference_size=None,
        reference_subjects: Optional[Sequence[int]] = None,
    ) -> RetouchConds:
        """y_r, y_p and the negative prompt for the three paths (`prompts`: prompts.RetouchPrompts).
        `image_size`: the generation's; `reference_size`: how each reference photo was prepared
        (`conditioning.SizeTerms`, one or a list; what a family with size conditioning reads).
        `reference_subjects`: several subjects — each photo's subject: the reference rows take
        their subject's y_r (one row per photo), the target the y_r naming every subject."""

    def conditioning(self, model, texts: Sequence[str], *, image_size: Optional[ImageSize] = None):
        """The conditioning of `texts` at the generation's size (stage 1's y_p⁻)."""

    def subject_tokens(self, model, prompt: str, phrases: Sequence[str]) -> list[int]:
        """The conditioning rows of the subject's words in `prompt` (what the maps read)."""

    def vanilla(self, model, network: Optional[torch.nn.Module] = None) -> ContextManager:
        """Stage 1's vanilla model: a context in which `model` is the vanilla one (`network` in
        place of its denoising network, or the host's own switch: a LoRA off)."""

    def layer_table(self, model, preset: str) -> LayerTable: ...

    def editor(
        self,
        model,
        layers: LayerTable,
        subject_tokens: Sequence[int],
        latent_hw: tuple[int, int],
        n_references: int,
    ) -> RetouchEditor: ...

    def patched(self, model, editor: RetouchEditor) -> ContextManager[None]: ...


def family_of(model) -> ModelFamily:
    family = getattr(model, "family", None)
    if family is None or isinstance(family, str):
        raise TypeError(
            f"{type(model).__name__} names no model family (a `family` object of the contract in "
            "retouch/family.py)"
        )
    return family
