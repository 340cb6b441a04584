"""Rectified-flow sampling and inversion for flow-matching transformers (Flux.1), in the same level
and step conventions as `ddim.py` (docs/ALGORITHM.md, "DiT (Flux)").

Flux's latent at noise level σ ∈ [0, 1] is x_σ = (1 − σ)·x₀ + σ·ε and the transformer predicts the
velocity v = dx/dσ = ε − x₀. Sampling integrates from σ = 1 to 0, inversion from 0 to 1.

Levels: level 0 is the clean latent (σ = 0), level T the noisiest (σ_max, 1 for Flux); denoising step
s = 1 … T goes from level T−s+1 to level T−s, as in DDIM.

Schedule: Black Forest Labs' `get_schedule` — T+1 points of linspace(1, 0), time-shifted by
    σ = e^μ / (e^μ + (1/t − 1))
with μ depending on the image's token count (Flux.1-dev; ComfyUI's ModelSamplingFlux computes the
same line): μ = 0.5 + (1.15 − 0.5)·(n − 256)/(4096 − 256), n = (H/16)·(W/16). Schnell: no shift.
A host whose sampler computes its own σ list (Forge reads a 10000-entry table at a fixed μ = 1.15)
hands it over with `FlowSchedule.from_sigmas`, so the retouch walks the host's exact σ.

Solvers (each used for inversion and for sampling, so a path retraces what was inverted):
- `euler`: x ← x + Δσ·v(x, σ). One transformer call per step.
- `midpoint`: RF-Solver's second-order step (Wang et al. 2024, "Taming Rectified Flow for
  Inversion and Editing"), x ← x + Δσ·v + ½Δσ²·v′ with v′ ≈ (v(x + ½Δσ·v, σ + ½Δσ) − v)/(½Δσ),
  which is algebraically the explicit midpoint rule x ← x + Δσ·v(x + ½Δσ·v, σ + ½Δσ). Two calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

# v(x, σ) for a batch x and one noise level σ; the caller binds prompt/model/guidance.
VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, int], None]

EULER, MIDPOINT = "euler", "midpoint"
SOLVERS = (EULER, MIDPOINT)
EVALUATIONS = {EULER: 1, MIDPOINT: 2}

# BFL's resolution-dependent shift (Flux.1-dev): μ on the line through (256, 0.5) and (4096, 1.15).
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def flux_mu(image_tokens: int) -> float:
    """μ for an image of `image_tokens` 2×2-patch tokens ((H/16)·(W/16) at 8× VAE down-sampling)."""
    m = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + m * (image_tokens - BASE_SEQ_LEN)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """e^μ / (e^μ + (1/t − 1)); 0 ↦ 0 and 1 ↦ 1."""
    t = t.double()
    out = torch.zeros_like(t)
    inside = t > 0
    out[inside] = math.exp(mu) / (math.exp(mu) + (1 / t[inside] - 1))
    return out


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown flow solver {solver!r}; one of {', '.join(SOLVERS)}")
    return solver


@dataclass(frozen=True)
class FlowSchedule:
    """The T+1 noise levels of a flow sampler: `sigmas[k]` is level k's σ (ascending, sigmas[0] = 0)."""

    sigmas: torch.Tensor  # float64, length T+1, ascending

    @classmethod
    def flux(cls, steps: int, mu: Optional[float] = None) -> "FlowSchedule":
        """BFL's schedule: linspace(1, 0, T+1), shifted by μ (None: unshifted, as schnell)."""
        if steps < 1:
            raise ValueError(f"a flow schedule needs at least 1 step, got {steps}")
        t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        return cls(time_shift(mu, t) if mu is not None else t)

    @classmethod
    def for_image(
        cls, steps: int, latent_hw: tuple[int, int], shift: bool = True
    ) -> "FlowSchedule":
        """Flux.1-dev at this latent size (shifted by its token count); `shift=False`: schnell."""
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        return cls.flux(steps, flux_mu(tokens) if shift else None)

    @classmethod
    def from_sigmas(cls, sigmas) -> "FlowSchedule":
        """A host sampler's σ list in either order (descending as samplers hold it, ending at 0)."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if s[0] > s[-1]:
            s = s.flip(0)
        if s.numel() < 2 or float(s[0]) != 0.0 or bool((s[1:] <= s[:-1]).any()):
            raise ValueError("flow sigmas must be strictly monotonic and end at 0")
        return cls(s)

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1

    def level_before_step(self, s: int) -> int:
        return self.steps - s + 1

    def sigma_of_step(self, s: int) -> float:
        """σ the transformer sees first at denoising step s (1-based)."""
        return float(self.sigmas[self.level_before_step(s)])

    def step_sigmas(self, s: int) -> tuple[float, float]:
        lv = self.level_before_step(s)
        return float(self.sigmas[lv]), float(self.sigmas[lv - 1])


def _move(x: torch.Tensor, v: torch.Tensor, d_sigma: float) -> torch.Tensor:
    """x + Δσ·v in float32 at least, returned in x's dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(work) + d_sigma * v.to(work)).to(x.dtype)


