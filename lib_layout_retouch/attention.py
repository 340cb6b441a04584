"""The attention engine: per-instance wrappers on the UNet's attention modules, and the retouch
editor that runs the multi-source attention swap and the mask blend (paper §3.3, docs/ALGORITHM.md).

Design (after MasaCtrl's AttentionBase and diffusers' attention processors): one callable, the
*editor*, is called by every wrapped module with the module's name; the editor decides per step and
layer what to do. `patched_attention` installs the wrappers on the module INSTANCES (A1111 swaps
the class-level forward whenever the attention optimisation changes; instance attributes survive
that) and always restores exactly what was there, exception or interrupt included.

One UNet call per step carries every path. Its batch is laid out in *rows*: for each CFG half
(uncond, cond) the reference rows (1, shared by all images), the layout rows (N) and the target
rows (N). The editor rebuilds the target rows' Q/K/V from the layout/reference rows of the same
call, so the three paths cost one batched call (`sequential=True` runs them one call each, for
checking the batched result).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .layers import LayerTable, attention_modules, is_self_attention
from .masks import _layer_hw as layer_hw

REFERENCE, LAYOUT, TARGET = "reference", "layout", "target"
UNCOND, COND = "uncond", "cond"

# editor(name, module, x, context, mask, original_forward) -> output
Editor = Callable[
    [str, torch.nn.Module, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Callable],
    torch.Tensor,
]


class AttentionAlreadyPatched(RuntimeError):
    pass


@contextlib.contextmanager
def patched_attention(
    unet: torch.nn.Module, editor: Editor, names: Optional[Sequence[str]] = None
) -> Iterator[None]:
    """Route every (or the named) attention module of `unet` through `editor` while the block runs.

    On exit — normal, exception or KeyboardInterrupt — each module gets back exactly its previous
    instance attribute (or none, so the class forward applies again)."""
    modules = attention_modules(unet)
    if names is not None:
        modules = {n: modules[n] for n in names}
    installed: list[tuple[torch.nn.Module, bool, object]] = []
    try:
        for name, module in modules.items():
            if getattr(module.__dict__.get("forward"), "_layout_retouch", False):
                raise AttentionAlreadyPatched(f"{name} is already patched by Layout-and-Retouch")
            had_own = "forward" in module.__dict__
            previous = module.__dict__.get("forward")
            module.forward = _make_wrapper(name, module, editor, previous if had_own else None)
            installed.append((module, had_own, previous))
        yield
    finally:
        for module, had_own, previous in reversed(installed):
            if had_own:
                module.forward = previous
            else:
                del module.forward


def _make_wrapper(name: str, module: torch.nn.Module, editor: Editor, previous) -> Callable:
    def original(x, context=None, mask=None, **kwargs):
        # Looked up at call time: the class forward may have been swapped by the host meanwhile.
        if previous is not None:
            return previous(x, context=context, mask=mask, **kwargs)
        return type(module).forward(module, x, context=context, mask=mask, **kwargs)

    def forward(x, context=None, mask=None, **kwargs):
        return editor(name, module, x, context, mask, original)

    forward._layout_retouch = True  # type: ignore[attr-defined]
    return forward


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attention_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d) for (B, heads, n, d) inputs, in float32. Only used where the maps are needed
    (the layout path's 16×16 cross-attention); everything else goes through SDPA."""
    scale = q.shape[-1] ** -0.5
    return (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).softmax(dim=-1)


class _LayerStep(NamedTuple):
    """What the editor does at one layer in the current step."""

    target_rows: list  # [(half, rows)] of the target path in this call
    copy_layout: bool  # s ≤ λ2 at a layout layer
    reference: bool  # s > λ2 at a reference layer
    blend: bool  # s ≥ mask start at a blend layer, M built
    record_maps: bool  # the layout's subject cross-attention maps are recorded here
    stores: bool  # keep this call's sources for a later call (sequential / cached paths)
    acts: bool  # anything to do at all (else the module runs unchanged)


