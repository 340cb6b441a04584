"""The steps and model calls A1111 v1.10.1's samplers really make (what λ1 counts)."""

import pytest

from lib_layout_retouch import sampler_steps as ss


def _ddim_calls(n: int, t_enc: int | None = None) -> int:
    """A1111's DDIM loop, counted: `range(0, 1000, 1000 // n) + 1` timesteps (img2img: the first
    t_enc), `len(timesteps) - 1` iterations of one model call."""
    timesteps = list(range(0, 1000, 1000 // n))
    if t_enc is not None:
        timesteps = timesteps[:t_enc]
    return len(timesteps) - 1


@pytest.mark.parametrize("n", [2, 3, 7, 8, 10, 20, 33, 50, 64])
def test_ddim_txt2img_runs_what_its_loop_runs(n):
    plan = ss.sampler_steps("DDIM", ss.DDIM_LIKE, n)
    assert plan.steps == _ddim_calls(n) and plan.evaluations == plan.steps
    assert [plan.step_of(e) for e in range(1, plan.steps + 1)] == list(range(1, plan.steps + 1))


def test_ddim_at_10_runs_9_and_at_7_runs_7():
    assert ss.sampler_steps("DDIM", ss.DDIM_LIKE, 10).steps == 9
    # 1000 // 7 = 142 → 8 timesteps 1 … 995 → 7 calls
    assert ss.sampler_steps("DDIM", ss.DDIM_LIKE, 7).steps == 7
    assert ss.sampler_steps("DDIM", ss.DDIM_LIKE, 10).words() == (
        "DDIM runs 9 steps for 10 (a timestep sampler: it stops one step early)"
    )
    # 1000 // 60 = 16 apart: 63 timesteps, 62 steps — more than asked, not one early
    assert ss.sampler_steps("DDIM", ss.DDIM_LIKE, 60).words() == (
        "DDIM runs 62 steps for 60 (a timestep sampler: its timesteps are 16 apart)"
    )


@pytest.mark.parametrize("n,strength", [(10, 0.75), (8, 0.75), (20, 0.5), (10, 1.0), (7, 0.3)])
def test_ddim_img2img_runs_t_enc_minus_one(n, strength):
    full, t_enc = ss.img2img_t_enc(n, strength, fix_steps=False)
    plan = ss.sampler_steps("DDIM", ss.DDIM_LIKE, n, img2img_t_enc=t_enc, img2img_steps=full)
    assert t_enc == int(min(strength, 0.999) * n)
    assert plan.steps == _ddim_calls(full, t_enc)
    if (n, strength) == (10, 0.75):
        assert plan.steps == 6  # the example: 10 steps at 0.75 runs 6 model calls
        # the strength set the count, not DDIM's early stop: the words don't claim the latter
        assert plan.words() == "DDIM runs 6 steps for 10 (a timestep sampler)"


def test_img2img_fix_steps():
    full, t_enc = ss.img2img_t_enc(10, 0.5, fix_steps=True)
    assert (full, t_enc) == (20, 9)
    assert ss.sampler_steps("DDIM", ss.DDIM_LIKE, 10, img2img_t_enc=9, img2img_steps=20).steps == 8
    kd = ss.sampler_steps("Euler", ss.FIRST_ORDER, 10, img2img_t_enc=9, img2img_steps=20)
    assert kd.steps == 10 and kd.words() == ""


def test_plms_two_calls_in_its_first_step():
    plan = ss.sampler_steps("PLMS", ss.PLMS, 10)
    assert (plan.steps, plan.evaluations) == (9, 10)
    assert [plan.step_of(e) for e in range(1, 11)] == [1, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert plan.calls_in_first(2) == 3


def test_unipc_runs_every_timestep():
    plan = ss.sampler_steps("UniPC", ss.UNIPC, 10)
    assert (plan.steps, plan.evaluations) == (10, 10)
    assert plan.words() == ""


def test_k_diffusion_first_and_second_order():
    euler = ss.sampler_steps("Euler a", ss.FIRST_ORDER, 8)
    assert (euler.steps, euler.evaluations, euler.words()) == (8, 8, "")
    heun = ss.sampler_steps("Heun", ss.SECOND_ORDER, 8)
    assert (heun.steps, heun.evaluations) == (8, 15)  # the last step (σ_next = 0) calls once
    assert [heun.step_of(e) for e in range(1, 16)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8]
    assert heun.calls_in_first(3) == 6
    assert "15 model calls" in heun.words()
    img = ss.sampler_steps("Euler", ss.FIRST_ORDER, 10, img2img_t_enc=7, img2img_steps=10)
    assert img.steps == 8  # sigmas[steps - t_enc - 1:]: t_enc + 1 intervals


def test_unknown_sampler():
    plan = ss.sampler_steps("DPM adaptive", ss.UNKNOWN, 10)
    assert not plan.known and plan.evaluations is None
    assert "decides its model calls" in plan.words()


def test_discard_penultimate_adds_a_timestep():
    assert ss.timestep_count(10) == 10
    assert ss.timestep_count(10, discard_penultimate=True) == len(range(0, 1000, 1000 // 11)) == 12
