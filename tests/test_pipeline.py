"""Stage 2 end to end on the tiny model: docs/ALGORITHM.md "What must hold" and the pipeline's promises."""

import numpy as np
import pytest
import torch

from lib_layout_retouch import retouch as pl
from lib_layout_retouch.errors import Interrupted
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.retouch.editor import LAYOUT, TARGET
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.unet import ddim
from lib_layout_retouch.unet.layers import attention_modules, layer_table_for
from lib_layout_retouch.unet.model import LdmModel
from tests.paths import photo_tensor
from tests.sd1_retouch import T, another_reference, roundings, run
from tests.tolerance import (
    SubjectMapGain,
    assert_differs_beyond,
    assert_rounding_close,
    assert_same_mask,
    network_roundings,
    rounding_atol,
)


def test_subject_tokens_point_at_sks_and_dog(setup):
    model, _, subject, _, _ = setup
    ids = model.tokenize("a sks dog on the beach")
    assert subject == [2, 3] and len(ids) == 6


def test_full_layout_swap_makes_target_equal_layout_until_lambda2(setup):
    res = run(setup, skip_equal_target=False, keep_trajectories=True)
    lay, tgt = res.trajectories[LAYOUT], res.trajectories[TARGET]
    for s in (1, 2):  # s ≤ λ2
        tol = assert_rounding_close(tgt[s - 1], lay[s - 1], roundings(setup))
    assert_differs_beyond(tgt[-1], lay[-1], tol)  # then the identity is painted


def test_without_the_swap_target_differs_from_layout(setup):
    model = setup[0]
    table = layer_table_for(model.unet).with_layout_layers(())
    res = run(setup, skip_equal_target=False, keep_trajectories=True, layers=table)
    lay = res.trajectories[LAYOUT][1]
    assert_differs_beyond(res.trajectories[TARGET][1], lay, rounding_atol(lay, roundings(setup)))


def test_fast_path_equals_computed_target(setup):
    fast = run(setup, keep_trajectories=True)
    slow = run(setup, skip_equal_target=False, keep_trajectories=True)
    # the fast path's calls have fewer rows (no target rows while the layout is copied): another
    # GEMM blocking (seen: 8.9e-6 on an AVX-512 Xeon against a tolerance of ~2.3e-4)
    tol = assert_rounding_close(fast.latents, slow.latents, roundings(setup))
    assert_differs_beyond(another_reference(setup).latents, slow.latents, tol)
    assert fast.unet_rows < slow.unet_rows


def test_batched_three_path_step_equals_one_call_per_path(setup):
    with SubjectMapGain() as gain:
        batched = run(setup, skip_equal_target=False)
        sequential = run(setup, skip_equal_target=False, sequential=True)
    tol = assert_rounding_close(batched.latents, sequential.latents, roundings(setup))
    assert_differs_beyond(another_reference(setup).latents, batched.latents, tol)
    assert sequential.unet_calls > batched.unet_calls
    assert_same_mask(sequential, batched, roundings(setup), gain.value)


def test_one_batched_unet_call_per_step_and_rows(setup):
    res = run(setup)
    # T inversion calls for the reference, T for the layouts, T retouch calls
    assert res.unet_calls == 3 * T
    # rows: inversion 1 + 2 per step; retouch: λ2 steps layout only (2 halves × 2 images),
    # later steps reference + layout + target (2 × (1 + 2 + 2))
    assert res.unet_rows == T * 1 + T * 2 + 2 * 4 + (T - 2) * 10


def test_reference_inversion_cached_per_reference_model_and_steps(setup):
    cache = pl.InversionCache(max_entries=2)
    first = run(setup, cache=cache, reference_key=("ref-a", "model-1"))
    second = run(setup, cache=cache, reference_key=("ref-a", "model-1"))
    assert not first.reference_cached and second.reference_cached
    assert second.unet_calls == first.unet_calls - T
    assert torch.equal(first.latents, second.latents)
    run(setup, cache=cache, reference_key=("ref-b", "model-1"))
    run(setup, cache=cache, reference_key=("ref-c", "model-1"))
    assert len(cache) == 2 and cache.get(("ref-a", "model-1", T, (8, 8))) is None  # bounded LRU


def test_mask_is_built_from_layout_cross_attention(setup):
    res = run(setup)
    assert res.mask_kind == pl.MASK_CA_ONLY
    assert res.masks.shape == (2, 8, 8) and res.ca_maps.shape == (2, 4, 4)
    m = res.masks.numpy()
    assert m.min() >= 0 and m.max() <= 1 and (m == 0).any() and (m >= 0.5).any()
    assert np.isclose(res.ca_maps.numpy().max(axis=(1, 2)), 1).all()