@dataclass
class RowPlan:
    """Where each (path, half) sits in the current UNet call's batch."""

    slices: dict[tuple[str, str], slice] = field(default_factory=dict)
    batch: int = 0
    # what the editor derives from the plan once (row indices on a device, the halves check)
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(
        cls, paths: Sequence[tuple[str, int]], halves: Sequence[str] = (UNCOND, COND)
    ) -> "RowPlan":
        plan, start = cls(), 0
        for half in halves:
            for path, count in paths:
                if count:
                    plan.slices[(path, half)] = slice(start, start + count)
                    start += count
        plan.batch = start
        return plan

    def get(self, path: str, half: str) -> Optional[slice]:
        return self.slices.get((path, half))

    def halves(self) -> list[str]:
        return [h for h in (UNCOND, COND) if any(k[1] == h for k in self.slices)]


class RetouchAttention:
    """The retouch editor (Algorithm 1, lines 6–14), driven step by step by the pipeline.

    Per step s (set by `begin_step`):
      s ≤ λ2 (copy phase): target Q, K, V ← layout's, at `layers.layout_layers` (all by default);
      s > λ2: target self-attention uses its own Q with the reference K, V at `reference_layers`;
      s ≥ mask_start: target self-attention output φ* = M⊙φ_t + (1−M)⊙φ_o at `blend_layers`.
    The layout path's subject-token cross-attention maps are accumulated at `mask_layers` while
    `record_maps` is on (the pipeline turns it off once M is built).
    """

    def __init__(
        self,
        layers: LayerTable,
        subject_tokens: Sequence[int],
        latent_hw: tuple[int, int],
        n_references: int = 1,
    ):
        self.layers = layers
        # Reference rows per CFG half. With several, the target's K/V at a reference layer are all
        # references' K/V side by side along the tokens (issue 12); one keeps the gather fast path.
        self.n_references = int(n_references)
        self.subject_tokens = list(subject_tokens)
        self.latent_hw = latent_hw
        self.plan: Optional[RowPlan] = None
        self.copy_layout = False
        self.paint_identity = False
        self.blend = False
        self.record_maps = False
        self.masks = None  # masks.LayerMasks, set by the pipeline at mask_start
        self.map_sum: Optional[torch.Tensor] = None  # (N, h, w) sum of subject maps
        self.map_count = 0
        # Sources kept between calls when the paths run one call each (sequential mode / cached reference).
        self.store: dict[tuple[str, str, str], tuple[torch.Tensor, ...]] = {}
        self.store_sources = False
        # Reference K/V kept for other generations (pipeline.ReferenceAttentionCache): filled while
        # `capture_reference` is a dict, read back through `store` on later runs.
        self.capture_reference: Optional[dict] = None
        self._token_index: Optional[torch.Tensor] = None
        self._reference = set(layers.reference_layers)
        self._mask = set(layers.mask_layers)
        self._blend = set(layers.blend_layers)

    # -- driven by the pipeline ------------------------------------------------------------
    def begin_step(
        self,
        plan: RowPlan,
        *,
        copy_layout: bool,
        paint_identity: bool,
        blend: bool,
        record_maps: bool,
        keep_store: bool = False,
        sources: Optional[dict] = None,
    ) -> None:
        """`sources`: (name, path, half) → (q, k, v, out) of paths not in this call (a cached reference)."""
        self.plan = plan
        self.copy_layout, self.paint_identity, self.blend, self.record_maps = (
            copy_layout,
            paint_identity,
            blend,
            record_maps,
        )
        if not keep_store:
            self.store.clear()
        if sources:
            self.store.update(sources)

    def subject_maps(self) -> Optional[torch.Tensor]:
        """Mean subject-token map per image over recorded layers and steps, (N, h, w)."""
        if self.map_sum is None or self.map_count == 0:
            return None
        return self.map_sum / self.map_count

    # -- called by every attention module ------------------------------------------------------
    def __call__(self, name, module, x, context, mask, original):
        """One attention module's forward in the retouch step (Algorithm 1, lines 6–14)."""
        plan = self.plan
        if plan is None or mask is not None:
            return original(x, context=context, mask=mask)
        at = self._at_layer(name, plan)
        if not at.acts:
            return original(x, context=context, mask=mask)
        q, k, v, gathered = self._project(module, x, context, at)
        if at.copy_layout:
            self._copy_layout(name, at, q, k, v)  # s ≤ λ2: target Q, K, V ← layout's
        elif at.reference:
            self._take_reference(name, at, q, k, v, gathered)  # s > λ2: target K, V ← reference's
        if at.record_maps:
            self._record_maps(q, k, plan.get(LAYOUT, COND))  # the layout's subject maps → M^c
        out = F.scaled_dot_product_attention(q, k, v)
        if at.reference and self.n_references > 1:
            self._attend_references(
                name, at, q, k, v, out
            )  # target: Attention(Q_t, [K_r1…], [V_r1…])
        if at.blend:
            self._blend_with_layout(
                name, at, q, k, v, out
            )  # s ≥ mask start: φ* = M⊙φ_t + (1−M)⊙φ_o
        if at.stores:
            self._keep_sources(name, q, k, v, out)
        return module.to_out(merge_heads(out))

    # -- the steps of __call__ ------------------------------------------------------------------
    def _at_layer(self, name: str, plan: RowPlan) -> "_LayerStep":
        """What this step does at this layer (set once per step by `begin_step`, read per layer)."""
        self_attn = is_self_attention(name)
        target_rows = [
            (h, plan.get(TARGET, h)) for h in plan.halves() if plan.get(TARGET, h) is not None
        ]
        copy_here = self.copy_layout and self.layers.copies_layout_at(name)
        ref_here = self.paint_identity and self_attn and name in self._reference
        blend_here = self.blend and self_attn and name in self._blend and self.masks is not None
        maps_here = (
            self.record_maps
            and not self_attn
            and name in self._mask
            and plan.get(LAYOUT, COND) is not None
        )
        needs_sources = copy_here or ref_here or blend_here
        stores = self.store_sources and needs_sources and any(p != TARGET for p, _ in plan.slices)
        return _LayerStep(
            target_rows,
            copy_here,
            ref_here,
            blend_here,
            maps_here,
            stores,
            acts=(bool(target_rows) and needs_sources) or maps_here or stores,
        )

    def _project(self, module, x, context, at: "_LayerStep"):
        """Q, K, V (split into heads). When the reference rows are in this call, the target rows are fed
        the reference's hidden states before to_k/to_v (one gather kernel), so their K, V *are* the
        reference's — instead of four row copies into K and V after the projections."""
        heads = module.heads
        q = split_heads(module.to_q(x), heads)
        gather = (
            self._reference_gather(x.device)
            if (at.reference and not at.copy_layout and self.n_references == 1)
            else None
        )
        kv_in = (
            x.index_select(0, gather) if gather is not None else (x if context is None else context)
        )
        k = split_heads(module.to_k(kv_in), heads)
        v = split_heads(module.to_v(kv_in), heads)
        return q, k, v, gather is not None

    def _copy_layout(self, name, at: "_LayerStep", q, k, v) -> None:
        for half, rows in at.target_rows:
            src = self._source(name, LAYOUT, half, q, k, v)
            q[rows], k[rows], v[rows] = src[0], src[1], src[2]

    def _take_reference(self, name, at: "_LayerStep", q, k, v, gathered: bool) -> None:
        for half, rows in at.target_rows:
            ref_rows = self.plan.get(REFERENCE, half)
            if self.capture_reference is not None and ref_rows is not None:
                self.capture_reference[(name, REFERENCE, half)] = (
                    None,
                    k[ref_rows].clone(),
                    v[ref_rows].clone(),
                    None,
                )
            if (
                self.n_references > 1
            ):  # `_attend_references` reads them after the call's own attention
                continue
            if (
                not gathered
            ):  # the reference comes from `store` (a cached reference / sequential mode)
                src = self._source(name, REFERENCE, half, q, k, v)
                n = rows.stop - rows.start
                k[rows] = src[1].expand(n, -1, -1, -1)
                v[rows] = src[2].expand(n, -1, -1, -1)

    def _attend_references(self, name, at: "_LayerStep", q, k, v, out) -> None:
        """Several references: the target rows attend to the keys/values of all of them at once,
        concatenated along the token axis — (R, heads, n, d) → (1, heads, R·n, d). The target rows'
        own output from the batched SDPA above is overwritten (one extra SDPA per CFG half)."""
        for half, rows in at.target_rows:
            _, kr, vr, _ = self._source(name, REFERENCE, half, q, k, v)
            heads, d = kr.shape[1], kr.shape[3]
            n = rows.stop - rows.start
            kc = kr.transpose(0, 1).reshape(1, heads, -1, d).expand(n, -1, -1, -1)
            vc = vr.transpose(0, 1).reshape(1, heads, -1, d).expand(n, -1, -1, -1)
            out[rows] = F.scaled_dot_product_attention(q[rows], kc, vc)

    def _blend_with_layout(self, name, at: "_LayerStep", q, k, v, out) -> None:
        w = self.masks.for_tokens(out.shape[2], out.dtype, complement=True).unsqueeze(
            1
        )  # (N, 1, n, 1), cached
        both = self._halves_view(out)
        if both is not None:
            # φ* = M⊙φ_t + (1−M)⊙φ_o = φ_t.lerp_(φ_o, 1 − M): one in-place kernel for both CFG halves
            targets, layouts = both
            targets.lerp_(layouts, w)
            return
        for half, rows in at.target_rows:
            phi_o = self._source(name, LAYOUT, half, q, k, v, out=out)[3]
            out[rows].lerp_(phi_o, w)

    # -- helpers --------------------------------------------------------------------------------
    def _reference_gather(self, device: torch.device) -> Optional[torch.Tensor]:
        """Row index that maps every target row to its half's reference row (others to themselves),
        built once per plan on the device; None when a half with targets has no reference rows here
        (the reference comes from `store`)."""
        key = ("reference_gather", device)
        if key in self.plan.derived:
            return self.plan.derived[key]
        # arange + slice fills: made on the device, no host→device copy (which would sync the host)
        gather: Optional[torch.Tensor] = torch.arange(
            self.plan.batch, dtype=torch.long, device=device
        )
        for half in self.plan.halves():
            rows, ref = self.plan.get(TARGET, half), self.plan.get(REFERENCE, half)
            if rows is None:
                continue
            if ref is None:
                gather = None
                break
            gather[rows].fill_(ref.start)
        self.plan.derived[key] = gather
        return gather

    def _halves_view(self, out: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(target rows, layout rows) of both CFG halves as two strided views of `out`, when both
        halves have the same row layout and the layout rows are in this call; else None."""
        plan = self.plan
        if "halves_rows" not in plan.derived:
            half = plan.batch // 2
            t, o = plan.get(TARGET, UNCOND), plan.get(LAYOUT, UNCOND)
            same = (
                plan.batch % 2 == 0
                and t is not None
                and o is not None
                and all(
                    plan.get(path, COND) == slice(r.start + half, r.stop + half)
                    for path, r in ((TARGET, t), (LAYOUT, o))
                )
            )
            plan.derived["halves_rows"] = (half, t, o) if same else None
        if plan.derived["halves_rows"] is None:
            return None
        half, t, o = plan.derived["halves_rows"]
        pair = out.view(2, half, *out.shape[1:])
        return pair[:, t], pair[:, o]

    def _source(self, name, path, half, q, k, v, out=None):
        rows = self.plan.get(path, half)
        if rows is not None:
            return (q[rows], k[rows], v[rows], None if out is None else out[rows])
        try:
            return self.store[(name, path, half)]
        except KeyError:
            raise RuntimeError(f"{path} path ({half}) missing for {name} at this step") from None

    def _keep_sources(self, name, q, k, v, out):
        for (path, half), rows in self.plan.slices.items():
            if path != TARGET:
                self.store[(name, path, half)] = (q[rows], k[rows], v[rows], out[rows])

    def _record_maps(self, q, k, rows: slice) -> None:
        probs = attention_probabilities(q[rows], k[rows])  # (N, heads, n, tokens)
        if self._token_index is None or self._token_index.device != probs.device:
            # built once on the device: indexing with a Python list would copy it host→device per call
            self._token_index = torch.tensor(
                self.subject_tokens, dtype=torch.long, device=probs.device
            )
        maps = probs.index_select(-1, self._token_index).mean(dim=(1, 3))  # (N, n)
        maps = maps.reshape(-1, *layer_hw(self.latent_hw, maps.shape[1]))
        if self.map_sum is None or self.map_sum.shape != maps.shape:
            self.map_sum, self.map_count = torch.zeros_like(maps), 0
        self.map_sum += maps
        self.map_count += 1
