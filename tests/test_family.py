"""The retouch loop reaches the model only through its family (sampler, layer table, editor, patch):
a family that wraps the ε-UNet one sees every call, and the result is bit for bit the default's."""

import torch

from lib_layout_retouch.retouch import family
from lib_layout_retouch.retouch import loop as pl
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.unet.model import LdmModel

T = 6


class CountingSampler:
    def __init__(self, inner, seen):
        self.inner, self.seen, self.steps = inner, seen, inner.steps

    def __getattr__(self, name):  # time_of_step, level_before_step, predict, guide, step, invert
        self.seen.append(name)
        return getattr(self.inner, name)


class CountingFamily(family.EpsUNetFamily):
    def __init__(self):
        self.seen = []

    def sampler(self, model, steps, latent_hw=None):
        self.seen.append("sampler")
        return CountingSampler(super().sampler(model, steps, latent_hw), self.seen)

    def layer_table(self, model, preset):
        self.seen.append("layer_table")
        return super().layer_table(model, preset)

    def editor(self, *args):
        self.seen.append("editor")
        return super().editor(*args)

    def patched(self, model, editor):
        self.seen.append("patched")
        return super().patched(model, editor)


def _retouch(model, setup):
    _, conds, subject, ref, layouts = setup
    settings = pl.RetouchSettings(
        schedule=Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=4, scale=False)
    )
    return pl.retouch(
        model,
        reference_latent=ref,
        layout_latents=layouts,
        conds=conds,
        subject_tokens=subject,
        settings=settings,
    )


def test_a_model_family_supplies_sampler_layers_editor_and_patch(setup, tiny_ldm):
    plain = LdmModel(tiny_ldm)
    assert family.family_of(plain) is family.EPS_UNET
    default = _retouch(plain, setup)
    wrapped = LdmModel(tiny_ldm)
    wrapped.retouch_family = CountingFamily()
    res = _retouch(wrapped, setup)
    seen = wrapped.retouch_family.seen
    assert seen[:3] == ["sampler", "layer_table", "editor"]
    # the two inversions (reference, layout) before the attention is patched, the steps inside
    last_invert = len(seen) - 1 - seen[::-1].index("invert")
    assert last_invert < seen.index("patched") < seen.index("time_of_step")
    for name in ("patched", "invert", "predict", "guide", "step", "time_of_step"):
        assert name in seen, name
    # one inversion per reference and layout, T retouch steps: predict/step go through the family
    assert seen.count("invert") == 2 and seen.count("time_of_step") == T
    assert torch.equal(res.latents, default.latents)
    assert torch.equal(res.masks, default.masks)