def solver_step(
    solver: str,
    latents: Mapping[str, torch.Tensor],
    sigma_from: float,
    sigma_to: float,
    evaluate: Callable[[Mapping[str, torch.Tensor], float], Mapping[str, torch.Tensor]],
    keep: Optional[Sequence[str]] = None,
) -> dict[str, torch.Tensor]:
    """One step of the latents in `latents` (a path → latent dict) from σ_from to σ_to, either
    direction. `evaluate(latents, σ)` returns the velocity of each; it is called once (Euler) or twice
    (midpoint) with every path at once, so a caller batches all paths into one transformer call.
    `keep`: the paths whose next latent is wanted (default all; every path is still evaluated)."""
    keep = list(latents) if keep is None else list(keep)
    d = sigma_to - sigma_from
    v = evaluate(latents, sigma_from)
    if solver == EULER:
        return {p: _move(latents[p], v[p], d) for p in keep}
    check_solver(solver)
    mid = {p: _move(x, v[p], d / 2) for p, x in latents.items()}
    v_mid = evaluate(mid, sigma_from + d / 2)
    return {p: _move(latents[p], v_mid[p], d) for p in keep}


def _single(velocity: VelocityFn):
    return lambda lat, sigma: {"x": velocity(lat["x"], sigma)}


@torch.no_grad()
def invert(
    velocity: VelocityFn,
    z0: torch.Tensor,
    schedule: FlowSchedule,
    solver: str = MIDPOINT,
    callback: Optional[StepCallback] = None,
) -> list[torch.Tensor]:
    """Flow inversion: every latent level [z_0, …, z_T] (z_0 is the input), integrating σ upwards."""
    check_solver(solver)
    levels, z = [z0], z0
    for k in range(schedule.steps):
        sig = schedule.sigmas
        z = solver_step(solver, {"x": z}, float(sig[k]), float(sig[k + 1]), _single(velocity))["x"]
        levels.append(z)
        if callback is not None:
            callback(k + 1, schedule.steps)
    return levels


@torch.no_grad()
def sample(
    velocity_for_step: Callable[[torch.Tensor, float, int], torch.Tensor],
    zT: torch.Tensor,
    schedule: FlowSchedule,
    solver: str = EULER,
    callback: Optional[StepCallback] = None,
) -> list[torch.Tensor]:
    """Sampling from level T: the trajectory [z_T, …, z_0]. `velocity_for_step(x, σ, s)` may depend
    on the step (stage 1 switches models by step)."""
    check_solver(solver)
    traj, z = [zT], zT
    for s in range(1, schedule.steps + 1):
        hi, lo = schedule.step_sigmas(s)

        def evaluate(lat, sigma, s=s):
            return {"x": velocity_for_step(lat["x"], sigma, s)}

        z = solver_step(solver, {"x": z}, hi, lo, evaluate)["x"]
        traj.append(z)
        if callback is not None:
            callback(s, schedule.steps)
    return traj


def reconstruction_error(
    velocity: VelocityFn, z0: torch.Tensor, schedule: FlowSchedule, solver: str
) -> float:
    """‖sample(invert(z0)) − z0‖ / ‖z0‖ with the same solver both ways (docs/ALGORITHM.md records it)."""
    zT = invert(velocity, z0, schedule, solver)[-1]
    back = sample(lambda x, sigma, s: velocity(x, sigma), zT, schedule, solver)[-1]
    return float((back.double() - z0.double()).norm() / z0.double().norm())


class FlowSampler:
    """The retouch loop's sampler (retouch.family.Sampler) for a velocity model over a FlowSchedule:
    Euler steps (one model call per step); inversion with the same solver."""

    solver = EULER
    second_order = False

    def __init__(self, schedule: FlowSchedule):
        self.schedule = schedule

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def time_of_step(self, s: int) -> float:
        return self.schedule.sigma_of_step(s)

    def level_before_step(self, s: int) -> int:
        return self.schedule.level_before_step(s)

    def predict(self, model, x: torch.Tensor, sigma: float, cond) -> torch.Tensor:
        return model.velocity(x, sigma, cond)

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        return cfg_combine(uncond, cond, scale)

    def step(self, x: torch.Tensor, velocity: torch.Tensor, s: int) -> torch.Tensor:
        hi, lo = self.schedule.step_sigmas(s)
        return _move(x, velocity, lo - hi)

    def invert(self, predict: VelocityFn, z0: torch.Tensor, callback=None) -> list[torch.Tensor]:
        return invert(predict, z0, self.schedule, self.solver, callback)


class MidpointFlowSampler(FlowSampler):
    """Second order (RF-Solver-2): the loop evaluates every path again at `midpoint` (half a step
    on with the first velocity, σ at `time_of_midpoint`) and `step`s with that velocity."""

    solver = MIDPOINT
    second_order = True

    def midpoint(self, x: torch.Tensor, velocity: torch.Tensor, s: int) -> torch.Tensor:
        hi, lo = self.schedule.step_sigmas(s)
        return _move(x, velocity, (lo - hi) / 2)

    def time_of_midpoint(self, s: int) -> float:
        hi, lo = self.schedule.step_sigmas(s)
        return hi + (lo - hi) / 2


def flow_sampler(schedule: FlowSchedule, solver: str = MIDPOINT) -> FlowSampler:
    return (
        MidpointFlowSampler(schedule) if check_solver(solver) == MIDPOINT else FlowSampler(schedule)
    )


def cfg_combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Real classifier-free guidance on velocities (Flux-dev with CFG > 1)."""
    return v_uncond + scale * (v_cond - v_uncond)


def simple_sigmas(table: torch.Tensor, steps: int) -> list[float]:
    """The "Simple" scheduler of Forge and ComfyUI over a model's σ table (ascending): `steps`
    values from σ_max down, then 0 (Forge modules/sd_schedulers.py:81-87, ComfyUI
    `simple_scheduler`), the same float32 values."""
    n = len(table)
    ss = n / steps
    return [float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
