"""Stage 2 — the retouch (paper Algorithm 1), the same loop for every model family.

    z_r[0…T] ← Inversion(Encode(I_r), "")          cached per (reference, model, T)
    z_o[0…T] ← Inversion(z_o[0], "")               or the stage-1 trajectory (layout_source="stage1")
    z_t ← z_o[T]
    for s = 1 … T: one batched model call with the reference, layout and target paths (× CFG
        halves); the editor copies the layout (s ≤ λ2), paints the reference identity (s > λ2) and
        blends with the adaptive mask M (s ≥ mask_start); each path takes a sampling step.
    I_t ← Decode(z_t)

Fast paths that change no result: while s ≤ λ2 and the layout is copied into every layer the target
equals the layout path exactly (docs/ALGORITHM.md invariant), so the target rows are not computed and
z_t ← z_o; the reference path is only run when its K/V are used (s > λ2).

Everything that differs between model families — the sampler (DDIM, a flow solver), the
conditionings, the layer table, the editor's processors and the patch — is the family's
(`retouch.family.ModelFamily`); nothing here asks which family it holds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .. import conditioning as C
from .. import masks
from ..errors import Interrupted, LayoutRetouchError
from . import caches
from .conds import RetouchConds
from .editor import COND, LAYOUT, REFERENCE, TARGET, UNCOND, RowPlan, StepState, token_groups
from .family import Sampler, family_of
from .layers import LayerTable

ProgressFn = Callable[[str, int, int], None]  # (phase, step, total)

MASK_CA_ONLY = "CA only"
MASK_SAM = "SAM+CA"
# Inpaint: M bounded by the user's mask U ("CA only in user mask"), or — where M·U is
# empty for every image — U softened like M ("user mask").
MASK_USER = "user mask"
IN_USER_MASK = " in user mask"


@dataclass
class RetouchSettings:
    schedule: object  # schedule.Schedule (steps, λ1, λ2, mask_start)
    guidance_scale: float = 7.5
    ca_threshold: float = masks.DEFAULT_CA_THRESHOLD
    reset_reference: bool = True  # re-set the reference path to its inversion latents each step
    layers: Optional[LayerTable] = None  # None: the table for this UNet and `layer_preset`
    layer_preset: str = "standard"  # layers.PRESETS: which decoder layers take the reference
    skip_equal_target: bool = True  # fast path above; False computes the target anyway
    sequential: bool = False  # one UNet call per path (slow; checks the batched call)
    keep_trajectories: bool = False  # keep every step's layout/target latents (tests, previews)
    subject_labels: tuple = ()  # several subjects: how notes name them ("sks dog")


@dataclass
class RetouchResult:
    latents: torch.Tensor  # (N, C, h, w) target latents z_t[0]
    masks: Optional[torch.Tensor]  # (N, H, W) adaptive mask M in [0, 1]
    ca_maps: Optional[torch.Tensor]  # (N, h, w) normalised subject cross-attention maps
    mask_kind: str  # MASK_SAM, MASK_CA_ONLY or MASK_USER; "… in user mask" when bounded by it
    notes: list[str] = field(default_factory=list)
    unet_calls: int = 0
    unet_rows: int = 0
    reference_cached: bool = False
    trajectories: Optional[dict[str, list[torch.Tensor]]] = (
        None  # "layout"/"target": latents after each step
    )
    # several subjects: each subject's normalised map (K, N, h, w) and the region index (N, H, W)
    # at M's resolution (masks.NO_REGION outside every subject)
    subject_maps: Optional[torch.Tensor] = None
    regions: Optional[torch.Tensor] = None


@torch.no_grad()
def invert_latents(
    model,
    z0: torch.Tensor,
    sampler: Sampler,
    progress: Optional[ProgressFn] = None,
    phase: str = "inversion",
    should_stop: Optional[Callable[[], bool]] = None,
    counter: Optional[list] = None,
    empty: Optional[C.Cond] = None,
) -> list[torch.Tensor]:
    """The sampler's inversion (DDIM for ε-models) with the empty prompt and no CFG
    (docs/ALGORITHM.md). `counter` ([calls, rows]) is incremented per model call. `empty`: the
    empty prompt's conditioning (SDXL: with the image's size terms); default `model.conditioning([""])`."""
    if empty is None:
        empty = family_of(model).conditioning(model, [""])

    def predict(x, t):
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped during {phase}")
        if counter is not None:
            counter[0] += 1
            counter[1] += x.shape[0]
        return sampler.predict(model, x, t, C.expand(empty, x.shape[0]))

    cb = (lambda s, total: progress(phase, s, total)) if progress else None
    return sampler.invert(predict, z0, callback=cb)


@torch.no_grad()
def retouch(
    model,
    *,
    reference_latent: torch.Tensor,
    layout_latents: torch.Tensor,
    conds: RetouchConds,
    subject_tokens: Sequence[int],
    settings: RetouchSettings,
    layout_trajectory: Optional[Sequence[torch.Tensor]] = None,
    layout_images: Optional[np.ndarray] = None,
    segmenter=None,
    reference_key: Optional[tuple] = None,
    cache: Optional[caches.InversionCache] = None,
    kv_cache: Optional[caches.ReferenceAttentionCache] = None,
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    reference_keys: Optional[Sequence[Optional[tuple]]] = None,
    user_mask: Optional[torch.Tensor] = None,
    reference_groups: Optional[Sequence[int]] = None,
    subject_weights: Optional[Sequence[Optional[Callable[[], ContextManager]]]] = None,
    base_weights: Optional[Callable[[], ContextManager]] = None,
) -> RetouchResult:
    """Retouch N layout latents (N, C, h, w) with R reference latents (R, C, h, w), R ≥ 1.

    layout_trajectory: the stage-1 DDIM trajectory [z_T … z_0] (each (N, C, h, w)) on the same
    timesteps — then the layout path follows it instead of a fresh inversion (50 fewer UNet calls).
    layout_images: (N, H, W, 3) uint8 of the layouts, needed only for SAM.
    reference_key: the cache key of ONE reference; reference_keys: one per reference (R ≥ 1), each
    inverted and cached on its own. With several references the target attends to all of their
    K/V at once (concatenated along the tokens).
    user_mask: inpaint, (N or 1, 1, h, w) float in [0, 1] at latent resolution, 1 = retouch here.
    The result equals `layout_latents` exactly where it is 0; M is bounded by it (docs/ALGORITHM.md).

    Several subjects (docs/ALGORITHM.md, "Several subjects"): `subject_tokens` is one list of rows
    per subject and `reference_groups` the number of reference latents of each, in order (their
    sum is R). Each subject's region comes from its own maps; in the identity phase a target query
    in subject k's region attends to subject k's references only, outside every region it keeps
    the layout's; M is the union of the subjects' masks. `subject_weights[k]`: a context in which
    the model carries subject k's own weights only (its LoRA on, the other subjects' off; None: the
    subject has none), `base_weights` one with no subject's: each subject's weights then act in
    its own region only (docs/ALGORITHM.md, "Several subjects": one target prediction per subject
    with weights, blended by region).
    """
    if reference_latent.shape[-2:] != layout_latents.shape[-2:]:
        raise LayoutRetouchError(
            "the reference latent and the layout latents differ in size; "
            "prepare the reference at the generation size",
            parameter="reference_image",
        )
    r = reference_latent.shape[0]
    if reference_keys is None:
        reference_keys = [reference_key] if r == 1 else [None] * r
    if len(reference_keys) != r:
        raise ValueError(f"{len(reference_keys)} reference keys for {r} reference latents")
    groups = token_groups(subject_tokens)
    reference_groups = tuple(reference_groups or (r,))
    if len(reference_groups) != len(groups) or sum(reference_groups) != r:
        raise ValueError(
            f"reference_groups {reference_groups} do not split {r} references among "
            f"{len(groups)} subjects"
        )
    inputs = _Inputs(
        conds=conds,
        subject_tokens=groups if len(groups) > 1 else groups[0],
        reference_groups=reference_groups,
        layout_latents=layout_latents,
        layout_trajectory=layout_trajectory,
        layout_images=layout_images,
        segmenter=segmenter,
        user_mask=_user_mask(user_mask, layout_latents),
        n_references=r,
    )
    hooks = _Hooks(progress, should_stop)
    weights = _SubjectWeights.of(subject_weights, base_weights, len(groups))
    run = _Retouch(model, settings, inputs, hooks, None if weights else kv_cache, weights)
    return run.run(reference_latent, list(reference_keys), cache)


def _user_mask(
    user_mask: Optional[torch.Tensor], layout_latents: torch.Tensor
) -> Optional[torch.Tensor]:
    """The inpaint mask as (N, 1, h, w) in the latents' dtype and device, or None."""
    if user_mask is None:
        return None
    u = torch.as_tensor(user_mask)
    if u.ndim == 3:
        u = u[:, None]
    n, _, h, w = layout_latents.shape
    if u.ndim != 4 or u.shape[1] != 1 or tuple(u.shape[-2:]) != (h, w) or u.shape[0] not in (1, n):
        raise ValueError(
            f"user_mask must be (N or 1, 1, {h}, {w}) at latent resolution, got {tuple(u.shape)}"
        )
    u = u.to(layout_latents.device, layout_latents.dtype).expand(n, -1, -1, -1)
    if not bool(torch.isfinite(u).all()) or float(u.min()) < 0 or float(u.max()) > 1:
        raise ValueError("user_mask values must lie in [0, 1]")
    return u


