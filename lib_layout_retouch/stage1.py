"""Stage 1 — layout generation by step-blended denoising (paper §3.2, docs/ALGORITHM.md).

The first λ1 steps use the vanilla denoiser ε with y_p⁻ so the vanilla model places the subject
freely; the remaining steps use the personalized ε* with y_p so the subject already looks like
the user's. Classifier-free guidance with the user's negative prompt throughout.

In the WebUI the host's own sampler runs this (the glue switches denoiser and prompt per step);
this module is the library's DDIM version, used by the benchmark, the tests and library users.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import conditioning as C
from . import ddim
from .errors import Interrupted
from .model import Denoiser

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
