"""Stage 1 through the family's sampler: the per-step (model, prompt) trace, and the DreamBooth UNet
switch by reference (the ε-UNet family's vanilla context)."""

import torch

from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.stage1 import sample_step_blended
from lib_layout_retouch.unet.family import unet_swapped
from lib_layout_retouch.unet.model import LdmModel
from tests.tolerance import assert_differs_beyond, network_roundings, rounding_atol


def test_stage1_trace_is_vanilla_layout_prompt_then_personalized(tiny_ldm, tiny_vanilla_unet):
    model = LdmModel(tiny_ldm)
    personal_unet = model.unet
    sched = Schedule.for_steps(10, lambda1=3, lambda2=2, mask_start=6, scale=False)
    sampler = model.family.sampler(model, 10)
    c = model.conditioning(["a dog on the beach", "a sks dog on the beach", ""])
    c_layout, c_personal, uncond = c[0:1], c[1:2], c[2:3]
    trace, ran = [], []
    hooks = [
        u.register_forward_pre_hook(lambda m, a, label=label: ran.append(label))
        for u, label in ((tiny_vanilla_unet, "vanilla"), (personal_unet, "personal"))
    ]
    real_eps = model.eps

    def traced(x, t, cond):
        # which UNet actually ran, and which prompt the conditional half carried
        prompt = (
            "y_p-"
            if torch.equal(cond[1:2], c_layout)
            else "y_p"
            if torch.equal(cond[1:2], c_personal)
            else "?"
        )
        assert torch.equal(cond[0:1], uncond)
        out = real_eps(x, t, cond)
        trace.append((ran.pop(), prompt, int(t[0])))
        assert not ran
        return out

    model.eps = traced
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = sample_step_blended(
        sampler,
        model,
        sched,
        c_layout,
        c_personal,
        uncond,
        noise,
        7.5,
        vanilla=lambda: model.family.vanilla(model, tiny_vanilla_unet),
    )
    for h in hooks:
        h.remove()
    assert len(traj) == 11 and torch.equal(traj[0], noise)
    expected = [("vanilla", "y_p-")] * 3 + [("personal", "y_p")] * 7
    assert [t[:2] for t in trace] == expected
    assert [t[2] for t in trace] == list(reversed(sampler.schedule.timesteps))
    assert tiny_ldm.model.diffusion_model is personal_unet  # switched back by reference


def test_step_blend_changes_the_layout_versus_plain_personalized(tiny_ldm, tiny_vanilla_unet):
    model = LdmModel(tiny_ldm)
    c = model.conditioning(["a dog", "a sks dog", ""])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def run(l1):
        return sample_step_blended(
            model.family.sampler(model, 8),
            model,
            Schedule.for_steps(8, lambda1=l1, lambda2=1, mask_start=5, scale=False),
            c[0:1],
            c[1:2],
            c[2:3],
            noise,
            5.0,
            vanilla=lambda: model.family.vanilla(model, tiny_vanilla_unet),
        )[-1]

    plain, blended = run(0), run(3)
    # more than the rounding drift of 8 UNet forwards in sequence
    tol = rounding_atol(plain, 8 * network_roundings(tiny_ldm.model.diffusion_model))
    assert_differs_beyond(plain, blended, tol)
    assert torch.equal(run(0), plain)  # deterministic


def test_unet_swapped_restores_on_error(tiny_ldm, tiny_vanilla_unet):
    original = tiny_ldm.model.diffusion_model
    try:
        with unet_swapped(tiny_ldm, tiny_vanilla_unet):
            assert tiny_ldm.model.diffusion_model is tiny_vanilla_unet
            raise RuntimeError("x")
    except RuntimeError:
        pass
    assert tiny_ldm.model.diffusion_model is original
