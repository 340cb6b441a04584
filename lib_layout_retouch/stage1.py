"""Stage 1 — layout generation by step-blended denoising (paper §3.2, docs/ALGORITHM.md).

The first λ1 steps use the vanilla denoiser ε with y_p⁻ so the vanilla model places the subject
freely; the remaining steps use the personalized ε* with y_p so the subject already looks like
the user's. Classifier-free guidance with the user's negative prompt throughout.

In the WebUI the host's own sampler runs this (the glue switches denoiser and prompt per step);
this module is the library's DDIM version, used by the benchmark, the tests and library users.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch

from . import conditioning as C
from .errors import Interrupted
from .unet import ddim
from .unet.model import Denoiser

ProgressFn = Callable[[str, int, int], None]


@torch.no_grad()
def sample_step_blended(
    vanilla: Denoiser,
    personalized: Denoiser,
    schedule,
    ddim_schedule: ddim.DDIMSchedule,
    cond_layout: C.Cond,
    cond_personalized: C.Cond,
    uncond: C.Cond,
    noise: torch.Tensor,
    guidance_scale: float,
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> list[torch.Tensor]:
    """DDIM from `noise` (B, C, h, w) with the stage-1 switch. Conditionings (conditioning.Cond)
    have 1 or B rows. Returns the trajectory [z_T, …, z_0] (denoising order)."""
    b = noise.shape[0]
    conds = {
        "layout": C.cat([C.expand(uncond, b), C.expand(cond_layout, b)]),
        "personalized": C.cat([C.expand(uncond, b), C.expand(cond_personalized, b)]),
    }
    denoisers = {"vanilla": vanilla, "personalized": personalized}

    def eps_for_step(x: torch.Tensor, t: int, s: int) -> torch.Tensor:
        if should_stop is not None and should_stop():
            raise Interrupted("stopped during layout generation")
        model_name, prompt_name = schedule.stage1(s)
        tt = torch.full((2 * b,), t, device=x.device, dtype=torch.long)
        eps = denoisers[model_name](torch.cat([x, x]), tt, conds[prompt_name])
        eps_u, eps_c = eps.chunk(2)
        return ddim.cfg_combine(eps_u, eps_c, guidance_scale)

    callback = (lambda s, total: progress("layout", s, total)) if progress else None
    return ddim.sample(eps_for_step, noise, ddim_schedule, callback=callback)


@torch.no_grad()
def sample_step_blended_with(
    sampler,
    model,
    schedule,
    cond_layout: C.Cond,
    cond_personalized: C.Cond,
    uncond: C.Cond,
    noise: torch.Tensor,
    guidance_scale: float,
    vanilla: Callable[[], ContextManager] = contextlib.nullcontext,
    halves: Sequence[str] = ("uncond", "cond"),
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> list[torch.Tensor]:
    """Stage 1 through a model family's sampler (`family.Sampler`; Flux: the flow sampler): the
    first λ1 steps by the vanilla model — inside `vanilla()`, which the host makes (a LoRA turned
    off, a vanilla checkpoint swapped in) — with y_p⁻, the rest by the personalized model with y_p.
    CFG when `halves` has both; a second-order sampler's midpoint evaluation is taken with the same
    model and prompt. Returns the trajectory [z_T, …, z_0]."""
    b = noise.shape[0]
    both = "uncond" in halves
    conds = {
        name: C.cat([C.expand(uncond, b), C.expand(c, b)]) if both else C.expand(c, b)
        for name, c in (("layout", cond_layout), ("personalized", cond_personalized))
    }
    midpoint = getattr(sampler, "midpoint", None)

    def predict(x, t, s):
        if should_stop is not None and should_stop():
            raise Interrupted("stopped during layout generation")
        model_name, prompt_name = schedule.stage1(s)
        with vanilla() if model_name == "vanilla" else contextlib.nullcontext():
            out = sampler.predict(model, torch.cat([x, x]) if both else x, t, conds[prompt_name])
        return sampler.guide(*out.chunk(2), guidance_scale) if both else out

    trajectory, z = [noise], noise
    for s in range(1, sampler.steps + 1):
        pred = predict(z, sampler.time_of_step(s), s)
        if midpoint is not None:
            pred = predict(midpoint(z, pred, s), sampler.time_of_midpoint(s), s)
        z = sampler.step(z, pred, s)
        trajectory.append(z)
        if progress is not None:
            progress("layout", s, sampler.steps)
    return trajectory
