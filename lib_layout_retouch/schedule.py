"""Which model, prompt and retouch phase run at denoising step s (s = 1 … T, s = 1 the noisiest).

The paper's defaults are for T = 50 DDIM steps: λ1 = 5 first steps by the vanilla model (stage 1),
λ2 = 10 first retouch steps copying the layout, and mask blending from step 31 to the last
(stage 2). Other step counts scale these so the same FRACTION of the run does the same job; the
values actually used are recorded (`describe()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import LayoutRetouchError

# The paper's settings (§4.1), the one home of these numbers: T DDIM steps, λ1 (3 for its
# "challenging" prompts), λ2, and the first blended step.
PAPER_STEPS = 50
PAPER_LAMBDA1 = 5
PAPER_LAMBDA1_CHALLENGING = 3  # the paper's λ1 for DreamMatcher's challenging prompts
PAPER_LAMBDA2 = 10
PAPER_MASK_START = 31


# How messages name each knob: (symbol, meaning). The parameter table (params.FIELDS) takes them
# from here.
KNOBS = {
    "steps": ("", "the number of sampling steps"),
    "lambda1": ("λ1", "the number of first steps drawn by the vanilla model"),
    "lambda2": ("λ2", "the number of first retouch steps that copy the layout"),
    "mask_start": ("mask start", "the first retouch step that blends the subject mask"),
}


def knob_words(name: str) -> str:
    """What a knob means, in words a user understands (error messages): 'λ1 (the number …)'."""
    symbol, meaning = KNOBS[name]
    return f"{symbol} ({meaning})" if symbol else meaning


def _not_whole(name: str, value: object) -> LayoutRetouchError:
    return LayoutRetouchError(
        f"{knob_words(name)} must be a whole number, got {value!r}", parameter=name
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def scale_count(value: int, steps: int, reference_steps: int = PAPER_STEPS) -> int:
    """A step count given at `reference_steps`, rounded (half up) to `steps`; ≥ 1 when value ≥ 1."""
    scaled = math.floor(value * steps / reference_steps + 0.5)
    return max(scaled, 1) if value >= 1 else scaled


def scale_mask_start(mask_start: int, steps: int, reference_steps: int = PAPER_STEPS) -> int:
    """Scale the first blended step so the NUMBER of blended steps scales (at least step 2).

    50 steps, start 31 → 20 blended steps; 20 steps → 8 blended → start 13.
    """
    blended = math.floor((reference_steps + 1 - mask_start) * steps / reference_steps + 0.5)
    return max(steps + 1 - blended, 2)


@dataclass(frozen=True)
class Schedule:
    steps: int
    lambda1: int
    lambda2: int
    mask_start: int
    # (lambda1, lambda2, mask_start, reference_steps) as the user gave them, when scaled.
    scaled_from: tuple[int, int, int, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def for_steps(
        cls,
        steps: int,
        lambda1: int = PAPER_LAMBDA1,
        lambda2: int = PAPER_LAMBDA2,
        mask_start: int = PAPER_MASK_START,
        *,
        scale: bool = True,
        reference_steps: int = PAPER_STEPS,
    ) -> "Schedule":
        """The schedule for `steps` sampling steps.

        With `scale`, the three values are taken as given for `reference_steps` steps (the paper's
        50) and scaled; without, they are used as they are.
        """
        _check_steps(steps)
        for name, v in (("lambda1", lambda1), ("lambda2", lambda2), ("mask_start", mask_start)):
            if not _is_int(v):
                raise _not_whole(name, v)
        if not scale:
            return cls(steps, lambda1, lambda2, mask_start)
        if not _is_int(reference_steps) or reference_steps < 1:
            raise ValueError(f"reference_steps must be a positive int, got {reference_steps!r}")
        given = (lambda1, lambda2, mask_start, reference_steps)
        if not 2 <= mask_start <= reference_steps + 1:
            # Outside this range no step count can fit (and scaling would clamp a too-small value
            # to 2, hiding the mistake): report the value the user gave.
            raise LayoutRetouchError(
                f"{knob_words('mask_start')} is {mask_start}, but with scaling on it is given for "
                f"{reference_steps} steps and must be between 2 and {reference_steps + 1} "
                f"({reference_steps + 1} turns blending off): choose a value in that range",
                parameter="mask_start",
            )
        return cls(
            steps,
            scale_count(lambda1, steps, reference_steps),
            scale_count(lambda2, steps, reference_steps),
            scale_mask_start(mask_start, steps, reference_steps),
            scaled_from=given,
        )

    def validate(self) -> None:
        _check_steps(self.steps)
        T = self.steps
        self._check_range(
            "lambda1",
            self.lambda1,
            0,
            T - 1,
            "at least one step is left for the personalized model",
        )
        self._check_range("lambda2", self.lambda2, 0, T, None)
        self._check_range("mask_start", self.mask_start, 2, T + 1, f"{T + 1} turns blending off")

    def _check_range(self, name: str, value: int, lo: int, hi: int, why: str | None) -> None:
        if not _is_int(value):
            raise _not_whole(name, value)
        if lo <= value <= hi:
            return
        note = f" ({why})" if why else ""
        if self.scaled_from is not None:
            idx = ("lambda1", "lambda2", "mask_start").index(name)
            given, ref = self.scaled_from[idx], self.scaled_from[3]
            if value < lo:
                fix = "choose a larger value"
            elif lo <= given <= hi:  # the unscaled value would fit
                fix = "choose a smaller value, use more sampling steps, or turn off scaling with steps"
            else:
                fix = "choose a smaller value or use more sampling steps"
            message = (
                f"{knob_words(name)} is {value} at {self.steps} sampling steps (scaled from the "
                f"{given} you set for {ref} steps), but it must be between {lo} and {hi}{note}: {fix}"
            )
        else:
            message = (
                f"{knob_words(name)} is {value}, but at {self.steps} sampling steps it must be "
                f"between {lo} and {hi}{note}: choose a value in that range"
            )
        raise LayoutRetouchError(
            message,
            parameter=name,
        )

    def _check_s(self, s: int) -> None:
        # A step outside the run is a bug in the caller, not something a user did.
        if not _is_int(s) or not 1 <= s <= self.steps:
            raise ValueError(f"step s must be an int in 1..{self.steps}, got {s!r}")

    # Stage 1 — layout generation.
    def uses_vanilla(self, s: int) -> bool:
        """Stage 1: the vanilla model draws the first λ1 steps."""
        self._check_s(s)
        return s <= self.lambda1

    def stage1(self, s: int) -> tuple[str, str]:
        """(model, prompt) of stage 1 at step s: ("vanilla", "layout") = (ε, y_p⁻), else (ε*, y_p)."""
        return ("vanilla", "layout") if self.uses_vanilla(s) else ("personalized", "personalized")

    # Stage 2 — retouch.
    def copies_layout(self, s: int) -> bool:
        """Stage 2: the target copies the layout path's Q/K/V for the first λ2 steps."""
        self._check_s(s)
        return s <= self.lambda2

    def paints_identity(self, s: int) -> bool:
        """Stage 2: after λ2 the target's self-attention reads the reference's K/V."""
        self._check_s(s)
        return s > self.lambda2

    def blends_mask(self, s: int) -> bool:
        """Stage 2: self-attention outputs are blended with the mask from `mask_start` on."""
        self._check_s(s)
        return s >= self.mask_start

    def describe(self, stage1: bool = True) -> str:
        """The values used, for the infotext: "λ1=2, λ2=4, mask from step 13 of 20" (without λ1
        when there is no stage 1: img2img's layout source 'input')."""
        if self.mask_start > self.steps:
            mask = f"no mask blending in {self.steps} steps"
        else:
            mask = f"mask from step {self.mask_start} of {self.steps}"
        return f"{f'λ1={self.lambda1}, ' if stage1 else ''}λ2={self.lambda2}, {mask}"


