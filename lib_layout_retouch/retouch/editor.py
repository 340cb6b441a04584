"""The retouch editor (paper §3.3, Algorithm 1 lines 6–14): the edits, once for every model family.

Design (after MasaCtrl's AttentionBase and diffusers' attention processors): one callable, the
*editor*, is called by every patched attention layer (a UNet's attention module, a DiT's joint
block) with the layer's name. It holds one *processor* per layer, which knows the layer's roles
(`LayerRoles`, from the family's layer table), and hands it the explicit state of the current model
call (`StepState`: the row plan and which of the paper's edits apply). What the processors produce
(subject maps, kept sources, captured reference K/V) is read back through the editor's methods.

The edits work on Q, K, V and the attention output split into heads, (B, heads, L, D), and on the
rows of the call's batch (`RowPlan`). A UNet's attention and a DiT's joint attention differ only in
the token span (`TokenSpan`): a UNet self-attention layer is all image tokens, a joint block is
[text tokens ; image tokens]. The family supplies how Q, K, V come in and go out (`project`, the
positions of the reference's keys) in its processor; the edits are here:

- copy (s ≤ λ2): the target rows take the layout rows' Q, K, V over the whole sequence;
- paint (s > λ2): the target's image queries attend to [its own text K/V ; every reference's image
  K/V side by side] — Attention(Q_t, K_r, V_r) where there is no text (a UNet self-attention);
- maps (until mask start): the layout's image→text attention of the subject tokens → M^c;
- blend (s ≥ mask start): φ* = M⊙φ_t + (1−M)⊙φ_o on the image tokens.

One model call per step carries every path. Its batch is laid out in *rows* (`RowPlan`): for each
CFG half (uncond, cond) the reference rows (R, one per reference photo, shared by all images), the
layout rows (N) and the target rows (N); a path may be absent from a call (its sources then come
from `StepState.sources`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import LayoutRetouchError
from ..masks import LayerMasks, layer_hw

REFERENCE, LAYOUT, TARGET = "reference", "layout", "target"
UNCOND, COND = "uncond", "cond"
ALL = slice(None)
NONE = slice(0, 0)


@dataclass
class RowPlan:
    """Where each (path, half) sits in the current model call's batch. Built once per row layout
    and kept: what is derived from it on a device (row indices) is cached on it."""

    slices: dict[tuple[str, str], slice] = field(default_factory=dict)
    batch: int = 0
    # what the processors derive from the plan once (row indices on a device, the halves check)
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

    def target_rows(self) -> list[tuple[str, slice]]:
        """[(half, rows)] of the target path in this call."""
        return [(h, self.get(TARGET, h)) for h in self.halves() if self.get(TARGET, h) is not None]

    def has_sources(self) -> bool:
        """Rows of a path other than the target (whose Q/K/V/output a later call may need)."""
        return any(p != TARGET for p, _ in self.slices)

    def reference_gather(self, device: torch.device) -> Optional[torch.Tensor]:
        """Row index that maps every target row to its half's reference row (others to themselves),
        built once per plan on the device; None when a half with targets has no reference rows here
        (the reference then comes from the step state's `sources`)."""
        key = ("reference_gather", device)
        if key in self.derived:
            return self.derived[key]
        # arange + slice fills: made on the device, no host→device copy (which would sync the host)
        gather: Optional[torch.Tensor] = torch.arange(self.batch, dtype=torch.long, device=device)
        for half in self.halves():
            rows, ref = self.get(TARGET, half), self.get(REFERENCE, half)
            if rows is None:
                continue
            if ref is None:
                gather = None
                break
            gather[rows].fill_(ref.start)
        self.derived[key] = gather
        return gather

    def halves_view(self, out: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(target rows, layout rows) of both CFG halves as two strided views of `out`, when both
        halves have the same row layout and the layout rows are in this call; else None."""
        if "halves_rows" not in self.derived:
            half = self.batch // 2
            t, o = self.get(TARGET, UNCOND), self.get(LAYOUT, UNCOND)
            same = (
                self.batch % 2 == 0
                and t is not None
                and o is not None
                and all(
                    self.get(path, COND) == slice(r.start + half, r.stop + half)
                    for path, r in ((TARGET, t), (LAYOUT, o))
                )
            )
            self.derived["halves_rows"] = (half, t, o) if same else None
        if self.derived["halves_rows"] is None:
            return None
        half, t, o = self.derived["halves_rows"]
        pair = out.view(2, half, *out.shape[1:])
        return pair[:, t], pair[:, o]


# (name, path, half) → (q, k, v, out) of a path's rows at one layer; q/out may be None
Sources = Mapping[tuple[str, str, str], tuple]


@dataclass(frozen=True)
class StepState:
    """What the retouch does in ONE model call of step s (Algorithm 1, lines 6–14), handed to the
    editor by `RetouchEditor.begin_step` and read, never changed, by every layer's processor.

    The same for every model family: the batch is `plan`'s rows of paths × CFG halves, and the flags
    say which edit of the paper applies at this step; the layer roles (which layers copy, take the
    reference, blend, record maps) are the processor's own.
    """

    plan: RowPlan
    copy_layout: bool = False  # s ≤ λ2: target Q, K, V ← layout's (at the layout layers)
    paint_identity: bool = False  # s > λ2: target K, V ← reference's (at the reference layers)
    blend: bool = False  # s ≥ mask start: φ* = M⊙φ_t + (1−M)⊙φ_o (at the blend layers)
    record_maps: bool = False  # record the layout's subject-token maps (until M is built)
    masks: Optional[LayerMasks] = None  # M per layer resolution (needed by `blend`)
    # Paths not in this call: a cached reference's K/V, or the earlier calls of a step run one
    # path per call (`sequential`).
    sources: Sources = field(default_factory=dict)
    keep_sources: bool = False  # keep this call's sources for a later call (`kept_sources()`)
    capture_reference: bool = False  # capture the reference's K/V (`captured_reference()`)
    # Several subjects: the reference rows of each subject, in order (photos per subject), and
    # where each subject's region is — `for_tokens(n, device)` → (N, n) subject index per token,
    # masks.NO_REGION outside every subject (masks.LayerRegions, or the maps so far). None: one
    # subject, whose target queries attend to all reference rows.
    reference_groups: tuple = ()
    regions: Optional[object] = None


@dataclass(frozen=True)
class LayerRoles:
    """What one attention layer does in the retouch, from the family's layer table
    (`LayerTable.roles`; docs/ALGORITHM.md)."""

    name: str
    copies_layout: bool  # its Q, K, V are the layout's while s ≤ λ2
    paints: bool  # the target attends to the reference's K/V here while s > λ2
    blends: bool  # its output is blended with the layout's from mask start
    records_maps: bool  # the layout's subject maps are read here


class TokenSpan(NamedTuple):
    """Where the text and the image tokens sit in a layer's key sequence (and the queries' image
    tokens): a UNet self-attention layer is all image (no text); its cross-attention has image
    queries and text keys; a joint block is [text ; image] for both."""

    text: slice = NONE
    image: slice = ALL

    def has_text(self) -> bool:
        return self.text != NONE


SELF_ATTENTION = TokenSpan()
CROSS_ATTENTION = TokenSpan(text=ALL, image=ALL)  # maps only: image queries, text keys


def joint_span(n_text: int) -> TokenSpan:
    return TokenSpan(text=slice(0, n_text), image=slice(n_text, None))


class LayerStep(NamedTuple):
    """What a processor does at its layer in the current call (its roles × the step state)."""

    target_rows: list  # [(half, rows)] of the target path in this call
    copy_layout: bool  # s ≤ λ2 at a layout layer
    reference: bool  # s > λ2 at a reference layer
    blend: bool  # s ≥ mask start at a blend layer, M built
    record_maps: bool  # the layout's subject maps are recorded here
    stores: bool  # keep this call's sources for a later call (sequential mode)
    acts: bool  # anything to do at all (else the layer runs unchanged)


def token_groups(subject_tokens: Sequence) -> list[list[int]]:
    """Each subject's conditioning rows: a list of ints is one subject, a list of lists several."""
    tokens = list(subject_tokens)
    if tokens and isinstance(tokens[0], (list, tuple)):
        return [list(g) for g in tokens]
    return [tokens]


class StepResults:
    """What the processors hand back during a retouch: the subject maps (one per subject, summed
    over layers and steps), and per call the sources kept for a later call and the captured
    reference K/V."""

    def __init__(self, subject_tokens: Sequence, latent_hw: tuple[int, int]):
        self.groups = token_groups(subject_tokens)
        self.subject_tokens = [t for g in self.groups for t in g]  # every subject's rows
        self.latent_hw = latent_hw
        self.kept: dict = {}
        self.captured: Optional[dict] = None
        self._map_sums: list[Optional[torch.Tensor]] = [None] * len(self.groups)  # (N, h, w) each
        self._map_count = 0
        self._token_index: list[Optional[torch.Tensor]] = [None] * len(self.groups)

    def new_call(self, state: StepState) -> None:
        self.kept = {}
        self.captured = {} if state.capture_reference else None

    def record_maps(self, probs: torch.Tensor) -> None:
        """Add each subject's mean map from attention probabilities (N, heads, n, tokens)."""
        for k, group in enumerate(self.groups):
            index = self._token_index[k]
            if index is None or index.device != probs.device:
                # made once on the device: a Python list index would copy host→device per call
                index = self._token_index[k] = torch.tensor(
                    group, dtype=torch.long, device=probs.device
                )
            maps = probs.index_select(-1, index).mean(dim=(1, 3))  # (N, n)
            maps = maps.reshape(-1, *layer_hw(self.latent_hw, maps.shape[1]))
            total = self._map_sums[k]
            if total is None or total.shape != maps.shape:
                total = self._map_sums[k] = torch.zeros_like(maps)
                self._map_count = 0
            total += maps
        self._map_count += 1

    def subject_maps(self) -> Optional[torch.Tensor]:
        """Subject 1's mean map (N, h, w) — the only subject's, for one subject."""
        maps = self.subject_maps_each()
        return None if maps is None else maps[0]

    def subject_maps_each(self) -> Optional[list[torch.Tensor]]:
        """Each subject's mean map (N, h, w) over the recorded layers and calls."""
        if self._map_count == 0 or any(m is None for m in self._map_sums):
            return None
        return [m / self._map_count for m in self._map_sums]


# -- the edits ----------------------------------------------------------------------------------------
def attention_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d) for (B, heads, n, d) inputs, in float32. Only used where the maps are needed
    (the layout path's subject maps); everything else goes through SDPA."""
    scale = q.shape[-1] ** -0.5
    return (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).softmax(dim=-1)


def side_by_side(t: torch.Tensor, n: int) -> torch.Tensor:
    """R references' tokens side by side along the sequence, for n target rows:
    (R, heads, L, d) → (n, heads, R·L, d) (a view: no copy)."""
    heads, d = t.shape[1], t.shape[3]
    return t.transpose(0, 1).reshape(1, heads, -1, d).expand(n, -1, -1, -1)


def attend_to_references(q, keys: list, values: list) -> torch.Tensor:
    """SDPA of target queries over the key/value parts side by side ([own text ; references ;
    own image]); one part is attended as it is (no concatenation copy)."""
    k = keys[0] if len(keys) == 1 else torch.cat(keys, 2)
    v = values[0] if len(values) == 1 else torch.cat(values, 2)
    return F.scaled_dot_product_attention(q, k, v)


class RetouchProcessor:
    """The retouch at ONE attention layer (as a diffusers attention processor), shared by every
    model family: `edit` applies the step state's edits to the layer's Q, K, V (split into heads,
    (B, heads, L, D)) and returns the attention output. A family's processor brings Q, K, V in and
    the output out (`__call__`), and may place the reference's keys (`reference_kv`: a DiT's
    rotary positions)."""

    def __init__(self, roles: LayerRoles, n_references: int = 1, with_target_tokens: bool = False):
        self.roles = roles
        self.name = roles.name
        # Reference rows per CFG half. With several, the target attends to all references' K/V side
        # by side along the tokens; one (and no text) keeps the in-place fast path.
        self.n_references = int(n_references)
        self.with_target_tokens = bool(with_target_tokens)  # paint: also the target's own image

    def at_layer(self, state: StepState) -> LayerStep:
        """What this call does at this layer: the step state × the layer's roles."""
        plan, roles = state.plan, self.roles
        target_rows = plan.target_rows()
        copy_here = state.copy_layout and roles.copies_layout
        ref_here = state.paint_identity and roles.paints
        blend_here = state.blend and roles.blends and state.masks is not None
        maps_here = state.record_maps and roles.records_maps and plan.get(LAYOUT, COND) is not None
        needs_sources = copy_here or ref_here or blend_here
        stores = state.keep_sources and needs_sources and plan.has_sources()
        acts = (bool(target_rows) and needs_sources) or maps_here or stores
        return LayerStep(target_rows, copy_here, ref_here, blend_here, maps_here, stores, acts)

    def paints_in_place(self, span: TokenSpan) -> bool:
        """One reference and nothing else to attend to (a UNet self-attention): the target's K, V
        are replaced by the reference's before the batched attention, no second attention."""
        return self.n_references == 1 and not span.has_text() and not self.with_target_tokens

    # -- the sequence of Algorithm 1, lines 6–14 ------------------------------------------------
    def edit(self, state, at: LayerStep, results: StepResults, q, k, v, span: TokenSpan, **kv_of):
        """The layer's attention output for this call, with the edits applied. `kv_of`: what the
        family's `reference_kv` needs (a DiT's keys before their positions)."""
        if at.copy_layout:
            self.copy_layout(state, at, q, k, v)  # s ≤ λ2: target Q, K, V ← layout's
        elif at.reference and self.paints_in_place(span):
            self.paint_in_place(state, at, results, q, k, v, **kv_of)  # K, V ← reference's
        if at.record_maps:
            self.record_maps(state, results, q, k, span)  # the layout's subject maps → M^c
        out = F.scaled_dot_product_attention(q, k, v)
        if at.reference and not self.paints_in_place(span):
            self.paint(state, at, results, q, k, v, out, span, **kv_of)  # Attention(Q_t, [K_r…])
        if at.blend:
            self.blend_with_layout(state, at, q, k, v, out, span)  # φ* = M⊙φ_t + (1−M)⊙φ_o
        if at.stores:
            self.keep_sources(state, results, q, k, v, out, **kv_of)
        return out

    def copy_layout(self, state: StepState, at: LayerStep, q, k, v) -> None:
        for half, rows in at.target_rows:
            src = self.source(state, LAYOUT, half, q, k, v)
            q[rows], k[rows], v[rows] = src[0], src[1], src[2]

    def reference_kv(self, state: StepState, half: str, q, k, v, **kv_of):
        """The reference rows' K and V (R, heads, L, D) as the target attends to them."""
        rows = state.plan.get(REFERENCE, half)
        if rows is None:
            _, kr, vr, _ = self.source(state, REFERENCE, half, q, k, v)
            return kr, vr
        return k[rows], v[rows]

    def capture(self, state: StepState, results: StepResults, half: str, kr, vr) -> None:
        """Keep the reference's K/V of this call for later generations (`captured_reference()`)."""
        if results.captured is not None and state.plan.get(REFERENCE, half) is not None:
            results.captured[(self.name, REFERENCE, half)] = (None, kr.clone(), vr.clone(), None)

    def paint_in_place(self, state, at, results, q, k, v, gathered: bool = False, **kv_of):
        for half, rows in at.target_rows:
            kr, vr = self.reference_kv(state, half, q, k, v, **kv_of)
            self.capture(state, results, half, kr, vr)
            if not gathered:  # the family's projection already fed the reference to these rows
                n = rows.stop - rows.start
                k[rows] = kr.expand(n, -1, -1, -1)
                v[rows] = vr.expand(n, -1, -1, -1)

    def paint(self, state, at, results, q, k, v, out, span: TokenSpan, **kv_of) -> None:
        """The target's image queries attend to [own text ; the references' image tokens (; own
        image)], overwriting their output of the batched attention. Several subjects: a query in
        subject k's region attends to subject k's photos only; outside every region it keeps the
        layout's output φ_o."""
        for half, rows in at.target_rows:
            if state.regions is not None and not any(state.reference_groups):
                # every subject's photos are in calls of their own (their own weights): the
                # layout's output here, as in a region whose photos are elsewhere
                phi_o = self.source(state, LAYOUT, half, q, k, v, out=out)[3]
                out[rows, :, span.image] = phi_o[:, :, span.image]
                continue
            kr, vr = self.reference_kv(state, half, q, k, v, **kv_of)
            self.capture(state, results, half, kr, vr)
            if state.regions is None:
                out[rows, :, span.image] = self.attend_references(q, k, v, rows, kr, vr, span)
                continue
            phi_o = self.source(state, LAYOUT, half, q, k, v, out=out)[3][:, :, span.image]
            region = state.regions.for_tokens(phi_o.shape[2], q.device)[:, None, :, None]
            painted, start = phi_o.clone(), 0
            for subject, count in enumerate(state.reference_groups):
                own = slice(start, start + count)
                start += count
                if not count:  # this subject's photos are in another call (its own weights)
                    continue
                attended = self.attend_references(q, k, v, rows, kr[own], vr[own], span)
                painted = torch.where(region == subject, attended, painted)
            out[rows, :, span.image] = painted

    def attend_references(self, q, k, v, rows: slice, kr, vr, span: TokenSpan) -> torch.Tensor:
        """The target rows' image queries over [own text ; kr, vr side by side (; own image)]."""
        n = rows.stop - rows.start
        keys, values = [side_by_side(kr, n)], [side_by_side(vr, n)]
        if span.has_text():
            keys.insert(0, k[rows, :, span.text])
            values.insert(0, v[rows, :, span.text])
        if self.with_target_tokens:
            keys.append(k[rows, :, span.image])
            values.append(v[rows, :, span.image])
        return attend_to_references(q[rows, :, span.image], keys, values)

    def record_maps(self, state: StepState, results: StepResults, q, k, span: TokenSpan) -> None:
        """The layout path's (cond half) image→text attention probabilities, softmax over the text."""
        rows = state.plan.get(LAYOUT, COND)
        tokens, k_text = results.subject_tokens, k[rows, :, span.text]
        if tokens and max(tokens) >= k_text.shape[2]:
            raise LayoutRetouchError(
                f"subject token {max(tokens)} lies past the {k_text.shape[2]} text tokens",
                parameter="class_phrase",
            )
        results.record_maps(attention_probabilities(q[rows, :, span.image], k_text))

    def blend_with_layout(self, state: StepState, at: LayerStep, q, k, v, out, span) -> None:
        n_image = out[:, :, span.image].shape[2]
        # (N, 1, n, 1), cached per resolution
        w = state.masks.for_tokens(n_image, out.dtype, complement=True).unsqueeze(1)
        both = state.plan.halves_view(out) if span.image == ALL else None
        if both is not None:
            # φ* = M⊙φ_t + (1−M)⊙φ_o = φ_t.lerp_(φ_o, 1 − M): one in-place kernel for both CFG halves
            targets, layouts = both
            targets.lerp_(layouts, w)
            return
        for half, rows in at.target_rows:
            phi_o = self.source(state, LAYOUT, half, q, k, v, out=out)[3][:, :, span.image]
            out[rows, :, span.image] = out[rows, :, span.image].lerp(phi_o, w)

    def keep_sources(self, state: StepState, results: StepResults, q, k, v, out, **kv_of) -> None:
        """This call's layout (Q, K, V, output) and reference (K, V) for a later call."""
        for (path, half), rows in state.plan.slices.items():
            if path == LAYOUT:
                results.kept[(self.name, path, half)] = (q[rows], k[rows], v[rows], out[rows])
            elif path == REFERENCE:
                kr, vr = self.reference_kv(state, half, q, k, v, **kv_of)
                results.kept[(self.name, path, half)] = (None, kr, vr, None)

    def source(self, state: StepState, path, half, q, k, v, out=None):
        """(q, k, v, out) of `path`'s rows: from this call, else from the state's `sources`."""
        rows = state.plan.get(path, half)
        if rows is not None:
            return (q[rows], k[rows], v[rows], None if out is None else out[rows])
        try:
            return state.sources[(self.name, path, half)]
        except KeyError:
            raise RuntimeError(
                f"{path} path ({half}) missing for {self.name} at this step"
            ) from None


class RetouchEditor:
    """The retouch editor: one processor per attention layer, driven call by call by the loop.

    Contract: `begin_step(StepState)` before each model call; the family's patch routes every
    attention layer through `__call__`; the results are read back through `subject_maps()` (over
    all calls so far), `kept_sources()` and `captured_reference()` (of the last call). Nothing else
    is set from outside. `processor(roles, n_references)` makes the per-layer processor (the
    family's subclass of `RetouchProcessor`); `roles(name)` the layer's roles (the table's)."""

    def __init__(
        self,
        roles: Callable[[str], LayerRoles],
        subject_tokens: Sequence[int],
        latent_hw: tuple[int, int],
        n_references: int,
        processor: Callable[[LayerRoles, int], RetouchProcessor],
    ):
        self.roles = roles
        self.n_references = int(n_references)
        self._make_processor = processor
        self._processors: dict[str, RetouchProcessor] = {}
        self._state: Optional[StepState] = None
        self._results = StepResults(subject_tokens, latent_hw)

    def begin_step(self, state: StepState) -> None:
        """The state of the next model call."""
        self._state = state
        self._results.new_call(state)

    def subject_maps(self) -> Optional[torch.Tensor]:
        """Mean subject-token map per image over recorded layers and calls, (N, h, w) (subject 1's)."""
        return self._results.subject_maps()

    def subject_maps_each(self) -> Optional[list[torch.Tensor]]:
        """Each subject's mean map per image, [(N, h, w)] (one per subject)."""
        return self._results.subject_maps_each()

    def kept_sources(self) -> dict:
        """The last call's sources, when its state had `keep_sources` (for a later call's `sources`)."""
        return dict(self._results.kept)

    def captured_reference(self) -> Optional[dict]:
        """The last call's reference K/V, when its state had `capture_reference` (else None)."""
        captured = self._results.captured
        return None if captured is None else dict(captured)

    def processor(self, name: str) -> RetouchProcessor:
        proc = self._processors.get(name)
        if proc is None:
            proc = self._processors[name] = self._make_processor(
                self.roles(name), self.n_references
            )
        return proc
