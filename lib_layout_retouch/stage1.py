"""Stage 1 — layout generation by step-blended denoising (paper §3.2, docs/ALGORITHM.md).

The first λ1 steps use the vanilla denoiser ε with y_p⁻ so the vanilla model places the subject
freely; the remaining steps use the personalized ε* with y_p so the subject already looks like
the user's. Classifier-free guidance with the user's negative prompt throughout.

In the WebUIs and ComfyUI the host's own sampler runs this (the glue switches model and prompt per
step); this module is the library's, through the model family's sampler (DDIM for ε-UNets, the flow
solver for Flux) and its vanilla context (`retouch.family.ModelFamily.vanilla`), used by
`retouch.generate`, the benchmark, the tests and library users.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch

from . import conditioning as C
from .errors import Interrupted

ProgressFn = Callable[[str, int, int], None]


@torch.no_grad()
def sample_step_blended(
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
    """Stage 1 through a model family's sampler (`retouch.family.Sampler`): the first λ1 steps by
    the vanilla model — inside `vanilla()` (the family's: a vanilla UNet swapped in, a LoRA turned
    off by the host) — with y_p⁻, the rest by the personalized model with y_p.
    CFG when `halves` has both; a second-order sampler's midpoint evaluation is taken with the same
    model and prompt. Returns the trajectory [z_T, …, z_0]."""
    b = noise.shape[0]
    both = "uncond" in halves
    conds = {
        name: C.cat([C.expand(uncond, b), C.expand(c, b)]) if both else C.expand(c, b)
        for name, c in (("layout", cond_layout), ("personalized", cond_personalized))
    }

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
        if sampler.second_order:
            pred = predict(sampler.midpoint(z, pred, s), sampler.time_of_midpoint(s), s)
        z = sampler.step(z, pred, s)
        trajectory.append(z)
        if progress is not None:
            progress("layout", s, sampler.steps)
    return trajectory