@dataclass(frozen=True)
class _Inputs:
    """What one retouch works on (see `retouch`)."""

    conds: RetouchConds
    subject_tokens: list  # rows of the subject; several subjects: one list each
    reference_groups: tuple  # reference latents per subject
    layout_latents: torch.Tensor  # z_o[0], (N, C, h, w)
    layout_trajectory: Optional[Sequence[torch.Tensor]]
    layout_images: Optional[np.ndarray]
    segmenter: object
    user_mask: Optional[torch.Tensor]  # (N, 1, h, w) or None
    n_references: int

    @property
    def n(self) -> int:
        return self.layout_latents.shape[0]

    @property
    def n_subjects(self) -> int:
        return len(self.reference_groups)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return tuple(self.layout_latents.shape[-2:])

    @property
    def device(self) -> torch.device:
        return self.layout_latents.device


@dataclass
class _Hooks:
    """The caller's progress report and stop button, and the model calls counted for the result."""

    progress: Optional[ProgressFn] = None
    should_stop: Optional[Callable[[], bool]] = None
    calls: list = field(default_factory=lambda: [0, 0])  # model calls, rows

    def stop_if_asked(self, message: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted(message)

    def report(self, phase: str, s: int, total: int) -> None:
        if self.progress is not None:
            self.progress(phase, s, total)

    def preview(self, latents: torch.Tensor) -> None:
        preview = getattr(self.progress, "preview", None)  # optional: live previews
        if preview is not None:
            preview(latents)


class _Inversions:
    """The reference inversions (cached per reference, model and T) and the layout path's start."""

    def __init__(self, model, sampler: Sampler, inputs: _Inputs, hooks: _Hooks):
        self.model, self.sampler, self.inputs, self.hooks = model, sampler, inputs, hooks
        self.T = sampler.steps

    def references(self, reference_latent, keys, cache) -> tuple[list[torch.Tensor], bool]:
        """Each reference's inversion, once per (reference, model, T), cached on its own (so a
        photo reused in another set is not inverted again); levels stacked to (R, C, h, w)."""
        r, empty = self.inputs.n_references, self.inputs.conds.reference_empty
        if r == 1:
            return self.reference(reference_latent, keys[0], cache, empty)
        to_invert = sum(1 for k in keys if k is None or cache is None or cache.peek(k) is None)
        per_ref, all_cached, done = [], True, 0
        for i in range(r):
            one_each = empty is not None and C.batch_size(empty) == r
            empty_i = C.rows(empty, slice(i, i + 1)) if one_each else empty
            progress = self._shifted_progress(done * self.T, to_invert * self.T)
            z, cached = self.reference(
                reference_latent[i : i + 1], keys[i], cache, empty_i, progress
            )
            per_ref.append(z)
            all_cached = all_cached and cached
            done += 0 if cached else 1
        return [torch.cat(level) for level in zip(*per_ref)], all_cached

    def _shifted_progress(self, offset: int, total: int) -> Optional[ProgressFn]:
        """One "reference inversion" phase over all photos inverted."""
        progress = self.hooks.progress
        if progress is None:
            return None
        return lambda phase, s, _total: progress(phase, offset + s, total)

    def reference(
        self, reference_latent, key, cache, empty, progress=None
    ) -> tuple[list[torch.Tensor], bool]:
        """The inversion of one reference, once per (reference, model, T)."""
        z_r = cache.get(key) if (cache is not None and key is not None) else None
        if z_r is not None:
            return z_r, True
        z_r = self._invert(reference_latent, "reference inversion", empty, progress)
        if cache is not None and key is not None:
            cache.put(key, z_r)
        return z_r, False

    def layout_start(self) -> torch.Tensor:
        """The layout path's z_T: its own inversion (paper) or the stage-1 trajectory's start."""
        trajectory = self.inputs.layout_trajectory
        if trajectory is not None:
            if len(trajectory) != self.T + 1:
                raise ValueError(
                    f"layout_trajectory has {len(trajectory)} latents, expected {self.T + 1}"
                )
            return trajectory[0].clone()
        latents, empty = self.inputs.layout_latents, self.inputs.conds.layout_empty
        return self._invert(latents, "layout inversion", empty)[-1].clone()

    def _invert(self, z0, phase: str, empty, progress=None) -> list[torch.Tensor]:
        h = self.hooks
        return invert_latents(
            self.model,
            z0,
            self.sampler,
            progress or h.progress,
            phase,
            h.should_stop,
            h.calls,
            empty=empty,
        )


@dataclass(frozen=True)
class _Mask:
    masks: torch.Tensor  # (N, H, W) M on the device
    ca_maps: Optional[torch.Tensor]  # (N, h, w) normalised subject maps
    kind: str
    subject_maps: Optional[torch.Tensor] = None  # several subjects: (K, N, h, w)
    regions: Optional[torch.Tensor] = None  # several subjects: (N, H, W) subject index


class _MaskBuilder:
    """M from the layout's recorded subject maps (and SAM), at mask start (paper §3.3); bounded by
    the user's mask when there is one."""

    def __init__(self, inputs: _Inputs, ca_threshold: float):
        self.inputs, self.ca_threshold = inputs, ca_threshold
        self.notes: list[str] = []

    def build(self, maps: Optional[torch.Tensor]) -> Optional[_Mask]:
        inputs, u = self.inputs, self.inputs.user_mask
        if maps is None:
            if u is None:
                return None
            # nothing recorded: U softened like M is the mask
            m = torch.from_numpy(np.stack([_softened(u[i, 0]) for i in range(inputs.n)]))
            return _Mask(m.to(inputs.device), None, MASK_USER)
        segment = inputs.segmenter is not None and inputs.layout_images is not None
        kind = MASK_SAM if segment else MASK_CA_ONLY
        norm_maps, full_masks = [], []
        for i in range(inputs.n):
            norm, mc = masks.cross_attention_mask(maps[i], self.ca_threshold)
            sam = inputs.segmenter.segment(inputs.layout_images[i], norm, mc) if segment else None
            size = None if sam is not None else inputs.latent_hw
            full_masks.append(masks.adaptive_mask(mc, sam, size=size))
            norm_maps.append(norm)
        if u is not None:
            full_masks, kind = self._bounded(full_masks, kind)
        m = torch.from_numpy(np.stack(full_masks)).to(inputs.device)
        return _Mask(m, torch.from_numpy(np.stack(norm_maps)), kind)

    def build_subjects(self, maps: Optional[list[torch.Tensor]], labels: Sequence[str]):
        """Several subjects: each subject's M_k from its own maps (and SAM prompted from them), made
        disjoint (a cell goes to the subject whose M_k is highest there), M = their union; notes
        name a subject the layout does not contain."""
        inputs = self.inputs
        if maps is None:
            return self.build(None)
        segment = inputs.segmenter is not None and inputs.layout_images is not None
        kind = MASK_SAM if segment else MASK_CA_ONLY
        norm_maps, per_subject = [], []
        for subject_map in maps:
            norms, fulls = [], []
            for i in range(inputs.n):
                norm, mc = masks.cross_attention_mask(subject_map[i], self.ca_threshold)
                image = inputs.layout_images[i] if segment else None
                sam = inputs.segmenter.segment(image, norm, mc) if segment and mc.any() else None
                size = None if sam is not None else inputs.latent_hw
                fulls.append(masks.adaptive_mask(mc, sam, size=size))
                norms.append(norm)
            norm_maps.append(np.stack(norms))
            per_subject.append(fulls)
        size = max((m.shape for fulls in per_subject for m in fulls), key=lambda hw: hw[0] * hw[1])
        scores = torch.from_numpy(
            np.stack(
                [np.stack([masks.resize_nearest(m, size) for m in fulls]) for fulls in per_subject]
            )
        )
        regions = masks.regions_from_scores(scores)
        union = scores.max(dim=0).values * (regions != masks.NO_REGION)
        full_masks = [union[i].numpy().astype(np.float32) for i in range(inputs.n)]
        self.notes = [
            f"no region for subject {k + 1} ({labels[k]}) in image {i + 1}: it was not retouched "
            "there; try another seed or a larger λ1"
            for k in range(len(maps))
            for i in range(inputs.n)
            if not bool((regions[i] == k).any())
        ]
        if inputs.user_mask is not None:
            full_masks, kind = self._bounded(full_masks, kind)
        m = torch.from_numpy(np.stack(full_masks)).to(inputs.device)
        norm_all = torch.from_numpy(np.stack(norm_maps))
        return _Mask(m, norm_all.max(dim=0).values, kind, norm_all, regions)

    def _bounded(self, full_masks, kind: str) -> tuple[list[np.ndarray], str]:
        full_masks, fallback = self.bound_by_user_mask(full_masks)
        if len(fallback) == self.inputs.n:
            return full_masks, MASK_USER
        kind += IN_USER_MASK
        if fallback:
            kind += f"; user mask alone for image {', '.join(str(i + 1) for i in fallback)}"
        return full_masks, kind

    def bound_by_user_mask(self, full_masks) -> tuple[list[np.ndarray], list[int]]:
        """M·U per image; where that is empty, U softened like M (which images: the second list)."""
        out, fallback, user = [], [], self.inputs.user_mask
        for i, m in enumerate(full_masks):
            u = masks.resize_nearest(user[i, 0].float().cpu().numpy(), m.shape)
            bounded = (m * u).astype(np.float32)
            if not (bounded > 0).any():
                bounded = _softened(user[i, 0], m.shape)
                fallback.append(i)
            out.append(bounded)
        return out, fallback


class _Phase(NamedTuple):
    """What step s does (Algorithm 1): the editor's flags and which paths the model call runs."""

    copy_layout: bool  # s ≤ λ2
    blend: bool  # s ≥ mask start, M built
    record_maps: bool  # until M is built
    skip_target: bool  # the target equals the layout path (fast path): not computed
    need_reference: bool  # the reference path's K/V are used (or it is not re-set)
    paths: list  # [(path, rows)] in the call's row order

    def flags(self) -> dict:
        return dict(
            copy_layout=self.copy_layout,
            paint_identity=not self.copy_layout,
            blend=self.blend,
            record_maps=self.record_maps,
        )


class _ModelCall:
    """One batched model call over paths × both CFG halves, through the editor: the guided
    prediction of each path. One row plan per row layout, kept (the processors cache device
    indices on it)."""

    def __init__(
        self, model, sampler: Sampler, editor, inputs: _Inputs, guidance_scale, hooks, halves
    ):
        self.model, self.sampler, self.editor, self.hooks = model, sampler, editor, hooks
        self.halves = halves  # the CFG halves every call carries
        self.guidance_scale, self.device = guidance_scale, inputs.device
        conds = inputs.conds
        self.plans: dict[tuple, RowPlan] = {}
        paths = (REFERENCE, LAYOUT, TARGET)
        padded = C.pad_tokens(
            [conds.cond_of(p) for p in paths] + [conds.uncond_of(p) for p in paths]
        )
        self.cond_of, self.uncond_of = dict(zip(paths, padded[:3])), dict(zip(paths, padded[3:]))

    def cond_for(self, path: str, half: str, reference_rows=None):
        cond = self.uncond_of[path] if half == UNCOND else self.cond_of[path]
        if path == REFERENCE and reference_rows is not None and C.batch_size(cond) > 1:
            cond = C.rows(cond, reference_rows)
        return cond

    def plan(self, paths: list[tuple[str, int]]) -> RowPlan:
        plan = self.plans.get(tuple(paths))
        if plan is None:
            plan = self.plans[tuple(paths)] = RowPlan.build(paths, self.halves)
        return plan

    def __call__(
        self, paths, latents: dict, t, reference_rows=None, **state
    ) -> dict[str, torch.Tensor]:
        """`reference_rows`: which of the R reference rows this call runs (several subjects with
        their own weights run each subject's rows in its own call); None: all."""
        plan = self.plan(paths)
        x = torch.cat([latents[p] for h in plan.halves() for p, c in paths if c])
        cond = C.cat(
            [
                C.expand(self.cond_for(p, h, reference_rows), c)
                for h in plan.halves()
                for p, c in paths
                if c
            ]
        )
        self.editor.begin_step(StepState(plan, **state))
        out = self.sampler.predict(self.model, x.to(self.device), t, cond)
        self.hooks.calls[0] += 1
        self.hooks.calls[1] += plan.batch
        guide = self.sampler.guide
        return {
            p: (
                out[plan.get(p, COND)]
                if plan.get(p, UNCOND) is None  # no CFG (a distilled-guidance DiT at scale 1)
                else guide(out[plan.get(p, UNCOND)], out[plan.get(p, COND)], self.guidance_scale)
            )
            for p, c in paths
            if c
        }


class _Retouch:
    """One retouch, as Algorithm 1 reads: invert the reference (cached), start the layout path, then
    per step s one batched model call for the reference, layout and target paths (the editor copies,
    paints and blends), a sampling step for each path; M is built at mask start.

    The model family (`family.ModelFamily`) supplies the sampler, the layer table, the editor and
    the attention patch; nothing here is specific to a UNet or to DDIM."""

    def __init__(
        self, model, settings: RetouchSettings, inputs: _Inputs, hooks, kv_cache, weights=None
    ):
        self.model, self.settings, self.schedule = model, settings, settings.schedule
        self.inputs, self.hooks, self.kv_cache = inputs, hooks, kv_cache
        self.weights: Optional[_SubjectWeights] = weights
        self.family = family_of(model)
        # latent size: a flow schedule's shift depends on the image's token count (Flux)
        self.sampler = self.family.sampler(model, self.schedule.steps, latent_hw=inputs.latent_hw)
        self.T = self.sampler.steps
        self.layers = settings.layers or self.family.layer_table(model, settings.layer_preset)
        self.editor = self.family.editor(
            model, self.layers, inputs.subject_tokens, inputs.latent_hw, inputs.n_references
        )
        halves = self.family.halves(settings.guidance_scale)
        self.call = _ModelCall(
            model, self.sampler, self.editor, inputs, settings.guidance_scale, hooks, halves
        )
        self.masker = _MaskBuilder(inputs, settings.ca_threshold)
        self.mask: Optional[_Mask] = None
        self.layer_masks: Optional[masks.LayerMasks] = None
        self.layer_regions: Optional[masks.LayerRegions] = None
        self.notes: list[str] = []
        self.trajectories = {LAYOUT: [], TARGET: []} if settings.keep_trajectories else None
        if inputs.segmenter is not None and inputs.layout_images is None:
            self.notes.append("SAM skipped: no layout image given; cross-attention mask only")

    # -- Algorithm 1 ------------------------------------------------------------------------------
    def run(self, reference_latent, reference_keys, cache) -> RetouchResult:
        keys = [
            None if k is None else caches.inversion_key(k, self.T, self.inputs.latent_hw)
            for k in reference_keys
        ]
        inversions = _Inversions(self.model, self.sampler, self.inputs, self.hooks)
        z_r, cached = inversions.references(reference_latent, keys, cache)  # z_r[0…T] (R rows)
        key = keys[0] if self.inputs.n_references == 1 else (None if None in keys else tuple(keys))
        self.z_l = inversions.layout_start()  # z_o[T]
        self.z_t = self.z_l.clone()  # z_t ← z_o[T]
        self.z_ref = z_r[self.T].clone()
        kv = _ReferenceKV(self.kv_cache, self.reference_kv_key(key))
        with self.family.patched(self.model, self.editor):
            for s in range(1, self.T + 1):
                self.hooks.stop_if_asked(f"stopped at retouch step {s} of {self.T}")
                self.step(s, z_r, kv)
            if self.mask is None:
                self.build_mask()  # mask_start = T+1: no blending, but the map and mask are still shown
        return self.result(cached)

    def step(self, s: int, z_r, kv: "_ReferenceKV") -> None:
        """Retouch step s: re-set the reference (and stage-1 layout) path, build M at mask start,
        one model call (or one per path) through the editor, a sampling step per path."""
        if self.settings.reset_reference:
            self.z_ref = z_r[self.sampler.level_before_step(s)]
        if self.inputs.layout_trajectory is not None:
            self.z_l = self.inputs.layout_trajectory[s - 1]
        if s == self.schedule.mask_start:
            self.build_mask()
        phase = self.phase(s)
        out = self.predict(s, phase, kv)
        if self.sampler.second_order:
            out = self.predict_at_midpoint(s, phase, out)
        self.advance(s, phase, out)
        self.hooks.report("retouch", s, self.T)
        self.hooks.preview(self.z_t)

    def phase(self, s: int) -> _Phase:
        st, copy = self.settings, self.schedule.copies_layout(s)
        # while the layout is copied into every layer the target equals the layout path: not computed
        skip_target = copy and st.skip_equal_target and self.layers.swaps_every_layer()
        need_ref = (not copy and bool(self.layers.reference_layers)) or not st.reset_reference
        n = self.inputs.n
        paths = [
            (REFERENCE, self.inputs.n_references if need_ref else 0),
            (LAYOUT, n),
            (TARGET, 0 if skip_target else n),
        ]
        blend = self.schedule.blends_mask(s) and self.layer_masks is not None
        return _Phase(copy, blend, self.mask is None, skip_target, need_ref, paths)

    def predict_at_midpoint(self, s: int, phase: _Phase, out: dict) -> dict[str, torch.Tensor]:
        """A second-order sampler's second evaluation (flow.MIDPOINT, RF-Solver-2): every path moved
        half a step with its first prediction, predicted again there — same phase, same edits, one
        more batched call; `advance` then takes the full step with this prediction."""
        here = (self.z_ref, self.z_l, self.z_t)
        half = self.sampler.midpoint
        self.z_l = half(self.z_l, out[LAYOUT], s)
        self.z_t = self.z_l if phase.skip_target else half(self.z_t, out[TARGET], s)
        if REFERENCE in out:
            self.z_ref = half(self.z_ref, out[REFERENCE], s)
        try:
            off = _ReferenceKV(None, None)  # K/V are cached per step, not per call
            return self.predict(s, phase, off, t=self.sampler.time_of_midpoint(s))
        finally:
            self.z_ref, self.z_l, self.z_t = here

    def predict(self, s: int, phase: _Phase, kv: "_ReferenceKV", t=None) -> dict[str, torch.Tensor]:
        """The guided prediction of each path this step (the editor edits the attention)."""
        latents = {REFERENCE: self.z_ref, LAYOUT: self.z_l, TARGET: self.z_t}
        t = self.sampler.time_of_step(s) if t is None else t
        state = dict(phase.flags(), masks=self.layer_masks)
        if self.inputs.n_subjects > 1:
            state.update(regions=self.regions(phase), reference_groups=self.inputs.reference_groups)
        if self.settings.sequential:
            return self.predict_one_call_per_path(phase, latents, t, state)
        if self.weights is not None:
            return self.predict_by_weights(phase, latents, t, state)
        cached = kv.get(s) if phase.need_reference else None
        paths = list(phase.paths)
        if cached is not None:  # the reference's K/V from an earlier generation: no rows
            paths[0] = (REFERENCE, 0)
        capture = phase.need_reference and kv.on and cached is None
        out = self.call(paths, latents, t, **state, sources=cached or {}, capture_reference=capture)
        kv.put(s, self.editor.captured_reference())
        return out

    def predict_by_weights(self, phase: _Phase, latents, t, state) -> dict:
        """Several subjects with weights of their own (LoRAs): one call under the base weights for
        the layout path, the other subjects' references and the target; then per such subject k one
        call under its weights with its references and the target (the layout's attention from the
        first call's kept sources). The target's prediction is subject k's inside k's region, the
        base call's elsewhere: subject k's weights reach no other region."""
        weights, groups, n = self.weights, self.inputs.reference_groups, self.inputs.n
        own = [k for k in range(len(groups)) if weights.subjects[k] is not None]
        start = [sum(groups[:k]) for k in range(len(groups))]
        rows = {k: list(range(start[k], start[k] + groups[k])) for k in range(len(groups))}
        base_rows = [r for k in range(len(groups)) if k not in own for r in rows[k]]
        refs = phase.need_reference
        target = 0 if phase.skip_target else n
        paint_own = not phase.copy_layout and bool(own)

        def call(k, paths, ref_rows, **extra):
            z_ref = latents[REFERENCE][ref_rows] if ref_rows else latents[REFERENCE]
            counts = tuple(
                c if (j == k if k is not None else j not in own) else 0
                for j, c in enumerate(groups)
            )
            with (weights.base if k is None else weights.subjects[k])():
                return self.call(
                    paths,
                    {**latents, REFERENCE: z_ref},
                    t,
                    reference_rows=ref_rows,
                    **{**state, "reference_groups": counts, **extra},
                )

        base_paths = [(REFERENCE, len(base_rows) if refs else 0), (LAYOUT, n), (TARGET, target)]
        out = call(None, base_paths, base_rows, keep_sources=paint_own)
        if not paint_own or not target:
            return out
        sources, ref_out = self.editor.kept_sources(), {}
        region = self.latent_regions(state["regions"])
        for k in own:
            paths = [(REFERENCE, len(rows[k]) if refs else 0), (TARGET, n)]
            out_k = call(k, paths, rows[k], sources=sources)
            out[TARGET] = torch.where(region == k, out_k[TARGET], out[TARGET])
            if REFERENCE in out_k:
                ref_out[k] = out_k[REFERENCE]
        by_row = dict(zip(base_rows, out.get(REFERENCE, ())))
        for k in own:
            by_row.update(zip(rows[k], ref_out.get(k, ())))
        if ref_out:  # the reference paths' own predictions, in row order
            out[REFERENCE] = torch.stack([by_row[r] for r in range(sum(groups))])
        return out

    def latent_regions(self, regions) -> torch.Tensor:
        """The regions at latent resolution, (N, 1, h, w) (for a latent-level choice per cell)."""
        h, w = self.inputs.latent_hw
        index = regions.for_tokens(h * w, self.inputs.device)
        return index.reshape(self.inputs.n, 1, h, w)

    def predict_one_call_per_path(self, phase: _Phase, latents, t, state) -> dict:
        """`sequential`: each call reads the sources (Q, K, V, output) the step's earlier calls kept."""
        out, sources = {}, {}
        for p, c in phase.paths:
            if c:
                out.update(
                    self.call([(p, c)], latents, t, **state, sources=sources, keep_sources=True)
                )
                sources = {**sources, **self.editor.kept_sources()}
        return out

    def advance(self, s: int, phase: _Phase, out: dict[str, torch.Tensor]) -> None:
        """A sampling step for each path computed (the layout path's first)."""
        z_l_next = self.sampler.step(self.z_l, out[LAYOUT], s)
        if phase.skip_target:
            self.z_t = z_l_next.clone()
        else:
            self.z_t = self.sampler.step(self.z_t, out[TARGET], s)
            if self.inputs.user_mask is not None:
                # Inpaint: outside the user's mask the target follows the layout path at every step
                # (as the WebUI's inpaint blends its latents), so the model sees the input's context.
                self.z_t = torch.lerp(z_l_next, self.z_t, self.inputs.user_mask)
        if not self.settings.reset_reference and REFERENCE in out:
            self.z_ref = self.sampler.step(self.z_ref, out[REFERENCE], s)
        self.z_l = z_l_next
        if self.trajectories is not None:
            self.trajectories[LAYOUT].append(self.z_l)
            self.trajectories[TARGET].append(self.z_t)

    def build_mask(self) -> None:
        if self.inputs.n_subjects > 1:
            self.mask = self.masker.build_subjects(
                self.editor.subject_maps_each(), self.settings.subject_labels
            )
            self.notes.extend(n for n in self.masker.notes if n not in self.notes)
        else:
            self.mask = self.masker.build(self.editor.subject_maps())
        if self.mask is not None:
            self.layer_masks = masks.LayerMasks(self.mask.masks, self.inputs.latent_hw)
            if self.mask.regions is not None:
                self.layer_regions = masks.LayerRegions(self.mask.regions, self.inputs.latent_hw)

    def regions(self, phase: "_Phase") -> Optional[object]:
        """Several subjects, identity phase: where each subject's region is — the mask's once it is
        built, before that the subjects' maps so far (read at the first layer that asks)."""
        if self.inputs.n_subjects == 1 or phase.copy_layout:
            return None
        if self.layer_regions is not None:
            return self.layer_regions
        return _MapRegions(self.editor, self.settings.ca_threshold, self.inputs)

    def reference_kv_key(self, key) -> Optional[tuple]:
        """The reference path's K/V depend on its (re-set) latents, the timestep and y_r / the
        negative prompt."""
        st = self.settings
        if (
            self.kv_cache is None
            or self.kv_cache.max_bytes <= 0
            or key is None
            or not st.reset_reference
            or st.sequential
            or self.sampler.second_order  # K/V kept per step, not per call
        ):
            return None
        prompts = caches.digest(self.call.cond_of[REFERENCE], self.call.uncond_of[REFERENCE])
        return (*key, prompts, self.layers.name, tuple(self.layers.reference_layers))

    def result(self, reference_cached: bool) -> RetouchResult:
        if self.mask is None:
            self.notes.append("no cross-attention maps were recorded; no mask")
        z_t, u = self.z_t, self.inputs.user_mask
        if u is not None:
            # Outside the user's mask the input's latents, bit for bit: `where` (not only lerp) so
            # that U == 0 gives exactly those bits whatever the target holds there.
            layout = self.inputs.layout_latents
            z_t = torch.where(u == 0, layout, torch.lerp(layout, z_t, u))
        mask = self.mask
        return RetouchResult(
            latents=z_t,
            masks=None if mask is None else mask.masks,
            ca_maps=None if mask is None else mask.ca_maps,
            mask_kind=MASK_CA_ONLY if mask is None else mask.kind,
            notes=self.notes,
            unet_calls=self.hooks.calls[0],
            unet_rows=self.hooks.calls[1],
            reference_cached=reference_cached,
            trajectories=self.trajectories,
            subject_maps=None if mask is None else mask.subject_maps,
            regions=None if mask is None else mask.regions,
        )


class _ReferenceKV:
    """The reference path's K/V across generations, for one retouch: per step the cached sources
    (the call then runs no reference rows), or this call's captured ones to keep. Off (`key` None)
    when the cache is off or the K/V would not be the same (see `_Retouch.reference_kv_key`)."""

    def __init__(self, cache: Optional[caches.ReferenceAttentionCache], key: Optional[tuple]):
        self.cache, self.key = cache, key

    @property
    def on(self) -> bool:
        return self.key is not None

    def get(self, s: int) -> Optional[dict]:
        return self.cache.get(self.key, s) if self.on else None

    def put(self, s: int, captured: Optional[dict]) -> None:
        if self.on and captured:
            self.cache.put(self.key, s, captured)


def _softened(u: torch.Tensor, size=None) -> np.ndarray:
    """The user's mask U (h, w) softened like M: U's support in the role of M^k with no M^c —
    Normalize(EDT(U > 0)) (rim 0.5, core 1) — times U, so it never leaves U."""
    u = u.float().cpu().numpy()
    size = size or u.shape
    soft = masks.adaptive_mask(np.zeros(u.shape, bool), u > 0, size=size)
    return (soft * masks.resize_nearest(u, size)).astype(np.float32)


class _MapRegions:
    """The subjects' regions from their maps recorded so far (identity steps before the mask is
    built), made at the first layer that asks in a call — so the call's own mask layers, which run
    before its reference layers, count."""

    def __init__(self, editor, threshold: float, inputs: _Inputs):
        self.editor, self.threshold, self.inputs = editor, threshold, inputs
        self._regions: Optional[masks.LayerRegions] = None

    def for_tokens(self, n_tokens: int, device=None) -> torch.Tensor:
        if self._regions is None:
            maps = self.editor.subject_maps_each()
            if maps is None:  # nothing recorded yet: no query is in a region
                index = torch.full((self.inputs.n, *self.inputs.latent_hw), masks.NO_REGION)
            else:
                index = masks.regions_from_maps(maps, self.threshold)
            self._regions = masks.LayerRegions(index, self.inputs.latent_hw)
        return self._regions.for_tokens(n_tokens, device)


class _SubjectWeights(NamedTuple):
    """Several subjects with weights of their own (LoRAs): the contexts that switch the model to
    one subject's weights or to none of them (the host's)."""

    subjects: tuple  # per subject: a context factory, or None (no weights of its own)
    base: Callable[[], ContextManager]

    @classmethod
    def of(cls, subject_weights, base_weights, n_subjects: int) -> Optional["_SubjectWeights"]:
        if not subject_weights or all(w is None for w in subject_weights):
            return None
        if len(subject_weights) != n_subjects:
            raise ValueError(f"{len(subject_weights)} subject weights for {n_subjects} subjects")
        if n_subjects < 2:
            raise ValueError("subject weights are for several subjects (one: the host's LoRA)")
        return cls(tuple(subject_weights), base_weights or contextlib.nullcontext)
