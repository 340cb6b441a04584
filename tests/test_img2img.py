"""img2img on the tiny model: several reference photos, the inpaint mask, layout source `input`,
and the job's img2img record. Exact invariants (they fail if the code breaks them)."""

import numpy as np
import pytest
import torch
from PIL import Image

from lib_layout_retouch import job as lr_job
from lib_layout_retouch import retouch as pl
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import LayoutRetouchParams
from lib_layout_retouch.retouch import loop
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.unet import ddim
from lib_layout_retouch.unet.model import LdmModel
from tests.paths import DOG_PHOTO as PHOTO
from tests.paths import photo_tensor
from tests.sd1_retouch import T, mirrored, roundings, run
from tests.tolerance import (
    SubjectMapGain,
    assert_differs_beyond,
    assert_rounding_close,
    assert_same_mask,
    rounding_atol,
)


# -- several references -----------------------------------------------------------------------------
def _two_references(setup) -> torch.Tensor:
    """The reference photo and its mirror image."""
    return torch.cat([setup[3], mirrored(setup)])


def test_the_same_reference_twice_gives_the_result_of_once(setup):
    """[ref, ref]: the target's K/V are the reference's twice over; softmax with every key/value
    duplicated is the same attention, so the retouch is the same up to float rounding (the batched
    UNet call has one more row and the target's attention runs as its own SDPA)."""
    ref = setup[3]
    with SubjectMapGain() as gain:
        once = run(setup)
        twice = run(setup, reference=torch.cat([ref, ref]))
    tol = assert_rounding_close(twice.latents, once.latents, roundings(setup))
    # the mask is the layout's, untouched by the references (its maps round in another batch)
    assert_same_mask(twice, once, roundings(setup), gain.value)
    # a second, different reference does change the result, and costs its rows
    both = run(setup, reference=_two_references(setup))
    assert_differs_beyond(both.latents, once.latents, tol)
    # rows: inversions 2·T (one per reference), layout T·2; retouch after λ2: 2·(2 + 2 + 2)
    assert both.unet_rows == 2 * T + T * 2 + 2 * 4 + (T - 2) * 12


def test_each_reference_is_inverted_once_and_cached_on_its_own(setup):
    cache = pl.InversionCache(max_entries=4)
    single = run(setup, cache=cache, reference_key=("a", "m"))
    assert not single.reference_cached
    pair = run(
        setup,
        reference=_two_references(setup),
        cache=cache,
        reference_keys=[("a", "m"), ("b", "m")],
    )
    assert not pair.reference_cached and len(cache) == 2
    assert (
        pair.unet_calls == single.unet_calls
    )  # "a" came from the cache, only "b" was inverted (T calls)
    again = run(
        setup,
        reference=_two_references(setup),
        cache=cache,
        reference_keys=[("a", "m"), ("b", "m")],
    )
    assert again.reference_cached and torch.equal(again.latents, pair.latents)
    assert again.unet_calls == pair.unet_calls - T


def test_reference_attention_cache_with_several_references_gives_the_same_result(setup):
    refs = _two_references(setup)
    keys = [("a", "m"), ("b", "m")]
    kv = pl.ReferenceAttentionCache(max_bytes=1 << 30)
    first = run(setup, reference=refs, reference_keys=keys, cache=pl.InversionCache(4), kv_cache=kv)
    second = run(
        setup, reference=refs, reference_keys=keys, cache=pl.InversionCache(4), kv_cache=kv
    )
    assert len(kv) == 1 and second.unet_rows < first.unet_rows
    # the hit's calls carry no reference rows: up to rounding; the second photo moves it further
    tol = assert_rounding_close(second.latents, first.latents, roundings(setup))
    assert_differs_beyond(run(setup).latents, first.latents, tol)


def test_sequential_paths_equal_the_batched_call_with_several_references(setup):
    refs = _two_references(setup)
    batched = run(setup, reference=refs, skip_equal_target=False)
    sequential = run(setup, reference=refs, skip_equal_target=False, sequential=True)
    tol = assert_rounding_close(batched.latents, sequential.latents, roundings(setup))
    assert_differs_beyond(run(setup, skip_equal_target=False).latents, batched.latents, tol)


# -- the inpaint mask ---------------------------------------------------------------------------------
def _half_mask(n=2):
    u = torch.zeros(n, 1, 8, 8)
    u[..., 2:7, 1:6] = 1.0
    return u


def test_an_all_zero_user_mask_leaves_the_input_latents_exactly(setup):
    layouts = setup[4]
    res = run(setup, user_mask=torch.zeros(2, 1, 8, 8))
    assert torch.equal(res.latents, layouts)
    assert res.mask_kind == pl.MASK_USER and bool((res.masks == 0).all())


