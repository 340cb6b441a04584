"""Stage 2 — the retouch (paper Algorithm 1), and the two stages end to end.

    z_r[0…T] ← DDIMInversion(Encode(I_r), "")      cached per (reference, model, T)
    z_o[0…T] ← DDIMInversion(z_o[0], "")           or the stage-1 trajectory (layout_source="stage1")
    z_t ← z_o[T]
    for s = 1 … T: one batched UNet call with the reference, layout and target paths (× CFG halves);
        the attention editor copies the layout (s ≤ λ2), paints the reference identity (s > λ2) and
        blends with the adaptive mask M (s ≥ mask_start); each path takes a DDIM step.
    I_t ← Decode(z_t)

Fast paths that change no result: while s ≤ λ2 and the layout is copied into every layer the target
equals the layout path exactly (docs/ALGORITHM.md invariant), so the target rows are not computed and
z_t ← z_o; the reference path is only run when its K/V are used (s > λ2).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import conditioning as C
from . import ddim, masks
from .attention import (
    COND,
    LAYOUT,
    REFERENCE,
    TARGET,
    UNCOND,
    RetouchAttention,
    RowPlan,
    patched_attention,
)
from .errors import Interrupted, LayoutRetouchError
from .layers import LayerTable, layer_table_for
from .model import LdmModel
from .sampling import DDIMSampler, RetouchFamily

ProgressFn = Callable[[str, int, int], None]  # (phase, step, total)

MASK_CA_ONLY = "CA only"
MASK_SAM = "SAM+CA"
# Inpaint (issue 12): M bounded by the user's mask U ("CA only in user mask"), or — where M·U is
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
    # The DiT (Flux) family only (docs/ALGORITHM.md, "DiT (Flux)"):
    flow_solver: str = "midpoint"  # flow.SOLVERS: inversion and sampling solver of every path
    reference_rope: str = "shifted"  # the reference image tokens' rotary positions: shifted/shared
    reference_with_target_tokens: bool = False  # target image queries also see their own tokens


@dataclass
class RetouchConds:
    """One-row conditionings (conditioning.Cond: a tensor for SD1, a dict for SDXL): y_r for the
    reference and target paths, y_p for the layout path, the negative prompt for every uncond half.

    SDXL's conditioning carries size terms, which differ between the reference photo and the
    generated image: `reference`/`reference_uncond`/`reference_empty` carry the reference's,
    everything else the generation's. For SD1 the optional ones are the same tensors (None)."""

    reference: C.Cond
    layout: C.Cond
    uncond: C.Cond
    target: Optional[C.Cond] = None  # y_r's tokens with the layout's vector (default: reference)
    reference_uncond: Optional[C.Cond] = (
        None  # negative prompt with the reference's size terms (default: uncond)
    )
    reference_empty: Optional[C.Cond] = (
        None  # "" for the reference inversion (default: model.conditioning([""]))
    )
    layout_empty: Optional[C.Cond] = None  # "" for the layout inversion (default: likewise)

    def cond_of(self, path: str) -> C.Cond:
        if path == TARGET and self.target is not None:
            return self.target
        return self.layout if path == LAYOUT else self.reference

    def uncond_of(self, path: str) -> C.Cond:
        return (
            self.reference_uncond
            if (path == REFERENCE and self.reference_uncond is not None)
            else self.uncond
        )


@dataclass
class RetouchResult:
    latents: torch.Tensor  # (N, C, h, w) target latents z_t[0]
    masks: Optional[torch.Tensor]  # (N, H, W) adaptive mask M in [0, 1]
    ca_maps: Optional[torch.Tensor]  # (N, h, w) normalised subject cross-attention maps
    mask_kind: str  # MASK_SAM or MASK_CA_ONLY
    notes: list[str] = field(default_factory=list)
    unet_calls: int = 0
    unet_rows: int = 0
    reference_cached: bool = False
    trajectories: Optional[dict[str, list[torch.Tensor]]] = (
        None  # "layout"/"target": latents after each step
    )


