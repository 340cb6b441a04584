"""Which model, prompt and retouch phase run at denoising step s (s = 1 … T, s = 1 the noisiest).

The paper's defaults are for T = 50 DDIM steps: λ1 = 5 first steps by the vanilla model (stage 1),
λ2 = 10 first retouch steps copying the layout, and mask blending from step 31 to the last
(stage 2). Other step counts scale these so the same FRACTION of the run does the same job; the
values actually used are recorded (`describe()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .errors import LayoutRetouchError, combine
from .sampler_steps import SamplerSteps

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


def effective_values(
    steps: int,
    lambda1: int,
    lambda2: int,
    mask_start: int,
    scale: bool = True,
    reference_steps: int = PAPER_STEPS,
) -> tuple[int, int, int]:
    """(λ1, λ2, mask start) as they run at `steps` steps, NOT checked: what unticking "scale with
    steps" puts in the panel, and what an X/Y/Z cell keeps for the knobs it does not sweep (the
    check, with the sampler's bound, comes after). Without `scale` the values themselves."""
    if not scale:
        return lambda1, lambda2, mask_start
    return (
        scale_count(lambda1, steps, reference_steps),
        scale_count(lambda2, steps, reference_steps),
        scale_mask_start(mask_start, steps, reference_steps),
    )


def unscaled_values(
    steps: int, lambda1: int, lambda2: int, mask_start: int, reference_steps: int = PAPER_STEPS
) -> tuple[int, int, int]:
    """The values for `reference_steps` that scale to (about) the given ones at `steps` steps — what
    ticking "scale with steps" again puts in the panel (exact back-and-forth up to 50 steps; above,
    several step values share one value for 50). Clamped to the sliders' ranges at 50 steps."""

    def count(v: int) -> int:
        return min(max(math.floor(v * reference_steps / steps + 0.5), 0), reference_steps)

    blended = max(steps + 1 - mask_start, 0)
    back = math.floor(blended * reference_steps / steps + 0.5)
    return (
        count(lambda1),
        count(lambda2),
        min(max(reference_steps + 1 - back, 2), reference_steps + 1),
    )


# Why each knob's bound is what it is (range messages).
PERSONALIZED_STEP_LEFT = "at least one step is left for the personalized model"


def knob_bounds(steps: int, sampler: Optional[SamplerSteps] = None) -> dict[str, tuple[int, int]]:
    """{knob: (lowest, highest)} accepted at `steps` steps — the one home of these bounds (the
    check, the panel's sliders with scaling off). λ1 counts the steps stage 1's sampler really runs
    (`sampler`, e.g. DDIM at 10 steps runs 9: λ1 ≤ 8); a sampler that decides its calls while it
    runs allows λ1 = 0 only."""
    return {
        "lambda1": (0, _lambda1_high(steps, sampler)),
        "lambda2": (0, steps),
        "mask_start": (2, steps + 1),
    }


def _lambda1_high(steps: int, sampler: Optional[SamplerSteps]) -> int:
    high = steps - 1
    if sampler is None:
        return high
    if not sampler.known:
        return 0
    return max(min(high, sampler.steps - 1), 0)


def _sampler_binds(steps: int, sampler: Optional[SamplerSteps]) -> bool:
    """Whether λ1's bound is the sampler's rather than the step count's."""
    return sampler is not None and _lambda1_high(steps, sampler) < steps - 1