def _check_steps(steps: object) -> None:
    if not _is_int(steps) or steps < 2:
        raise LayoutRetouchError(
            f"{knob_words('steps')} is {steps!r}, but Layout-and-Retouch needs at least 2 "
            "(one for the vanilla layout, one for the personalized model): raise sampling steps "
            f"(the paper uses {PAPER_STEPS})",
            parameter="steps",
        )


def img2img_steps(steps: int, denoising_strength: float, fix_steps: bool = False) -> int:
    """How many sampling steps the WebUI's img2img sampler actually runs for `steps` and
    `denoising_strength` — the step count stage 1 and the retouch are scheduled over in img2img.

    A1111 v1.10 `modules/sd_samplers_common.py::setup_img2img_steps`:

        if opts.img2img_fix_steps or steps is not None:
            requested_steps = (steps or p.steps)
            steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
            t_enc = requested_steps - 1
        else:
            steps = p.steps
            t_enc = int(min(p.denoising_strength, 0.999) * steps)

    and both sampler families then run `t_enc + 1` steps: `sd_samplers_kdiffusion.py` takes
    `sigmas[steps - t_enc - 1:]` (t_enc + 2 sigmas, t_enc + 1 intervals) and
    `launch_sampling(t_enc + 1, …)`; `sd_samplers_timesteps.py` (DDIM, PLMS, UniPC) also reports
    `launch_sampling(t_enc + 1, …)`. So: `fix_steps` (the setting "With img2img, do exactly the
    amount of steps the slider specifies") → `steps`; else `int(min(strength, 0.999) · steps) + 1`.
    """
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    strength = float(denoising_strength)
    if not 0.0 <= strength <= 1.0:
        raise LayoutRetouchError(
            f"denoising strength is {denoising_strength!r} but must be between 0 and 1",
            parameter="denoising_strength",
        )
    if fix_steps:
        return steps  # t_enc = steps − 1
    return int(min(strength, 0.999) * steps) + 1