class InversionCache:
    """Bounded LRU of reference inversions, key (reference fingerprint, model key, steps).

    One entry is (T+1) latents of one image: 51 × 4×64×64 floats ≈ 3.3 MB at SD1 512² in fp32."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._items: "collections.OrderedDict[tuple, list[torch.Tensor]]" = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Optional[list[torch.Tensor]]:
        with self._lock:
            levels = self._items.get(key)
            if levels is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return levels

    def peek(self, key: tuple) -> Optional[list[torch.Tensor]]:
        """Look without counting a hit or refreshing the entry."""
        with self._lock:
            return self._items.get(key)

    def put(self, key: tuple, levels: list[torch.Tensor]) -> None:
        with self._lock:
            self._items[key] = levels
            self._items.move_to_end(key)
            while len(self._items) > max(0, self.max_entries):
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class ReferenceAttentionCache:
    """Bounded LRU of the reference path's self-attention K/V at the reference layers, per step,
    so a later generation with the same reference, model, steps, size and prompts runs no
    reference rows at all. Size is the point: at SD1 512², T=50, λ2=10 one reference costs
    ≈47 MB per step in fp16, ≈1.9 GB in all, on the device — so it is opt-in (`max_bytes` 0 = off)."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self._items: "collections.OrderedDict[tuple, dict[int, dict]]" = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _bytes(step_sources: dict) -> int:
        return sum(
            t.numel() * t.element_size() for v in step_sources.values() for t in v if t is not None
        )

    def nbytes(self) -> int:
        return sum(self._bytes(src) for steps in self._items.values() for src in steps.values())

    def get(self, key: tuple, s: int) -> Optional[dict]:
        with self._lock:
            steps = self._items.get(key)
            if steps is None or s not in steps:
                return None
            self._items.move_to_end(key)
            return steps[s]

    def put(self, key: tuple, s: int, sources: dict) -> None:
        if self.max_bytes <= 0 or self._bytes(sources) > self.max_bytes:
            return
        with self._lock:
            self._items.setdefault(key, {})[s] = sources
            self._items.move_to_end(key)
            while self.nbytes() > self.max_bytes and len(self._items) > 1:
                self._items.popitem(last=False)
            steps = self._items.get(key, {})
            while (
                self.nbytes() > self.max_bytes and steps
            ):  # one entry alone too big: keep what fits
                steps.pop(max(steps))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _digest(*conds: C.Cond) -> str:
    import hashlib

    h = hashlib.sha1()
    for c in conds:
        for t in (c[k] for k in sorted(c)) if C.is_dict(c) else (c,):
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def inversion_key(reference_key: tuple, steps: int, latent_hw) -> tuple:
    return (*reference_key, steps, tuple(latent_hw))


