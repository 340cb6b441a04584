"""What a model family hands the ONE retouch loop (pipeline._Retouch): its sampler, its prediction,
its layer table, its attention editor and how that editor is installed.

A new model family is one more `RetouchFamily`, never a fork of the pipeline: the UNet family (SD1,
SDXL: DDIM on ε) and the DiT family (Flux.1: rectified flow on the velocity) drive the same steps —
invert the reference and the layout, one batched call over the reference/layout/target rows per
model evaluation, copy / paint / blend by the editor, a sampler step for each path.

A sampler speaks in levels (level 0 clean, level T noisiest) and steps s = 1 … T (docs/ALGORITHM.md);
`step` calls `evaluate(latents, point)` (point: a DDIM timestep or a flow σ) once per model evaluation
it needs, with every path at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager, Mapping, Optional, Sequence

import torch

from . import ddim, flow

Evaluate = Callable[[Mapping[str, torch.Tensor], float], Mapping[str, torch.Tensor]]
Predict = Callable[[torch.Tensor, float], torch.Tensor]  # the model on a batch at one point


class DDIMSampler:
    """Deterministic DDIM on ε at the timesteps of `ddim.DDIMSchedule` (one evaluation per step)."""

    evaluations = 1

    def __init__(self, schedule: ddim.DDIMSchedule):
        self.schedule = schedule

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def level_before_step(self, s: int) -> int:
        return self.schedule.level_before_step(s)

    def invert(self, predict: Predict, z0: torch.Tensor, callback=None) -> list[torch.Tensor]:
        return ddim.invert(predict, z0, self.schedule, callback=callback)

    def step(
        self, s: int, latents: Mapping, evaluate: Evaluate, keep: Optional[Sequence[str]] = None
    ) -> dict:
        eps = evaluate(latents, self.schedule.timestep_of_step(s))
        keep = list(latents) if keep is None else keep
        # looked up at call time (tests spy on ddim.denoise_step)
        return {p: ddim.denoise_step(self.schedule, latents[p], eps[p], s) for p in keep}

    combine = staticmethod(ddim.cfg_combine)


class FlowSampler:
    """Rectified flow on the velocity over a `flow.FlowSchedule`, one solver for inversion and
    sampling (`euler`: one evaluation per step, `midpoint`: two)."""

    def __init__(self, schedule: flow.FlowSchedule, solver: str = flow.MIDPOINT):
        self.schedule = schedule
        self.solver = flow.check_solver(solver)
        self.evaluations = flow.EVALUATIONS[solver]

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def level_before_step(self, s: int) -> int:
        return self.schedule.level_before_step(s)

    def invert(self, predict: Predict, z0: torch.Tensor, callback=None) -> list[torch.Tensor]:
        return flow.invert(predict, z0, self.schedule, self.solver, callback)

    def step(
        self, s: int, latents: Mapping, evaluate: Evaluate, keep: Optional[Sequence[str]] = None
    ) -> dict:
        hi, lo = self.schedule.step_sigmas(s)
        return flow.solver_step(self.solver, latents, hi, lo, evaluate, keep)

    combine = staticmethod(flow.cfg_combine)


@dataclass
class RetouchFamily:
    """The model-family half of one retouch (see the module doc)."""

    sampler: object  # DDIMSampler | FlowSampler
    layers: object  # layers.LayerTable (module names or block names)
    editor: object  # attention.RetouchAttention | dit_attention.DiTRetouchAttention
    patched: Callable[[], ContextManager]  # installs the editor, always restores
    predict: Callable[[torch.Tensor, float, object], torch.Tensor]  # (x, point, cond) → ε or v
    halves: tuple = ("uncond", "cond")  # the CFG halves every call carries
