"""DDIM sampling and DDIM inversion over a model's `alphas_cumprod` (Song et al.; Mokady et al.).

Steps are counted in denoising order, s = 1 … T (docs/ALGORITHM.md). Latent levels are counted the
other way: level 0 is the clean latent, level T the noisiest, so denoising step s goes from level
T−s+1 to level T−s, and inversion fills levels 1 … T from level 0.

Timesteps follow ldm's / A1111's "uniform" DDIM discretisation, `range(0, 1000, 1000 // T) + 1`,
so a trajectory recorded by a WebUI DDIM run lines up with ours step for step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

# eps(x, t) for a batch x and one integer timestep t; the caller binds prompt/model/CFG.
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, int], None]  # (step, total)


@dataclass(frozen=True)
class DDIMSchedule:
    """The T timesteps and the ᾱ each latent level sits at."""

    timesteps: tuple[int, ...]  # ascending, length T: timestep of level 1 … T
    alphas: torch.Tensor  # float64, length T+1: ᾱ of level 0 … T

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, steps: int) -> "DDIMSchedule":
        n_train = int(alphas_cumprod.shape[0])
        if not 1 <= steps <= n_train:
            raise ValueError(f"DDIM needs 1 ≤ steps ≤ {n_train}, got {steps}")
        stride = n_train // steps
        timesteps = tuple(int(t) + 1 for t in range(0, n_train, stride))[:steps]
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        # Level 0 sits at ᾱ_0 (ldm's `alphas_cumprod_prev[0]`), as the last DDIM step lands there.
        alphas = torch.cat([ac[:1], ac[list(timesteps)]])
        return cls(timesteps=timesteps, alphas=alphas)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def timestep_of_step(self, s: int) -> int:
        """Timestep the model sees at denoising step s (1-based)."""
        return self.timesteps[self.steps - s]

    def level_before_step(self, s: int) -> int:
        return self.steps - s + 1


def ddim_move(
    x: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float
) -> torch.Tensor:
    """Deterministic DDIM (η = 0) between two noise levels, either direction.

    x0 = (x − √(1−ᾱ_from)·ε)/√ᾱ_from;  x' = √ᾱ_to·x0 + √(1−ᾱ_to)·ε
    Computed in float32 at least; returned in x's dtype.
    """
    dtype = x.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    xf, ef = x.to(work), eps.to(work)
    a_from = torch.tensor(alpha_from, dtype=torch.float64)
    a_to = torch.tensor(alpha_to, dtype=torch.float64)
    c_x = float(torch.sqrt(a_to / a_from))
    c_e = float(
        torch.sqrt(1 - a_to) - torch.sqrt(a_to) * torch.sqrt(1 - a_from) / torch.sqrt(a_from)
    )
    return (c_x * xf + c_e * ef).to(dtype)


def denoise_step(
    schedule: DDIMSchedule, x: torch.Tensor, eps: torch.Tensor, s: int
) -> torch.Tensor:
    """One sampling step s: level T−s+1 → T−s."""
    lv = schedule.level_before_step(s)
    return ddim_move(x, eps, float(schedule.alphas[lv]), float(schedule.alphas[lv - 1]))


@torch.no_grad()
def invert(
    eps_fn: EpsFn, z0: torch.Tensor, schedule: DDIMSchedule, callback: Optional[StepCallback] = None
) -> list[torch.Tensor]:
    """DDIM inversion: every latent level [z_0, z_1, …, z_T] (z_0 is the input).

    ε is evaluated at the current latent with the NEXT level's timestep (the usual approximation
    ε(z_{k+1}, t_{k+1}) ≈ ε(z_k, t_{k+1})); its error shrinks as T grows.
    """
    levels = [z0]
    z = z0
    for k in range(schedule.steps):
        t = schedule.timesteps[k]
        eps = eps_fn(z, t)
        z = ddim_move(z, eps, float(schedule.alphas[k]), float(schedule.alphas[k + 1]))
        levels.append(z)
        if callback is not None:
            callback(k + 1, schedule.steps)
    return levels


@torch.no_grad()
def sample(
    eps_fn_for_step: Callable[[torch.Tensor, int, int], torch.Tensor],
    zT: torch.Tensor,
    schedule: DDIMSchedule,
    callback: Optional[StepCallback] = None,
) -> list[torch.Tensor]:
    """DDIM sampling from level T. `eps_fn_for_step(x, t, s)` may depend on the step s (stage 1
    switches models by step). Returns the trajectory [z_T, …, z_0] in denoising order."""
    traj = [zT]
    z = zT
    for s in range(1, schedule.steps + 1):
        eps = eps_fn_for_step(z, schedule.timestep_of_step(s), s)
        z = denoise_step(schedule, z, eps, s)
        traj.append(z)
        if callback is not None:
            callback(s, schedule.steps)
    return traj


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


@dataclass(frozen=True)
class DDIMSampler:
    """DDIM for ε-prediction models, as the retouch loop's sampler (`family.Sampler`)."""

    schedule: DDIMSchedule
    second_order = False  # one evaluation per step

    @classmethod
    def for_model(cls, model, steps: int) -> "DDIMSampler":
        """Over the model's `alphas_cumprod`; the model answers `eps(x, t, cond)`."""
        return cls(DDIMSchedule.from_alphas_cumprod(model.alphas_cumprod, steps))

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def time_of_step(self, s: int) -> int:
        return self.schedule.timestep_of_step(s)

    def level_before_step(self, s: int) -> int:
        return self.schedule.level_before_step(s)

    def predict(self, model, x: torch.Tensor, t: int, cond) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return model.eps(x, tt, cond)

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        return cfg_combine(uncond, cond, scale)

    def step(self, x: torch.Tensor, prediction: torch.Tensor, s: int) -> torch.Tensor:
        return denoise_step(self.schedule, x, prediction, s)

    def invert(
        self, predict: EpsFn, z0: torch.Tensor, callback: Optional[StepCallback] = None
    ) -> list[torch.Tensor]:
        return invert(predict, z0, self.schedule, callback=callback)