def encode_prompts(
    model: LdmModel,
    prompts,
    negative_prompt: str = "",
    *,
    generation_size: Optional[C.SizeTerms] = None,
    reference_size=None,
) -> RetouchConds:
    """y_r, y_p and the negative prompt. SDXL: each path with its own image's size terms
    (`generation_size` for the layout/target paths, `reference_size` for the reference path).
    `reference_size` may be a list, one SizeTerms per reference photo: the reference conditionings
    then have one row per photo (SDXL; SD1 has no size terms and keeps one row for all)."""
    own = getattr(model, "retouch_conds", None)  # a model family with its own (flux_model)
    if own is not None:
        return own(prompts, negative_prompt)
    if isinstance(reference_size, (list, tuple)):
        if len(reference_size) == 1 or not model.is_sdxl:
            return encode_prompts(
                model,
                prompts,
                negative_prompt,
                generation_size=generation_size,
                reference_size=reference_size[0] if reference_size else None,
            )
        each = [
            encode_prompts(
                model, prompts, negative_prompt, generation_size=generation_size, reference_size=r
            )
            for r in reference_size
        ]
        return RetouchConds(
            reference=C.cat([c.reference for c in each]),
            layout=each[0].layout,
            uncond=each[0].uncond,
            target=each[0].target,
            reference_uncond=C.cat([c.reference_uncond for c in each]),
            reference_empty=C.cat([c.reference_empty for c in each]),
            layout_empty=each[0].layout_empty,
        )
    if not model.is_sdxl:
        c = model.conditioning([prompts.reference, prompts.personalized, negative_prompt])
        return RetouchConds(reference=c[0:1], layout=c[1:2], uncond=c[2:3])
    gen = generation_size or model.generation_size(1024, 1024)
    ref = reference_size or gen
    at_gen = model.conditioning([prompts.reference, prompts.personalized], gen)

    def negative(text, size):  # one call each: an empty negative prompt is zeroed only on its own
        return model.conditioning([text], size, negative=True)

    layout = C.rows(at_gen, slice(1, 2))
    # The target path attends with y_r's tokens but takes the layout path's `vector` (pooled y_p and
    # the generation's size terms). The vector is no attention: it reaches every ResBlock through
    # the time embedding, and the retouch edits attention only — with y_r's vector the target would
    # leave the layout even while every attention layer copies it (docs/ALGORITHM.md: z_t = z_o for s ≤ λ2).
    target = C.with_tokens_of(layout, C.rows(at_gen, slice(0, 1)))
    return RetouchConds(
        reference=model.conditioning([prompts.reference], ref),
        layout=layout,
        uncond=negative(negative_prompt, gen),
        target=target,
        reference_uncond=negative(negative_prompt, ref),
        reference_empty=negative("", ref),
        layout_empty=negative("", gen),
    )


@torch.no_grad()
def invert_latents(
    model: LdmModel,
    z0: torch.Tensor,
    ddim_schedule: ddim.DDIMSchedule,
    progress: Optional[ProgressFn] = None,
    phase: str = "inversion",
    should_stop: Optional[Callable[[], bool]] = None,
    counter: Optional[list] = None,
    empty: Optional[C.Cond] = None,
) -> list[torch.Tensor]:
    """DDIM inversion with the empty prompt and no CFG (docs/ALGORITHM.md). `counter` ([calls, rows])
    is incremented per UNet call. `empty`: the empty prompt's conditioning (SDXL: with the image's
    size terms); default `model.conditioning([""])`."""
    if empty is None:
        empty = model.conditioning([""])

    def eps(x, t):
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped during {phase}")
        if counter is not None:
            counter[0] += 1
            counter[1] += x.shape[0]
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return model.eps(x, tt, C.expand(empty, x.shape[0]))

    cb = (lambda s, total: progress(phase, s, total)) if progress else None
    return ddim.invert(eps, z0, ddim_schedule, callback=cb)


@torch.no_grad()
def retouch(
    model: LdmModel,
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
    cache: Optional[InversionCache] = None,
    kv_cache: Optional[ReferenceAttentionCache] = None,
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    reference_keys: Optional[Sequence[Optional[tuple]]] = None,
    user_mask: Optional[torch.Tensor] = None,
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
    return _Retouch(
        model,
        conds,
        subject_tokens,
        settings,
        layout_latents,
        layout_trajectory,
        layout_images,
        segmenter,
        kv_cache,
        progress,
        should_stop,
        r,
        _user_mask(user_mask, layout_latents),
    ).run(reference_latent, list(reference_keys), cache)


def retouch_family(
    model, settings: RetouchSettings, subject_tokens, latent_hw, n_references: int = 1
) -> RetouchFamily:
    """The model family's half of the retouch: a model that knows its own (`retouch_family`, e.g.
    flux_model.FluxModel) says it; otherwise the UNet family — DDIM on ε over the model's ᾱ, the
    UNet layer table, the per-module attention editor."""
    own = getattr(model, "retouch_family", None)
    if own is not None:
        return own(settings, subject_tokens, latent_hw, n_references)
    layers = settings.layers or layer_table_for(model.unet, settings.layer_preset)
    editor = RetouchAttention(layers, subject_tokens, latent_hw, n_references=n_references)
    schedule = ddim.DDIMSchedule.from_alphas_cumprod(model.alphas_cumprod, settings.schedule.steps)

    def predict(x, t, cond):
        return model.eps(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), cond)

    return RetouchFamily(
        DDIMSampler(schedule),
        layers,
        editor,
        lambda: patched_attention(model.unet, editor),
        predict,
    )


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


