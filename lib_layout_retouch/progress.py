"""One progress bar over both stages, host-agnostic.

The WebUI shows `sampling_step / sampling_steps` of the current job and derives its ETA from the
fraction done. Stage 1 is the sampler's own loop; stage 2 (reference inversion, layout inversion,
retouch) is ours. `ProgressPlan` puts both on one scale measured in stage-1 steps, weighting each
UNet call by the rows it runs (the work), so the bar never restarts and the ETA is honest:

- a stage-1 step runs 2·B rows (cond + uncond) — one unit;
- a reference-inversion step runs 1 row (skipped when the inversion is cached);
- a layout-inversion step runs B rows (none with layout source `stage1` on DDIM);
- a retouch step runs 2·(R + 2·B) rows (R reference photos, layout, target, both CFG halves).

With R reference photos each uncached one is inverted on its own (T steps of 1 row each). With
layout source `input` (img2img) there is no stage 1: `stage1_steps=0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("reference inversion", "layout inversion", "retouch")
STAGE1_VANILLA = "stage 1: layout by the vanilla model"
STAGE1_PERSONAL = "stage 1: personalized model"


@dataclass
class ProgressPlan:
    steps: int  # sampling steps of stage 1 (and of each stage-2 phase)
    batch: int = 1
    reference_cached: bool = False
    invert_layout: bool = True
    references: int = 1  # R: reference rows in each retouch step
    references_to_invert: int | None = None  # None: R, or 0 when `reference_cached`
    stage1_steps: int | None = None  # None: `steps`; 0 for layout source `input`
    units: dict = field(init=False)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be positive, got {self.steps}, {self.batch}")
        unit = 2.0 * self.batch
        to_invert = self.references_to_invert
        if to_invert is None:
            to_invert = 0 if self.reference_cached else self.references
        self.units = {
            "reference inversion": self.steps * to_invert / unit,
            "layout inversion": self.steps * self.batch / unit if self.invert_layout else 0.0,
            "retouch": self.steps * 2 * (self.references + 2 * self.batch) / unit,
        }

    @property
    def _stage1(self) -> int:
        return self.steps if self.stage1_steps is None else self.stage1_steps

    @property
    def total(self) -> float:
        """The bar's length in stage-1 steps."""
        return self._stage1 + sum(self.units.values())

    def position(self, phase: str, step: int, phase_steps: int) -> float:
        """Where the bar is after `step` of `phase_steps` steps of a stage-2 phase."""
        if phase not in self.units:
            raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
        before = self._stage1 + sum(self.units[p] for p in PHASES[: PHASES.index(phase)])
        frac = min(max(step / max(phase_steps, 1), 0.0), 1.0)
        return before + self.units[phase] * frac

    @staticmethod
    def text(phase: str) -> str:
        """The bar's text for a phase (stage-2 phases are numbered as the user meets them)."""
        if phase in PHASES:
            return f"Layout-and-Retouch: stage 2: {phase}"
        return f"Layout-and-Retouch: {phase}"