def test_outside_the_user_mask_the_input_exactly_inside_retouched(setup):
    layouts = setup[4]
    u = _half_mask()
    res = run(setup, user_mask=u)
    outside, inside = (u == 0).expand_as(layouts), (u == 1).expand_as(layouts)
    assert torch.equal(res.latents[outside], layouts[outside])
    tol = rounding_atol(layouts, roundings(setup))
    assert_differs_beyond(res.latents[inside], layouts[inside], tol)
    # M is bounded by U
    assert bool((res.masks[(u[:, 0] == 0)] == 0).all())
    assert res.mask_kind == pl.MASK_CA_ONLY + pl.IN_USER_MASK == "CA only in user mask"
    # a feathered mask: exactly the input where it is 0, too
    soft = u * 0.5
    res = run(setup, user_mask=soft[:1])  # (1, 1, h, w) broadcasts over the batch
    assert torch.equal(res.latents[outside], layouts[outside])


def test_where_the_attention_finds_nothing_inside_the_user_mask_it_is_softened(setup):
    m = run(setup).masks  # M without a user mask
    u = torch.zeros(2, 1, 8, 8)
    u[0, 0] = (m[0] == 0).float()  # image 1: only where M found nothing → U softened
    u[1, 0] = (m[1] > 0).float()  # image 2: on M → M·U
    assert u[0].any() and u[1].any()
    res = run(setup, user_mask=u)
    assert res.mask_kind == "CA only in user mask; user mask alone for image 1"
    assert np.array_equal(res.masks[0].numpy(), loop._softened(u[0, 0]))
    assert torch.equal(res.masks[1], m[1] * u[1, 0])
    for i in range(2):
        assert bool((res.masks[i][u[i, 0] == 0] == 0).all())  # never outside U
    # the softening: U's support with an EDT ramp, 0.5 at the rim and 1 at the core (like M)
    square = torch.zeros(8, 8)
    square[1:7, 1:7] = 1.0
    soft = loop._softened(square)
    assert soft[1, 1] == pytest.approx(0.5) and soft[3, 3] == pytest.approx(1.0) and soft[0, 0] == 0


