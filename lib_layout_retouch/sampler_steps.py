"""How many steps, and model evaluations, the host's sampler really makes — what λ1 counts.

Stage 1 switches models inside the host's own sampler, in the callback the host calls before every
model evaluation (`CFGDenoiser.step` counts them). So λ1 is counted in the steps that sampler really
runs, which is not always the slider's value. From A1111 v1.10.1 `modules/sd_samplers_*.py`:

- **timestep samplers** (DDIM, DDIM CFG++, PLMS, UniPC) take `range(0, 1000, 1000 // n) + 1`
  (n = steps, +1 with "discard penultimate sigma"): L = ⌈1000 / (1000 // n)⌉ timesteps; img2img keeps
  the first `t_enc` of them. DDIM/DDIM CFG++ loop `L − 1` times, one model call each (so DDIM at 10
  steps runs 9). PLMS loops `L − 1` times and calls the model twice in its first step. UniPC runs
  L steps with L calls (call k at the start of step k; the last step has no corrector call).
- **k-diffusion samplers** step over `len(sigmas) − 1` = n intervals (img2img: `t_enc + 1`), one
  model call per step; the **second-order** ones (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE) call it
  twice per step, once in the last step (σ_next = 0).
- DPM fast, DPM adaptive and Restart decide their model calls as they run: unknown beforehand.

λ1 counts **sampler steps**: the vanilla model draws the first λ1 steps with every model call in
them (a second-order step is not split between two models), so with Heun λ1 = 2 is 4 calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TRAIN_TIMESTEPS = 1000  # A1111's timestep samplers hard-code 1000

DDIM_LIKE = "timesteps"  # one call per step, L − 1 steps
PLMS = "plms"  # L − 1 steps, two calls in the first
UNIPC = "unipc"  # L steps, one call each
FIRST_ORDER = "k-diffusion"  # one call per step
SECOND_ORDER = "k-diffusion 2nd order"  # two calls per step, one in the last
UNKNOWN = "unknown"

FAMILY_WORDS = {
    DDIM_LIKE: "a timestep sampler: it stops one step early",
    PLMS: "a timestep sampler: it stops one step early",
    UNIPC: "a timestep sampler",
    FIRST_ORDER: "one model call per step",
    SECOND_ORDER: "two model calls per step",
    UNKNOWN: "its model calls are decided while it runs",
}


def timestep_count(steps: int, discard_penultimate: bool = False) -> int:
    """Length of A1111's `get_timesteps(p, steps)`: ⌈1000 / (1000 // n)⌉."""
    n = steps + (1 if discard_penultimate else 0)
    return math.ceil(TRAIN_TIMESTEPS / (TRAIN_TIMESTEPS // n))


@dataclass(frozen=True)
class SamplerSteps:
    """What the host's sampler will run: `steps` sampler steps (what λ1 counts), `evaluations`
    model calls; `sampler` names it for messages, `requested` is the slider's steps."""

    sampler: str
    family: str
    steps: int | None  # None: not known before sampling
    requested: int

    @property
    def known(self) -> bool:
        return self.steps is not None

    @property
    def evaluations(self) -> int | None:
        if self.steps is None:
            return None
        if self.family == PLMS:
            return self.steps + 1
        if self.family == SECOND_ORDER:
            return 2 * self.steps - 1
        return self.steps

    def step_of(self, evaluation: int) -> int:
        """The (1-based) sampler step of the (1-based) model call `evaluation`."""
        if self.family == PLMS:
            return max(1, evaluation - 1)
        if self.family == SECOND_ORDER:
            return (evaluation + 1) // 2
        return evaluation

    def calls_in_first(self, steps: int) -> int:
        """Model calls in the first `steps` sampler steps (< self.steps)."""
        if self.family == PLMS:
            return steps + 1 if steps >= 1 else 0
        if self.family == SECOND_ORDER:
            return 2 * steps
        return steps

    def words(self) -> str:
        """ "DDIM runs 9 steps for 10 (a timestep sampler: it stops one step early)", or ""
        when it runs the slider's steps one call each."""
        if not self.known:
            return f"{self.sampler} decides its model calls while it runs"
        calls = self.evaluations
        differs = self.steps != self.requested
        if not differs and calls == self.steps:
            return ""
        text = f"{self.sampler} runs {self.steps} step{'s' if self.steps != 1 else ''}"
        if differs:
            text += f" for {self.requested}"
        if calls != self.steps:
            text += f", {calls} model calls"
        why = FAMILY_WORDS[self.family]
        if self.family in (DDIM_LIKE, PLMS) and self.steps > self.requested:
            # 1000 // n rounds the spacing down: more timesteps than asked (60 → 62)
            why = f"a timestep sampler: its timesteps are {TRAIN_TIMESTEPS // self.requested} apart"
        elif self.family in (DDIM_LIKE, PLMS) and self.steps != self.requested - 1:
            why = FAMILY_WORDS[UNIPC]  # img2img: the strength, not the early stop, sets the count
        return f"{text} ({why})"


def sampler_steps(
    sampler: str,
    family: str,
    steps: int,
    *,
    img2img_t_enc: int | None = None,
    img2img_steps: int | None = None,
    discard_penultimate: bool = False,
    requested: int | None = None,
) -> SamplerSteps:
    """The steps `sampler` of `family` runs at `steps` (txt2img), or in img2img with the WebUI's
    `setup_img2img_steps` result (`img2img_steps`, `img2img_t_enc`)."""
    requested = steps if requested is None else requested
    if family == UNKNOWN:
        return SamplerSteps(sampler, family, None, requested)
    if family in (DDIM_LIKE, PLMS, UNIPC):
        n = img2img_steps if img2img_t_enc is not None else steps
        length = timestep_count(n, discard_penultimate) if n >= 1 else 0
        if img2img_t_enc is not None:
            length = min(length, img2img_t_enc)
        run = length if family == UNIPC else length - 1
    else:
        run = steps if img2img_t_enc is None else img2img_t_enc + 1
    return SamplerSteps(sampler, family, max(run, 0), requested)


def img2img_t_enc(steps: int, denoising_strength: float, fix_steps: bool) -> tuple[int, int]:
    """A1111 `sd_samplers_common.setup_img2img_steps` → (steps, t_enc)."""
    strength = float(denoising_strength)
    if fix_steps:
        full = int(steps / min(strength, 0.999)) if strength > 0 else 0
        return full, steps - 1
    return steps, int(min(strength, 0.999) * steps)
