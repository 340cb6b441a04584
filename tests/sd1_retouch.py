"""The retouch on the tiny SD1 model of the `setup` fixture (tests/conftest.py), as test_pipeline
and test_img2img run it: T = 8 steps, λ1 = 1, λ2 = 2, M from step 5 (not scaled with T); the
rounding drift such a run allows (tests/tolerance.py), and the run with another reference that
every comparison up to that drift must be able to tell apart."""

from __future__ import annotations

import torch

from lib_layout_retouch import retouch as pl
from lib_layout_retouch.schedule import Schedule
from tests.tolerance import network_roundings

T = 8


def run(setup, reference=None, **kw) -> pl.RetouchResult:
    """`pl.retouch` on `setup`; `reference` (a latent) replaces the dog photo's, `layouts`, `conds`
    and `schedule` theirs; RetouchSettings' fields and retouch's other arguments pass on."""
    model, conds, subject, ref, layouts = setup
    sched = kw.pop(
        "schedule", Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=5, scale=False)
    )
    fields = pl.RetouchSettings.__dataclass_fields__
    settings = pl.RetouchSettings(schedule=sched, **{k: kw.pop(k) for k in list(kw) if k in fields})
    return pl.retouch(
        model,
        reference_latent=ref if reference is None else reference,
        layout_latents=kw.pop("layouts", layouts),
        conds=kw.pop("conds", conds),
        subject_tokens=subject,
        settings=settings,
        **kw,
    )


def roundings(setup) -> int:
    """A retouched latent is the end of 2T UNet forwards in sequence: an inversion, then the T
    retouch steps (other batch compositions round differently: tests/tolerance.py)."""
    return 2 * T * network_roundings(setup[0].unet)


def mirrored(setup) -> torch.Tensor:
    """The dog photo's latent, mirrored: another reference."""
    return torch.flip(setup[3], dims=(-1,))


def another_reference(setup, **kw) -> pl.RetouchResult:
    """The retouch with the mirrored reference: what painting another identity moves (a change
    every comparison up to rounding must be able to see, so that it can fail)."""
    return run(setup, reference=mirrored(setup), **kw)