def test_user_mask_shape_is_checked(setup):
    with pytest.raises(ValueError, match="user_mask"):
        run(setup, user_mask=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(setup, user_mask=torch.full((2, 1, 8, 8), 2.0))


# -- layout source `input` ----------------------------------------------------------------------------
def test_input_as_layout_with_copy_over_every_step_is_the_plain_ddim_reconstruction(setup):
    """layout_source 'input': the input's latents are inverted as the layout. With the reference =
    the input and λ2 = T (the layout copied at every step) the target IS the layout path, which is
    DDIM inversion ("", no CFG) then CFG sampling with y_p — computed here by hand. Tolerance 1e-4
    (values are ~0.1–1): the computation is the same, but in the retouch the layout path's mask
    layers run their cross-attention through the editor's SDPA (it records the subject maps there)
    where the plain loop runs ldm's own einsum softmax; those float differences (~1e-7) are
    amplified by CFG 7.5 over T steps (seen: 1.3e-5; the tolerance: 2T UNet forwards' rounding
    times the guidance, ~4e-4). An algorithmic difference (a wrong timestep, prompt or guidance)
    moves the result by far more (guidance 7.0: 0.04, checked below)."""
    model, conds, subject, _, _ = setup
    z0 = model.encode(photo_tensor())
    never = Schedule.for_steps(T, lambda1=1, lambda2=T, mask_start=T + 1, scale=False)
    res = run(setup, reference=z0, layouts=z0, schedule=never, guidance_scale=7.5)
    sched = ddim.DDIMSchedule.from_alphas_cumprod(model.alphas_cumprod, T)
    empty = model.conditioning([""])

    def eps_empty(x, t):
        return model.eps(x, torch.full((x.shape[0],), t, dtype=torch.long), empty)

    def eps_cfg(x, t, s):
        tt = torch.full((2,), t, dtype=torch.long)
        e = model.eps(torch.cat([x, x]), tt, torch.cat([conds.uncond, conds.layout]))
        return ddim.cfg_combine(e[:1], e[1:], 7.5)

    with torch.no_grad():
        zT = ddim.invert(eps_empty, z0, sched)[-1]
        expected = ddim.sample(eps_cfg, zT, sched)[-1]
    tol = assert_rounding_close(res.latents, expected, roundings(setup), gain=7.5)
    assert_differs_beyond(
        run(setup, reference=z0, layouts=z0, schedule=never, guidance_scale=7.0).latents,
        expected,
        tol,
    )
    # with guidance 1 and the empty prompt it is DDIM's plain round trip of the input (how close that
    # is to the input itself is DDIM's business: tests/test_ddim.py)
    plain = pl.RetouchConds(reference=empty, layout=empty, uncond=empty)
    back = run(setup, reference=z0, layouts=z0, schedule=never, guidance_scale=1.0, conds=plain)
    with torch.no_grad():
        round_trip = ddim.sample(lambda x, t, s: eps_empty(x, t), zT, sched)[-1]
    assert_rounding_close(back.latents, round_trip, roundings(setup))  # guidance 1: no gain


# -- the job ------------------------------------------------------------------------------------------
def _photos(n):
    base = (
        np.asarray(Image.open(PHOTO).convert("RGB").reduce(4))
        if PHOTO.exists()
        else np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    )
    return [Image.fromarray(np.roll(base, 9 * i, axis=1)) for i in range(n)]


def make_job(reference_image, **kw):
    params = LayoutRetouchParams(
        enabled=True,
        reference_image=reference_image,
        personalization="textual_inversion",
        concept_token="sks",
        class_phrase="dog",
        lambda1=1,
        lambda2=1,
        mask_start=3,
        scale_with_steps=False,
        layout_source=kw.pop("layout_source", "inversion"),
    )
    return lr_job.RetouchJob(
        params,
        prompt="a sks dog on the beach",
        negative_prompt="",
        steps=kw.pop("steps", 4),
        width=64,
        height=64,
        guidance_scale=7.0,
        **kw,
    )


def test_job_with_several_references_and_an_inpaint_mask(tiny_ldm):
    model = LdmModel(tiny_ldm)
    photos = _photos(2)
    job = make_job(photos)
    assert len(job.references) == 2 and len(set(job.reference_fingerprints)) == 2
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cache = pl.InversionCache(4)
    assert job.references_cached(cache, "tiny", (8, 8)) == 0
    u = torch.zeros(1, 1, 8, 8)
    u[..., 1:7, 1:7] = 1.0  # meets every cell of the 4×4 CA map, leaves a border outside
    res = job.retouch(
        model, latents, subject_tokens=[2, 3], model_key="tiny", cache=cache, user_mask=u
    )
    assert job.references_cached(cache, "tiny", (8, 8)) == 2
    out = (u == 0).expand_as(latents)
    assert torch.equal(res.latents[out], latents[out])
    info = job.infotext()
    assert info["LR reference"] == ", ".join(job.params.reference_fingerprints())
    # The subject's CA mask is never empty (its peak, 1 after normalising, passes any threshold < 1)
    # and U meets every CA cell, so M·U is not empty: CA inside U, never the fallback to U alone.
    assert info["LR mask"] == pl.MASK_CA_ONLY + pl.IN_USER_MASK
    # one photo: as before
    single = make_job(photos[0])
    assert single.reference_fingerprints == [single.reference_fingerprint]


def test_job_names_the_bad_photo_among_several():
    with pytest.raises(LayoutRetouchError, match="reference photo 2 of 2"):
        make_job([_photos(1)[0], np.zeros((4, 4, 7), np.uint8)])


def test_job_img2img_record_and_input_only_in_img2img():
    with pytest.raises(LayoutRetouchError) as e:
        make_job(_photos(1)[0], layout_source="input")
    assert e.value.parameter == "layout_source" and "img2img" in str(e.value)
    job = make_job(_photos(1)[0], layout_source="input", img2img=True)
    assert job.params.layout_source == "input"
    # img2img at 20 steps × 0.75: the sampler runs 16; the schedule and the infotext are at 16
    from lib_layout_retouch.schedule import img2img_steps

    params = LayoutRetouchParams(
        enabled=True,
        reference_image=_photos(1)[0],
        personalization="lora",
        concept_token="sks",
        class_phrase="dog",
    )
    job = lr_job.RetouchJob(
        params,
        prompt="a sks dog",
        negative_prompt="",
        steps=img2img_steps(20, 0.75),
        width=64,
        height=64,
        guidance_scale=7.0,
        img2img=True,
        requested_steps=20,
    )
    assert (
        job.schedule.steps,
        job.schedule.lambda1,
        job.schedule.lambda2,
        job.schedule.mask_start,
    ) == (16, 2, 3, 11)
    assert (
        job.infotext()["LR steps used"]
        == "λ1=2, λ2=3, mask from step 11 of 16 (img2img ran 16 of 20 steps)"
    )
    assert (
        job.for_batch("a sks dog", "")
        .infotext()["LR steps used"]
        .endswith("(img2img ran 16 of 20 steps)")
    )


def test_progress_over_several_reference_inversions_never_goes_back(setup):
    seen = []
    run(
        setup,
        reference=_two_references(setup),
        progress=lambda phase, s, total: seen.append((phase, s, total)),
    )
    inv = [(s, total) for phase, s, total in seen if phase == "reference inversion"]
    assert inv == [(s, 2 * T) for s in range(1, 2 * T + 1)]