class _Retouch:
    """One retouch, as Algorithm 1 reads: invert the reference (cached), start the layout path, then
    per step s one batched UNet call for the reference, layout and target paths (the editor copies,
    paints and blends), a DDIM step for each path; M is built at mask start."""

    def __init__(
        self,
        model: LdmModel,
        conds: RetouchConds,
        subject_tokens,
        settings: RetouchSettings,
        layout_latents,
        layout_trajectory,
        layout_images,
        segmenter,
        kv_cache,
        progress,
        should_stop,
        n_references: int = 1,
        user_mask: Optional[torch.Tensor] = None,
    ):
        self.model, self.settings, self.schedule = model, settings, settings.schedule
        self.T = self.schedule.steps
        self.n = layout_latents.shape[0]
        self.device = layout_latents.device
        self.layout_latents, self.layout_trajectory = layout_latents, layout_trajectory
        self.layout_images, self.segmenter = layout_images, segmenter
        self.kv_cache, self.progress, self.should_stop = kv_cache, progress, should_stop
        self.conds = conds
        self.latent_hw = tuple(layout_latents.shape[-2:])
        self.notes: list[str] = []
        self.calls = [0, 0]  # UNet calls, rows
        self.r = n_references
        self.user_mask = user_mask  # (N, 1, h, w) or None
        # The model family's sampler, layer table, editor and prediction (sampling.RetouchFamily):
        # the loop below is the same for every family.
        self.family = retouch_family(model, settings, subject_tokens, self.latent_hw, n_references)
        self.sampler, self.layers, self.editor = (
            self.family.sampler,
            self.family.layers,
            self.family.editor,
        )
        self.mask: dict = {}
        self.plans: dict[
            tuple, RowPlan
        ] = {}  # one plan per row layout, kept: the editor keeps device indices on it
        paths = (REFERENCE, LAYOUT, TARGET)
        padded = C.pad_tokens(
            [conds.cond_of(p) for p in paths] + [conds.uncond_of(p) for p in paths]
        )
        self.cond_of, self.uncond_of = dict(zip(paths, padded[:3])), dict(zip(paths, padded[3:]))
        self.trajectories = {LAYOUT: [], TARGET: []} if settings.keep_trajectories else None
        if segmenter is not None and layout_images is None:
            self.notes.append("SAM skipped: no layout image given; cross-attention mask only")

    # -- Algorithm 1 ------------------------------------------------------------------------------
    def run(self, reference_latent, reference_keys, cache) -> RetouchResult:
        keys = [
            None if k is None else inversion_key(k, self.T, self.latent_hw) for k in reference_keys
        ]
        z_r, cached = self.invert_references(
            reference_latent, keys, cache
        )  # z_r[0…T] (R rows), cached
        key = keys[0] if self.r == 1 else (None if None in keys else tuple(keys))
        self.z_l = self.layout_start()  # z_o[T]
        self.z_t = self.z_l.clone()  # z_t ← z_o[T]
        self.z_ref = z_r[self.T].clone()
        kv_key = self.reference_kv_key(key)
        with self.family.patched():
            for s in range(1, self.T + 1):
                if self.should_stop is not None and self.should_stop():
                    raise Interrupted(f"stopped at retouch step {s} of {self.T}")
                self.step(s, z_r, kv_key)
            if not self.mask:
                self.build_mask()  # mask_start = T+1: no blending, but the map and mask are still shown
        if self.mask.get("kind") is None:
            self.notes.append("no cross-attention maps were recorded; no mask")
        if self.user_mask is not None:
            # Outside the user's mask the input's latents, bit for bit: `where` (not only lerp) so
            # that U == 0 gives exactly those bits whatever the target holds there.
            u = self.user_mask
            self.z_t = torch.where(
                u == 0, self.layout_latents, torch.lerp(self.layout_latents, self.z_t, u)
            )
        return RetouchResult(
            latents=self.z_t,
            masks=self.mask.get("masks"),
            ca_maps=self.mask.get("ca_maps"),
            mask_kind=self.mask.get("kind", MASK_CA_ONLY),
            notes=self.notes,
            unet_calls=self.calls[0],
            unet_rows=self.calls[1],
            reference_cached=cached,
            trajectories=self.trajectories,
        )

    def invert_references(self, reference_latent, keys, cache) -> tuple[list[torch.Tensor], bool]:
        """Each reference's DDIM inversion, once per (reference, model, T), cached on its own (so a
        photo reused in another set is not inverted again); levels stacked to (R, C, h, w)."""
        if self.r == 1:
            return self.invert_reference(
                reference_latent, keys[0], cache, self.conds.reference_empty
            )
        empty = self.conds.reference_empty
        to_invert = sum(1 for k in keys if k is None or cache is None or cache.peek(k) is None)
        per_ref, all_cached, done = [], True, 0
        for i in range(self.r):
            empty_i = (
                C.rows(empty, slice(i, i + 1))
                if (empty is not None and C.batch_size(empty) == self.r)
                else empty
            )
            progress = None
            if (
                self.progress is not None
            ):  # one "reference inversion" phase over all photos inverted
                progress = (
                    lambda offset: (
                        lambda phase, s, total: self.progress(phase, offset + s, to_invert * total)
                    )
                )(done * self.T)
            z, cached = self.invert_reference(
                reference_latent[i : i + 1], keys[i], cache, empty_i, progress
            )
            per_ref.append(z)
            all_cached = all_cached and cached
            done += 0 if cached else 1
        return [torch.cat(level) for level in zip(*per_ref)], all_cached

    def invert_reference(
        self, reference_latent, key, cache, empty, progress=None
    ) -> tuple[list[torch.Tensor], bool]:
        """DDIM inversion of one reference, once per (reference, model, T)."""
        z_r = cache.get(key) if (cache is not None and key is not None) else None
        if z_r is not None:
            return z_r, True
        z_r = self.invert(reference_latent, "reference inversion", empty, progress)
        if cache is not None and key is not None:
            cache.put(key, z_r)
        return z_r, False

    def layout_start(self) -> torch.Tensor:
        """The layout path's z_T: its own inversion (paper) or the stage-1 trajectory's start."""
        if self.layout_trajectory is not None:
            if len(self.layout_trajectory) != self.T + 1:
                raise ValueError(
                    f"layout_trajectory has {len(self.layout_trajectory)} latents, expected {self.T + 1}"
                )
            return self.layout_trajectory[0].clone()
        return self.invert(self.layout_latents, "layout inversion", self.conds.layout_empty)[
            -1
        ].clone()

    @torch.no_grad()
    def invert(self, z0, phase: str, empty, progress=None) -> list[torch.Tensor]:
        """The family's inversion with the empty prompt and no CFG (docs/ALGORITHM.md), every
        latent level kept; each model call counted."""
        if empty is None:
            empty = self.model.conditioning([""])
        progress = progress or self.progress

        def predict(x, point):
            if self.should_stop is not None and self.should_stop():
                raise Interrupted(f"stopped during {phase}")
            self.calls[0] += 1
            self.calls[1] += x.shape[0]
            return self.family.predict(x, point, C.expand(empty, x.shape[0]))

        cb = (lambda s, total: progress(phase, s, total)) if progress else None
        return self.sampler.invert(predict, z0, cb)

    def reference_kv_key(self, key) -> Optional[tuple]:
        """The reference path's K/V depend on its (re-set) latents, the timestep and y_r / the negative prompt."""
        st = self.settings
        if (
            self.kv_cache is None
            or self.kv_cache.max_bytes <= 0
            or key is None
            or not st.reset_reference
            or st.sequential
            or self.sampler.evaluations > 1  # K/V cached per step, not per evaluation
        ):
            return None
        return (
            *key,
            _digest(self.cond_of[REFERENCE], self.uncond_of[REFERENCE]),
            self.layers.name,
            tuple(self.layers.reference_layers),
        )

    def step(self, s: int, z_r, kv_key) -> None:
        """Retouch step s: what the paths are, one batched model call per evaluation the sampler
        needs (or one per path), a sampler step for each path."""
        st, schedule, editor = self.settings, self.schedule, self.editor
        if st.reset_reference:
            self.z_ref = z_r[self.sampler.level_before_step(s)]
        if self.layout_trajectory is not None:
            self.z_l = self.layout_trajectory[s - 1]
        if s == schedule.mask_start:
            self.build_mask()
        copy = schedule.copies_layout(s)
        phase = dict(
            copy_layout=copy,
            paint_identity=not copy,
            blend=schedule.blends_mask(s) and editor.masks is not None,
            record_maps=not self.mask,
        )  # maps are recorded until M is built
        # while the layout is copied into every layer the target equals the layout path: not computed
        skip_target = copy and st.skip_equal_target and self.layers.swaps_every_layer()
        need_ref = (not copy and bool(self.layers.reference_layers)) or not st.reset_reference
        paths = [
            (REFERENCE, self.r if need_ref else 0),
            (LAYOUT, self.n),
            (TARGET, 0 if skip_target else self.n),
        ]
        latents = {REFERENCE: self.z_ref, LAYOUT: self.z_l, TARGET: self.z_t}
        evaluated = {p: latents[p] for p, c in paths if c}
        keep = [LAYOUT] + ([] if skip_target else [TARGET])
        if not st.reset_reference and REFERENCE in evaluated:
            keep.append(REFERENCE)

        def evaluate(lat, point):
            return self.evaluate(paths, lat, point, phase, kv_key if need_ref else None, s)

        new = self.sampler.step(s, evaluated, evaluate, keep)
        z_l_next = new[LAYOUT]
        self.z_t = z_l_next.clone() if skip_target else new[TARGET]
        if self.user_mask is not None and not skip_target:
            # Inpaint: outside the user's mask the target follows the layout path at every step (as
            # the WebUI's inpaint blends its latents), so the UNet sees the input's context there.
            self.z_t = torch.lerp(z_l_next, self.z_t, self.user_mask)
        if REFERENCE in new:
            self.z_ref = new[REFERENCE]
        self.z_l = z_l_next
        if self.trajectories is not None:
            self.trajectories[LAYOUT].append(self.z_l)
            self.trajectories[TARGET].append(self.z_t)
        if self.progress is not None:
            self.progress("retouch", s, self.T)
            preview = getattr(
                self.progress, "preview", None
            )  # optional: live previews of the target
            if preview is not None:
                preview(self.z_t)

    def evaluate(self, paths, latents, point, phase, kv_key, s: int) -> dict[str, torch.Tensor]:
        """One model evaluation of every path in `paths` at `point`: one batched call, or one call
        per path (`sequential`); the reference's K/V from `kv_cache` when it holds them."""
        st, editor = self.settings, self.editor
        if st.sequential:
            pred = {}
            editor.store_sources = True
            for p, c in paths:
                if c:  # the first call of the evaluation clears the last one's sources
                    pred.update(
                        self.unet_call([(p, c)], latents, point, keep_store=bool(pred), **phase)
                    )
            editor.store_sources = False
            return pred
        cached_kv = self.kv_cache.get(kv_key, s) if kv_key is not None else None
        if (
            cached_kv is not None
        ):  # the reference's K/V from an earlier generation: no reference rows
            paths = [(REFERENCE, 0)] + [pc for pc in paths if pc[0] != REFERENCE]
        editor.capture_reference = {} if (kv_key is not None and cached_kv is None) else None
        pred = self.unet_call(paths, latents, point, sources=cached_kv, **phase)
        if editor.capture_reference:
            self.kv_cache.put(kv_key, s, editor.capture_reference)
        editor.capture_reference = None
        return pred

    def unet_call(
        self,
        paths: list[tuple[str, int]],
        latents: dict[str, torch.Tensor],
        point,
        *,
        keep_store=False,
        sources=None,
        **phase,
    ) -> dict[str, torch.Tensor]:
        """One batched model call over `paths` × the CFG halves; the guided prediction of each
        path (ε for a UNet, the velocity for a flow DiT) at `point` (timestep or σ)."""
        plan = self.plans.get(tuple(paths))
        if plan is None:
            plan = self.plans[tuple(paths)] = RowPlan.build(paths, self.family.halves)
        x = torch.cat([latents[p] for h in plan.halves() for p, c in paths if c])
        cond = C.cat(
            [
                C.expand(self.uncond_of[p] if h == UNCOND else self.cond_of[p], c)
                for h in plan.halves()
                for p, c in paths
                if c
            ]
        )
        self.editor.begin_step(plan, keep_store=keep_store, sources=sources, **phase)
        pred = self.family.predict(x.to(self.device), point, cond)
        self.calls[0] += 1
        self.calls[1] += plan.batch
        out = {}
        for p, c in paths:
            if c:
                cond_rows, uncond_rows = plan.get(p, COND), plan.get(p, UNCOND)
                out[p] = (
                    pred[cond_rows]
                    if uncond_rows is None  # no CFG (a distilled-guidance DiT at scale 1)
                    else self.sampler.combine(
                        pred[uncond_rows], pred[cond_rows], self.settings.guidance_scale
                    )
                )
        return out

    def build_mask(self) -> None:
        """M from the layout's recorded subject maps (and SAM), at mask start (paper §3.3); bounded
        by the user's mask when there is one."""
        maps = self.editor.subject_maps()
        if maps is None:
            if self.user_mask is not None:  # nothing recorded: U softened like M is the mask
                m = torch.from_numpy(
                    np.stack([_softened(self.user_mask[i, 0]) for i in range(self.n)])
                )
                self._set_mask(m.to(self.device), None, MASK_USER)
            return
        norm_maps, full_masks = [], []
        kind = MASK_CA_ONLY
        for i in range(self.n):
            norm, mc = masks.cross_attention_mask(maps[i], self.settings.ca_threshold)
            sam = None
            if self.segmenter is not None and self.layout_images is not None:
                sam = self.segmenter.segment(self.layout_images[i], norm, mc)
                kind = MASK_SAM
            full_masks.append(
                masks.adaptive_mask(mc, sam, size=None if sam is not None else self.latent_hw)
            )
            norm_maps.append(norm)
        if self.user_mask is not None:
            full_masks, fallback = self.bound_by_user_mask(full_masks)
            if len(fallback) == self.n:
                kind = MASK_USER
            else:
                kind += IN_USER_MASK
                if fallback:
                    kind += f"; user mask alone for image {', '.join(str(i + 1) for i in fallback)}"
        m = torch.from_numpy(np.stack(full_masks)).to(self.device)
        self._set_mask(m, torch.from_numpy(np.stack(norm_maps)), kind)

    def _set_mask(self, m, ca_maps, kind) -> None:
        self.editor.masks = masks.LayerMasks(m, self.latent_hw)
        self.editor.record_maps = False
        self.mask.update(masks=m, ca_maps=ca_maps, kind=kind)

    def bound_by_user_mask(self, full_masks) -> tuple[list[np.ndarray], list[int]]:
        """M·U per image; where that is empty, U softened like M (which images: the second list)."""
        out, fallback = [], []
        for i, m in enumerate(full_masks):
            u = masks.resize_nearest(self.user_mask[i, 0].float().cpu().numpy(), m.shape)
            bounded = (m * u).astype(np.float32)
            if not (bounded > 0).any():
                bounded = _softened(self.user_mask[i, 0], m.shape)
                fallback.append(i)
            out.append(bounded)
        return out, fallback