@dataclass(frozen=True)
class Schedule:
    steps: int
    lambda1: int
    lambda2: int
    mask_start: int
    # (lambda1, lambda2, mask_start, reference_steps) as the user gave them, when scaled.
    scaled_from: tuple[int, int, int, int] | None = field(default=None, compare=False, repr=False)
    # What stage 1's sampler really runs (`sampler_steps`): λ1 counts its steps, so λ1's bound is
    # the sampler's (DDIM at 10 steps runs 9: λ1 ≤ 8). None: `steps` steps, one model call each.
    sampler: SamplerSteps | None = field(default=None, compare=False, repr=False)

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
        sampler: SamplerSteps | None = None,
    ) -> "Schedule":
        """The schedule for `steps` sampling steps.

        With `scale`, the three values are taken as given for `reference_steps` steps (the paper's
        50) and scaled; without, they are used as they are. `sampler`: what stage 1's sampler runs
        (λ1's bound). Every value out of its range is named in ONE error.
        """
        _check_steps(steps)
        problems = [
            _not_whole(name, v)
            for name, v in (("lambda1", lambda1), ("lambda2", lambda2), ("mask_start", mask_start))
            if not _is_int(v)
        ]
        if problems:
            raise combine(problems)
        if not scale:
            return cls(steps, lambda1, lambda2, mask_start, sampler=sampler)
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
            *effective_values(steps, lambda1, lambda2, mask_start, True, reference_steps),
            scaled_from=given,
            sampler=sampler,
        )

    def validate(self) -> None:
        """Every knob out of its range, in one LayoutRetouchError (the steps alone first)."""
        _check_steps(self.steps)
        T = self.steps
        bounds = knob_bounds(T, self.sampler)
        why = {
            "lambda1": PERSONALIZED_STEP_LEFT,
            "lambda2": None,
            "mask_start": f"{T + 1} turns blending off",
        }
        problems = []
        for name in ("lambda1", "lambda2", "mask_start"):
            problem = self._range_problem(name, getattr(self, name), *bounds[name], why[name])
            if problem is not None:
                problems.append(problem)
        if problems:
            raise combine(problems)

    def _range_problem(
        self, name: str, value: int, lo: int, hi: int, why: str | None
    ) -> LayoutRetouchError | None:
        if not _is_int(value):
            return _not_whole(name, value)
        if lo <= value <= hi:
            return None
        if name == "lambda1" and value > hi and _sampler_binds(self.steps, self.sampler):
            return self._sampler_problem(value, hi)
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
        return LayoutRetouchError(message, parameter=name)

    def _given(self, value: int) -> str:
        """ "λ1 (…) is 9 at 10 sampling steps (scaled from the 45 you set for 50 steps)" or
        "λ1 (…) is 9"."""
        if self.scaled_from is None:
            return f"{knob_words('lambda1')} is {value}"
        given, ref = self.scaled_from[0], self.scaled_from[3]
        return (
            f"{knob_words('lambda1')} is {value} at {self.steps} sampling steps (scaled from the "
            f"{given} you set for {ref} steps)"
        )

    def _sampler_problem(self, value: int, hi: int) -> LayoutRetouchError:
        """λ1 beyond the steps the sampler really runs (the bound the step count alone would allow
        is never shown: one bound, the sampler's)."""
        plan = self.sampler
        if not plan.known:
            return LayoutRetouchError(
                f"{self._given(value)}, but the sampler '{plan.sampler}' decides its model calls "
                "while it runs, so its first steps cannot be given to the vanilla model: choose "
                "another sampler (the paper's is DDIM) or set it to 0",
                parameter="lambda1",
            )
        said = plan.words() or f"{plan.sampler} runs {plan.steps} steps"
        if hi == 0:
            bound = "so it must be 0 (no step would be left for the personalized model)"
            fix = "raise the sampling steps or set it to 0"
        else:
            bound = f"so it must be between 0 and {hi} ({PERSONALIZED_STEP_LEFT})"
            fix = "choose a smaller value or use more sampling steps"
        return LayoutRetouchError(
            f"{self._given(value)}, but {said}, {bound}: {fix}", parameter="lambda1"
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
        when there is no stage 1: img2img's layout source 'input'). With a `sampler` that runs
        another number of steps than `steps`, λ1 says which it counts: "λ1=2 of DDIM's 6 steps"."""
        if self.mask_start > self.steps:
            mask = f"no mask blending in {self.steps} steps"
        else:
            mask = f"mask from step {self.mask_start} of {self.steps}"
        if not stage1:
            return f"λ2={self.lambda2}, {mask}"
        return f"{self.lambda1_words()}, λ2={self.lambda2}, {mask}"

    def lambda1_words(self) -> str:
        plan = self.sampler
        if plan is None or not plan.known or plan.steps == self.steps or not self.lambda1:
            return f"λ1={self.lambda1}"
        return f"λ1={self.lambda1} of {plan.sampler}'s {plan.steps} steps"


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
