"""What a model family supplies to the retouch loop (`pipeline.retouch`), so one loop serves every
family: ε-prediction UNets with DDIM today (`EPS_UNET`), others (a DiT with joint attention and a
flow-matching sampler) by supplying their own `ModelFamily`.

The loop (Algorithm 1) only ever:
- asks the family's `Sampler` for the model-time of step s, the inversion level a path is re-set
  to before step s, the model's prediction for a batch, CFG, one sampling step and an inversion;
- asks the family for its layer table, a retouch editor (`attention.RetouchAttention` with the
  family's `RetouchProcessor`) and a context manager that routes the model's attention through
  that editor and always restores it;
- hands the editor one `attention.StepState` per model call and reads its results back.

Levels are counted as in `ddim`: level 0 is the clean latent, level T the noisiest; step s
(1 … T, denoising order) goes from level T−s+1 to level T−s; `invert` returns levels 0 … T.
A model names its family by a `retouch_family` attribute; without one it is an ε-UNet.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional, Protocol, Sequence

import torch

from ..unet.attention import COND, UNCOND, RetouchAttention, patched_attention
from ..unet.ddim import DDIMSampler
from ..unet.layers import LayerTable, layer_table_for

# (step, total)
StepCallback = Callable[[int, int], None]


class Sampler(Protocol):
    steps: int

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
    def sampler(self, model, steps: int, latent_hw=None) -> Sampler:
        """`latent_hw`: the latent's size, for samplers whose schedule depends on it (Flux's shift)."""

    # Optional: `halves(guidance_scale)` — the CFG halves every call carries (default both;
    # `family_halves`). Optional on the sampler: `midpoint(x, prediction, s)` and
    # `time_of_midpoint(s)` — a second-order step: the loop evaluates every path again half a step
    # on (same phase and edits) and `step`s with that prediction.

    def layer_table(self, model, preset: str) -> LayerTable: ...

    def editor(
        self,
        layers: LayerTable,
        subject_tokens: Sequence[int],
        latent_hw: tuple[int, int],
        n_references: int,
    ) -> RetouchAttention: ...

    def patched(self, model, editor: RetouchAttention) -> ContextManager[None]: ...


class EpsUNetFamily:
    """SD1.x / SDXL: an ε-prediction UNet (ldm attention modules), DDIM."""

    def sampler(self, model, steps: int, latent_hw=None) -> Sampler:
        return DDIMSampler.for_model(model, steps)

    def layer_table(self, model, preset: str) -> LayerTable:
        return layer_table_for(model.unet, preset)

    def editor(self, layers, subject_tokens, latent_hw, n_references) -> RetouchAttention:
        return RetouchAttention(layers, subject_tokens, latent_hw, n_references=n_references)

    def patched(self, model, editor: RetouchAttention) -> ContextManager[None]:
        return patched_attention(model.unet, editor)


EPS_UNET = EpsUNetFamily()


def family_of(model) -> ModelFamily:
    return getattr(model, "retouch_family", None) or EPS_UNET


def family_halves(family, guidance_scale: float) -> tuple[str, ...]:
    """The CFG halves of every model call: the family's choice, else both (uncond, cond)."""
    halves = getattr(family, "halves", None)
    return tuple(halves(guidance_scale)) if halves is not None else (UNCOND, COND)