class WholeImageSegmenter:  # stands in for SAM: the whole image is the subject, so M = 1 everywhere
    def segment(self, image, norm_map, ca_mask):
        return np.ones(image.shape[:2], bool)


def test_blending_changes_the_result_and_mask_one_is_no_blend(setup):
    never = Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=T + 1, scale=False)
    no_blend = run(setup, schedule=never)
    blended = run(setup)
    tol = rounding_atol(no_blend.latents, roundings(setup))
    assert_differs_beyond(no_blend.latents, blended.latents, tol)
    # M = 1: z_t <- M*z_t + (1-M)*z_l keeps the target as it is, i.e. the same as never blending
    ones = run(
        setup, segmenter=WholeImageSegmenter(), layout_images=np.zeros((2, 64, 64, 3), np.uint8)
    )
    assert ones.mask_kind == pl.MASK_SAM and bool((ones.masks == 1).all())
    assert_rounding_close(ones.latents, no_blend.latents, roundings(setup))


def test_sam_mask_joins_the_mask(setup):
    class HalfImageSegmenter:  # stands in for SAM: the left half of the image is the subject
        def segment(self, image, norm_map, ca_mask):
            m = np.zeros(image.shape[:2], bool)
            m[:, : image.shape[1] // 2] = True
            return m

    images = np.zeros((2, 64, 64, 3), np.uint8)
    res = run(setup, segmenter=HalfImageSegmenter(), layout_images=images)
    assert res.mask_kind == pl.MASK_SAM and res.masks.shape == (2, 64, 64)
    assert (res.masks[:, :, :32] >= 0.5).all()


def test_layout_from_stage1_trajectory(setup, monkeypatch):
    model, conds, subject, ref, layouts = setup
    traj = [
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(T + 1)
    ]
    stepped = []  # (s, latent) of every DDIM step; the layout path's comes first in each retouch step
    real_step = ddim.denoise_step

    def spy(schedule, x, eps, s):
        stepped.append((s, x.clone()))
        return real_step(schedule, x, eps, s)

    monkeypatch.setattr(ddim, "denoise_step", spy)
    res = run(setup, layout_trajectory=traj, keep_trajectories=True)
    assert res.unet_calls == 2 * T  # no layout inversion
    # the layout path is re-set to the trajectory at every step: step s starts from z_(s-1) of stage 1,
    # never from the retouch's own previous layout latent
    first = {}
    for s, x in stepped:
        first.setdefault(s, x)
    assert sorted(first) == list(range(1, T + 1))
    for s in range(1, T + 1):
        assert torch.equal(first[s], traj[s - 1]), s
    assert not torch.equal(
        res.trajectories[LAYOUT][0], traj[1]
    )  # (the spy is needed: outputs are not inputs)
    with pytest.raises(ValueError):
        run(setup, layout_trajectory=traj[:-1])


def test_interrupt_restores_every_forward_and_progress_reports(setup):
    model = setup[0]
    unet = model.unet
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    c = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(x, torch.tensor([300]), context=c)
    seen = []

    def progress(phase, s, total):
        seen.append((phase, s, total))

    with pytest.raises(Interrupted):
        run(
            setup,
            progress=progress,
            should_stop=lambda: sum(p == "retouch" for p, _, _ in seen) >= 4,
        )
    assert ("reference inversion", T, T) in seen and ("layout inversion", T, T) in seen
    assert ("retouch", 4, T) in seen and ("retouch", 5, T) not in seen
    assert all("forward" not in m.__dict__ for m in attention_modules(unet).values())
    with torch.no_grad():
        assert torch.equal(unet(x, torch.tensor([300]), context=c), before)


def test_generate_both_stages_end_to_end(tiny_ldm, tiny_vanilla_unet):
    model = LdmModel(tiny_ldm)
    prompts = derive_prompts("a sks dog jumping over the fence", "sks", "dog")
    settings = pl.RetouchSettings(
        schedule=Schedule.for_steps(6, lambda1=1, lambda2=1, mask_start=4, scale=False)
    )
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    both = dict(prompts=prompts, reference_image=photo_tensor(), noise=noise, settings=settings)
    out = pl.generate(model, **both, vanilla_unet=tiny_vanilla_unet)
    assert out.images.shape == (2, 3, 64, 64) and out.layout_images.shape == (2, 3, 64, 64)
    decoded = network_roundings(tiny_ldm.first_stage_model.decoder)
    assert_differs_beyond(out.images, out.layout_images, rounding_atol(out.layout_images, decoded))
    fast = pl.generate(model, **both, vanilla_unet=tiny_vanilla_unet, layout_source="stage1")
    assert fast.retouch.unet_calls == out.retouch.unet_calls - 6
    assert torch.equal(fast.layout_latents, out.layout_latents)


def test_reference_path_without_reset_steps_itself(setup):
    reset = run(setup)
    free = run(setup, reset_reference=False)
    # without the reset the reference path runs (and steps) at every step, copy phase included
    assert free.unet_rows == reset.unet_rows + 2 * 2
    assert_differs_beyond(
        reset.latents, free.latents, rounding_atol(reset.latents, roundings(setup))
    )


def test_reference_attention_cache_drops_the_reference_rows_and_keeps_the_result(setup):
    model, conds, subject, ref, layouts = setup
    kv = pl.ReferenceAttentionCache(max_bytes=10**9)
    inv = pl.InversionCache(4)
    first = run(setup, cache=inv, kv_cache=kv, reference_key=("ref", "model"))
    assert len(kv) == 1 and kv.nbytes() > 0
    one_reference = kv.nbytes()
    second = run(setup, cache=inv, kv_cache=kv, reference_key=("ref", "model"))
    # the hit's calls have fewer rows (no reference rows): equal up to rounding, not bit for bit
    tol = assert_rounding_close(second.latents, first.latents, roundings(setup))
    assert_differs_beyond(another_reference(setup).latents, first.latents, tol)
    # no reference inversion (T rows) and no reference rows in the T−λ2 identity steps (2 each)
    assert second.unet_rows == first.unet_rows - T - 2 * (T - 2)
    # another negative prompt is another key: the reference runs again
    other = pl.RetouchConds(reference=conds.reference, layout=conds.layout, uncond=conds.reference)
    res = pl.retouch(
        model,
        reference_latent=ref,
        layout_latents=layouts,
        conds=other,
        subject_tokens=subject,
        settings=pl.RetouchSettings(
            schedule=Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=5, scale=False)
        ),
        cache=inv,
        kv_cache=kv,
        reference_key=("ref", "model"),
    )
    assert res.unet_rows == first.unet_rows - T
    # bounded: a cache smaller than one step keeps nothing, and the run is still right
    tiny = pl.ReferenceAttentionCache(max_bytes=1000)
    again = run(setup, cache=inv, kv_cache=tiny, reference_key=("ref", "model"))
    assert len(tiny) == 0 and tiny.nbytes() == 0
    assert_rounding_close(again.latents, first.latents, roundings(setup))
    # room for about half the steps: those are reused, the others recomputed, same result
    half = pl.ReferenceAttentionCache(max_bytes=one_reference // 2)
    run(setup, cache=inv, kv_cache=half, reference_key=("ref", "model"))
    assert 0 < half.nbytes() <= one_reference // 2
    partial = run(setup, cache=inv, kv_cache=half, reference_key=("ref", "model"))
    assert second.unet_rows < partial.unet_rows < first.unet_rows - T
    assert_rounding_close(partial.latents, first.latents, roundings(setup))
    # off by default (0 bytes)
    off = pl.ReferenceAttentionCache()
    run(setup, cache=inv, kv_cache=off, reference_key=("ref", "model"))
    assert len(off) == 0


def test_row_plans_and_their_device_indices_are_made_once_per_row_layout(setup, monkeypatch):
    """The editor keeps device-side row indices on the plan; the retouch must not rebuild plans (and
    so those indices, a host→device copy on a GPU) every step: one plan per distinct row layout."""
    from lib_layout_retouch.retouch import editor as attention

    built, gathers = [], []
    real_build = attention.RowPlan.build.__func__
    real_gather = attention.RowPlan.reference_gather

    def counting_build(cls, paths, *a, **k):
        built.append(tuple(paths))
        return real_build(cls, paths, *a, **k)

    def counting_gather(self, device):
        if ("reference_gather", device) not in self.derived:
            gathers.append(id(self))
        return real_gather(self, device)

    monkeypatch.setattr(attention.RowPlan, "build", classmethod(counting_build))
    monkeypatch.setattr(attention.RowPlan, "reference_gather", counting_gather)
    res = run(setup)
    assert res.unet_calls == 3 * T
    assert len(built) == len(set(built)) == 2  # layout-only steps (s ≤ λ2), then three paths
    assert len(gathers) == 1  # made once, for the three-path plan
