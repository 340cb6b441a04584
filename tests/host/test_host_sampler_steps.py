"""λ1 counts the steps the WebUI's sampler really runs, for every sampler family (issue 20).

The test-only probe extension (`probe/`) records each UNet call by its weights, so these tests count
the calls the WebUI makes without trusting the extension's own log: a plain generation gives the
number of model calls per sampler (checked against `sampler_steps`), and an enabled one must start
with exactly the calls of the first λ1 sampler steps on the vanilla UNet, then the personalized one.

Families: DDIM / PLMS / UniPC (timestep samplers: DDIM and PLMS stop one step early, PLMS calls twice
in its first step), Euler a (k-diffusion, one call per step), Heun (second order: two calls per step,
one in the last; λ1 counts its steps, so λ1 = 2 is 4 calls)."""

from __future__ import annotations

import re

import host_helpers as H
import pytest

from lib_layout_retouch import sampler_steps as ss

pytestmark = pytest.mark.usefixtures("webui")

FAMILY = {
    "DDIM": ss.DDIM_LIKE,
    "PLMS": ss.PLMS,
    "UniPC": ss.UNIPC,
    "Euler a": ss.FIRST_ORDER,
    "Heun": ss.SECOND_ORDER,
}
STRENGTH = 0.75


def unet_calls(url: str) -> list[str]:
    """The UNet calls since the last call of this (the probe extension's list; it clears it)."""
    return H.get(url, "/lr-probe/unet-calls")["calls"]


def plan(sampler: str, steps: int, img2img: bool) -> ss.SamplerSteps:
    if not img2img:
        return ss.sampler_steps(sampler, FAMILY[sampler], steps)
    full, t_enc = ss.img2img_t_enc(steps, STRENGTH, fix_steps=False)
    return ss.sampler_steps(
        sampler, FAMILY[sampler], steps, img2img_t_enc=t_enc, img2img_steps=full
    )


def generate(url: str, body_lr, img2img: bool, **kw) -> H.Result:
    if img2img:
        if body_lr is None:
            return H.img2img(url, H.img2img_body(denoising_strength=STRENGTH, **kw))
        return H.img2img(url, H.lr_img2img_body(body_lr, denoising_strength=STRENGTH, **kw))
    body = H.lr_body(body_lr, **kw) if body_lr is not None else H.plain_body(**kw)
    return H.txt2img(url, body)


CASES = [
    # (sampler, steps, λ1, img2img)
    ("DDIM", 10, 3, False),
    ("PLMS", 10, 3, False),
    ("UniPC", 10, 3, False),
    ("Euler a", 8, 3, False),
    ("Heun", 6, 2, False),
    ("DDIM", 10, 3, True),
    ("PLMS", 10, 3, True),
    ("UniPC", 10, 3, True),
    ("Euler a", 10, 3, True),
    ("Heun", 8, 2, True),
]


@pytest.mark.parametrize("sampler,steps,lambda1,img2img", CASES)
def test_switch_after_exactly_lambda1_sampler_steps(webui, lr, sampler, steps, lambda1, img2img):
    url = webui.url
    expect = plan(sampler, steps, img2img)
    unet_calls(url)  # clear
    plain = generate(url, None, img2img, sampler_name=sampler, steps=steps)
    assert plain.ok, plain.describe()
    calls = unet_calls(url)
    personal = set(calls)
    assert len(personal) == 1, f"a plain run used several UNets: {personal}"
    assert len(calls) == expect.evaluations, (
        f"{sampler} at {steps} steps{' (img2img)' if img2img else ''} made {len(calls)} model calls, "
        f"sampler_steps says {expect.evaluations} ({expect})"
    )

    mark = webui.log_mark()
    r = generate(url, lr(lambda1=lambda1), img2img, sampler_name=sampler, steps=steps)
    got = H.assert_retouched(r)
    calls = unet_calls(url)
    vanilla_calls = expect.calls_in_first(lambda1)
    head, switch = calls[:vanilla_calls], calls[vanilla_calls]
    assert len(set(head)) == 1 and not (set(head) & personal), (
        f"the first {vanilla_calls} calls are not all the vanilla UNet: {calls[: vanilla_calls + 2]}"
    )
    assert switch in personal, (
        f"call {vanilla_calls + 1} should be the personalized UNet: {calls[: vanilla_calls + 2]}"
    )
    stage1 = calls[: expect.evaluations]
    assert stage1.count(switch) == expect.evaluations - vanilla_calls >= 1, (
        "the personalized model must draw the rest of stage 1"
    )
    log = webui.log_since(mark)
    m = re.search(r"switched to personalized UNet at step (\d+) \(after (\d+) model calls\)", log)
    assert m and (int(m.group(1)), int(m.group(2))) == (lambda1 + 1, vanilla_calls), log[-2000:]
    if expect.words():
        assert f"stage 1: {expect.words()}" in got["LR steps used"], got


@pytest.mark.parametrize(
    "sampler,steps,img2img,largest",
    [("DDIM", 10, False, 8), ("DDIM", 10, True, 5), ("Heun", 6, False, 5)],
)
def test_lambda1_that_leaves_no_personalized_step_is_refused(
    webui, lr, sampler, steps, img2img, largest
):
    """DDIM at 10 steps runs 9 (img2img at 0.75: 6): λ1 = 9 (6) would leave the personalized model
    nothing; the largest accepted value is one less than the steps run. λ1 = the slider's steps is
    refused with the SAME bound (one check: the sampler's), not the step count's first."""
    url = webui.url
    unet_calls(url)
    expect = plan(sampler, steps, img2img)
    for value in sorted({largest + 1, steps}):
        bad = generate(url, lr(lambda1=value), img2img, sampler_name=sampler, steps=steps)
        assert bad.status == 422, bad.describe()
        H.assert_error_names(bad, "lambda1", "λ1")
        detail = H.error_text(bad)
        assert f"between 0 and {largest}" in detail, (value, detail)
        if expect.steps != steps:  # the sampler runs other steps than the slider's: it says so
            assert expect.words() in detail, detail
    assert unet_calls(url) == [], "a refused request ran the UNet"
    ok = generate(url, lr(lambda1=largest), img2img, sampler_name=sampler, steps=steps)
    H.assert_retouched(ok)