def _softened(u: torch.Tensor, size=None) -> np.ndarray:
    """The user's mask U (h, w) softened like M: U's support in the role of M^k with no M^c —
    Normalize(EDT(U > 0)) (rim 0.5, core 1) — times U, so it never leaves U."""
    u = u.float().cpu().numpy()
    size = size or u.shape
    soft = masks.adaptive_mask(np.zeros(u.shape, bool), u > 0, size=size)
    return (soft * masks.resize_nearest(u, size)).astype(np.float32)


@dataclass
class GenerationResult:
    images: torch.Tensor  # (N, 3, H, W) retouched images in [-1, 1]
    layout_images: torch.Tensor  # (N, 3, H, W) stage-1 layouts I_o in [-1, 1]
    layout_latents: torch.Tensor
    retouch: RetouchResult


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(
    model: LdmModel,
    *,
    prompts,
    reference_image: torch.Tensor,
    noise: torch.Tensor,
    settings: RetouchSettings,
    negative_prompt: str = "",
    vanilla_unet: Optional[torch.nn.Module] = None,
    layout_source: str = "inversion",
    segmenter=None,
    cache: Optional[InversionCache] = None,
    reference_key: Optional[tuple] = None,
    kv_cache: Optional[ReferenceAttentionCache] = None,
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    reference_size: Optional[C.SizeTerms] = None,
) -> GenerationResult:
    """Both stages with the library's DDIM: stage 1 (step-blended layout) then the retouch.

    reference_image: (1, 3, H, W) in [-1, 1] at the generation size; noise: (N, C, h, w) z_T.
    vanilla_unet: DreamBooth's vanilla UNet (None: the same UNet, i.e. Textual Inversion).
    reference_size: SDXL size terms of the reference photo as fed (default: the generation's).
    """
    from . import stage1
    from .prompts import subject_token_positions

    schedule = settings.schedule
    ddim_schedule = ddim.DDIMSchedule.from_alphas_cumprod(model.alphas_cumprod, schedule.steps)
    height, width = (8 * d for d in noise.shape[-2:])
    gen_size = model.generation_size(width, height)
    conds = encode_prompts(
        model, prompts, negative_prompt, generation_size=gen_size, reference_size=reference_size
    )
    cond_layout = model.conditioning([prompts.layout], gen_size)
    trajectory = stage1.sample_step_blended(
        model.denoiser(vanilla_unet),
        model.denoiser(),
        schedule,
        ddim_schedule,
        cond_layout,
        conds.layout,
        conds.uncond,
        noise,
        settings.guidance_scale,
        progress=progress,
        should_stop=should_stop,
    )
    layout_latents = trajectory[-1]
    layout_images = model.decode(layout_latents)
    subject = subject_token_positions(
        model.tokenize, prompts.personalized, [prompts.concept_token, prompts.class_phrase]
    )
    # A cached inversion starts with the reference's latent: no VAE pass then.
    cached = (
        cache.peek(inversion_key(reference_key, schedule.steps, noise.shape[-2:]))
        if cache is not None and reference_key is not None
        else None
    )
    reference_latent = cached[0] if cached is not None else model.encode(reference_image)
    result = retouch(
        model,
        reference_latent=reference_latent,
        layout_latents=layout_latents,
        conds=conds,
        subject_tokens=subject,
        settings=settings,
        layout_trajectory=trajectory if layout_source == "stage1" else None,
        layout_images=to_uint8(layout_images) if segmenter is not None else None,
        segmenter=segmenter,
        reference_key=reference_key,
        cache=cache,
        kv_cache=kv_cache,
        progress=progress,
        should_stop=should_stop,
    )
    return GenerationResult(
        images=model.decode(result.latents),
        layout_images=layout_images,
        layout_latents=layout_latents,
        retouch=result,
    )
