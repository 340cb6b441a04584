"""The attention engine: per-instance wrappers on the UNet's attention modules, and the retouch
editor that runs the multi-source attention swap and the mask blend (paper §3.3, docs/ALGORITHM.md).

Design (after MasaCtrl's AttentionBase and diffusers' attention processors): one callable, the
*editor*, is called by every wrapped module with the module's name. The retouch editor
(`RetouchAttention`) holds one *processor* per layer (`RetouchProcessor`, which knows the layer's
roles) and hands it the explicit state of the current model call (`StepState`: the row plan and
which of the paper's edits apply); what the processors produce (subject maps, kept sources,
captured reference K/V) is read back through the editor's methods. `patched_attention` installs
the wrappers on the module INSTANCES (A1111 swaps the class-level forward whenever the attention
optimisation changes; instance attributes survive that) and always restores exactly what was
there, exception or interrupt included.

One model call per step carries every path. Its batch is laid out in *rows* (`RowPlan`): for each
CFG half (uncond, cond) the reference rows (R, one per reference photo, shared by all images), the
layout rows (N) and the target rows (N). The processors rebuild the target rows' Q/K/V from the
layout/reference rows of the same call, so the three paths cost one batched call
(`sequential=True` runs them one call each, for checking the batched result).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..masks import LayerMasks, layer_hw
from .layers import LayerTable, attention_modules, is_self_attention

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
    with forwards_replaced(modules, editor, _make_wrapper):
        yield


@contextlib.contextmanager
def forwards_replaced(modules: dict, editor, make_wrapper: Callable) -> Iterator[None]:
    """Give each named module an instance `forward` = make_wrapper(name, module, editor, previous
    own forward or None) while the block runs (attention modules here, DiT blocks in
    dit_attention). On any exit each module gets back exactly its previous instance attribute (or
    none, so the class forward applies again); a module already patched by us is refused."""
    installed: list[tuple[torch.nn.Module, bool, object]] = []
    try:
        for name, module in modules.items():
            if getattr(module.__dict__.get("forward"), "_layout_retouch", False):
                raise AttentionAlreadyPatched(f"{name} is already patched by Layout-and-Retouch")
            had_own = "forward" in module.__dict__
            previous = module.__dict__.get("forward")
            module.forward = make_wrapper(name, module, editor, previous if had_own else None)
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
    editor by `RetouchAttention.begin_step` and read, never changed, by every layer's processor.

    The contract is the same for every model family (a UNet's attention modules, a DiT's joint
    attention blocks): the batch is `plan`'s rows of paths × CFG halves, and the flags say which
    edit of the paper applies at this step; the layer roles (which layers copy, take the
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


@dataclass(frozen=True)
class LayerRoles:
    """What one attention layer does in the retouch, from the layer table (docs/ALGORITHM.md)."""

    name: str
    self_attention: bool
    copies_layout: bool
    reference: bool
    blend: bool
    mask: bool

    @classmethod
    def of(cls, layers: LayerTable, name: str) -> "LayerRoles":
        return cls(
            name,
            is_self_attention(name),
            layers.copies_layout_at(name),
            name in layers.reference_layers,
            name in layers.blend_layers,
            name in layers.mask_layers,
        )


class _LayerStep(NamedTuple):
    """What a processor does at its layer in the current call (its roles × the step state)."""

    target_rows: list  # [(half, rows)] of the target path in this call
    copy_layout: bool  # s ≤ λ2 at a layout layer
    reference: bool  # s > λ2 at a reference layer
    blend: bool  # s ≥ mask start at a blend layer, M built
    record_maps: bool  # the layout's subject cross-attention maps are recorded here
    stores: bool  # keep this call's sources for a later call (sequential mode)
    acts: bool  # anything to do at all (else the module runs unchanged)


class StepResults:
    """What the processors hand back during a retouch: the subject maps (summed over layers and
    steps), and per call the sources kept for a later call and the captured reference K/V."""

    def __init__(self, subject_tokens: Sequence[int], latent_hw: tuple[int, int]):
        self.subject_tokens = list(subject_tokens)
        self.latent_hw = latent_hw
        self.kept: dict = {}
        self.captured: Optional[dict] = None
        self._map_sum: Optional[torch.Tensor] = None  # (N, h, w) sum of subject maps
        self._map_count = 0
        self._token_index: Optional[torch.Tensor] = None

    def new_call(self, state: StepState) -> None:
        self.kept = {}
        self.captured = {} if state.capture_reference else None

    def record_maps(self, probs: torch.Tensor) -> None:
        """Add the subject tokens' mean map from cross-attention probabilities (N, heads, n, tokens)."""
        if self._token_index is None or self._token_index.device != probs.device:
            # built once on the device: indexing with a Python list would copy it host→device per call
            self._token_index = torch.tensor(
                self.subject_tokens, dtype=torch.long, device=probs.device
            )
        maps = probs.index_select(-1, self._token_index).mean(dim=(1, 3))  # (N, n)
        maps = maps.reshape(-1, *layer_hw(self.latent_hw, maps.shape[1]))
        if self._map_sum is None or self._map_sum.shape != maps.shape:
            self._map_sum, self._map_count = torch.zeros_like(maps), 0
        self._map_sum += maps
        self._map_count += 1

    def subject_maps(self) -> Optional[torch.Tensor]:
        if self._map_sum is None or self._map_count == 0:
            return None
        return self._map_sum / self._map_count


class RetouchProcessor:
    """The retouch at ONE attention layer of a UNet (as a diffusers attention processor): called
    with the module, its input and the step state, it returns the module's output — or None when
    nothing applies here (the module then runs unchanged).

    The edits work on Q, K, V and the attention output split into heads, (B, heads, n, d), and
    are shared by every model family; `project`, `attend` and `output` are the UNet's (ldm
    CrossAttention: to_q/to_k/to_v, SDPA, to_out) — a DiT's joint attention overrides them.
    """

    def __init__(self, roles: LayerRoles, n_references: int = 1):
        self.roles = roles
        self.name = roles.name
        # Reference rows per CFG half. With several, the target's K/V at a reference layer are all
        # references' K/V side by side along the tokens; one keeps the gather fast path.
        self.n_references = int(n_references)

    def __call__(self, module, x, context, state: StepState, results: StepResults):
        at = self.at_layer(state)
        if not at.acts:
            return None
        q, k, v, gathered = self.project(module, x, context, state, at)
        if at.copy_layout:
            self.copy_layout(state, at, q, k, v)  # s ≤ λ2: target Q, K, V ← layout's
        elif at.reference:
            self.take_reference(state, at, q, k, v, gathered, results)  # s > λ2: K, V ← reference's
        if at.record_maps:
            self.record_maps(state, q, k, results)  # the layout's subject maps → M^c
        out = self.attend(q, k, v)
        if at.reference and self.n_references > 1:
            self.attend_references(state, at, q, k, v, out)  # Attention(Q_t, [K_r1…], [V_r1…])
        if at.blend:
            self.blend_with_layout(state, at, q, k, v, out)  # φ* = M⊙φ_t + (1−M)⊙φ_o
        if at.stores:
            self.keep_sources(state, q, k, v, out, results)
        return self.output(module, out)

    def at_layer(self, state: StepState) -> _LayerStep:
        """What this call does at this layer: the step state × the layer's roles."""
        plan, roles = state.plan, self.roles
        target_rows = plan.target_rows()
        copy_here = state.copy_layout and roles.copies_layout
        ref_here = state.paint_identity and roles.self_attention and roles.reference
        blend_here = (
            state.blend and roles.self_attention and roles.blend and state.masks is not None
        )
        maps_here = (
            state.record_maps
            and not roles.self_attention
            and roles.mask
            and plan.get(LAYOUT, COND) is not None
        )
        needs_sources = copy_here or ref_here or blend_here
        stores = state.keep_sources and needs_sources and plan.has_sources()
        acts = (bool(target_rows) and needs_sources) or maps_here or stores
        return _LayerStep(target_rows, copy_here, ref_here, blend_here, maps_here, stores, acts)

    # -- the model family's part --------------------------------------------------------------
    def project(self, module, x, context, state: StepState, at: _LayerStep):
        """Q, K, V (split into heads). When the reference rows are in this call, the target rows are
        fed the reference's hidden states before to_k/to_v (one gather kernel), so their K, V *are*
        the reference's — instead of four row copies into K and V after the projections."""
        heads = module.heads
        q = split_heads(module.to_q(x), heads)
        use_gather = at.reference and not at.copy_layout and self.n_references == 1
        gather = state.plan.reference_gather(x.device) if use_gather else None
        if gather is not None:
            kv_in = x.index_select(0, gather)
        else:
            kv_in = x if context is None else context
        k = split_heads(module.to_k(kv_in), heads)
        v = split_heads(module.to_v(kv_in), heads)
        return q, k, v, gather is not None

    def record_maps(self, state: StepState, q, k, results: StepResults) -> None:
        """The layout path's (cond half) cross-attention probabilities to the prompt tokens."""
        rows = state.plan.get(LAYOUT, COND)
        results.record_maps(attention_probabilities(q[rows], k[rows]))

    def attend(self, q, k, v) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def output(self, module, out: torch.Tensor) -> torch.Tensor:
        return module.to_out(merge_heads(out))

    # -- the edits (Algorithm 1, lines 6–14) ------------------------------------------------------
    def copy_layout(self, state: StepState, at: _LayerStep, q, k, v) -> None:
        for half, rows in at.target_rows:
            src = self.source(state, LAYOUT, half, q, k, v)
            q[rows], k[rows], v[rows] = src[0], src[1], src[2]

    def take_reference(self, state, at: _LayerStep, q, k, v, gathered, results) -> None:
        for half, rows in at.target_rows:
            ref_rows = state.plan.get(REFERENCE, half)
            if results.captured is not None and ref_rows is not None:
                key = (self.name, REFERENCE, half)
                results.captured[key] = (None, k[ref_rows].clone(), v[ref_rows].clone(), None)
            if self.n_references > 1:  # `attend_references` reads them after the attention
                continue
            if not gathered:  # the reference comes from `sources` (cached / sequential mode)
                src = self.source(state, REFERENCE, half, q, k, v)
                n = rows.stop - rows.start
                k[rows] = src[1].expand(n, -1, -1, -1)
                v[rows] = src[2].expand(n, -1, -1, -1)

    def attend_references(self, state: StepState, at: _LayerStep, q, k, v, out) -> None:
        """Several references: the target rows attend to the keys/values of all of them at once,
        concatenated along the token axis — (R, heads, n, d) → (1, heads, R·n, d). The target rows'
        own output from the batched attention is overwritten (one extra SDPA per CFG half)."""
        for half, rows in at.target_rows:
            _, kr, vr, _ = self.source(state, REFERENCE, half, q, k, v)
            heads, d = kr.shape[1], kr.shape[3]
            n = rows.stop - rows.start
            kc = kr.transpose(0, 1).reshape(1, heads, -1, d).expand(n, -1, -1, -1)
            vc = vr.transpose(0, 1).reshape(1, heads, -1, d).expand(n, -1, -1, -1)
            out[rows] = F.scaled_dot_product_attention(q[rows], kc, vc)

    def blend_with_layout(self, state: StepState, at: _LayerStep, q, k, v, out) -> None:
        # (N, 1, n, 1), cached per resolution
        w = state.masks.for_tokens(out.shape[2], out.dtype, complement=True).unsqueeze(1)
        both = state.plan.halves_view(out)
        if both is not None:
            # φ* = M⊙φ_t + (1−M)⊙φ_o = φ_t.lerp_(φ_o, 1 − M): one in-place kernel for both CFG halves
            targets, layouts = both
            targets.lerp_(layouts, w)
            return
        for half, rows in at.target_rows:
            phi_o = self.source(state, LAYOUT, half, q, k, v, out=out)[3]
            out[rows].lerp_(phi_o, w)

    def keep_sources(self, state: StepState, q, k, v, out, results: StepResults) -> None:
        for (path, half), rows in state.plan.slices.items():
            if path != TARGET:
                results.kept[(self.name, path, half)] = (q[rows], k[rows], v[rows], out[rows])

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


class RetouchAttention:
    """The retouch editor (Algorithm 1, lines 6–14): one processor per attention layer, driven
    call by call by the pipeline.

    Contract: `begin_step(StepState)` before each model call; the call routes every attention
    layer through `__call__` (an `Editor`, see `patched_attention`); the results are read back
    through `subject_maps()` (over all calls so far), `kept_sources()` and `captured_reference()`
    (of the last call). Nothing else is set from outside. `processor` makes the per-layer
    processor (a model family's subclass of `RetouchProcessor`).
    """

    def __init__(
        self,
        layers: LayerTable,
        subject_tokens: Sequence[int],
        latent_hw: tuple[int, int],
        n_references: int = 1,
        processor: Callable[[LayerRoles, int], RetouchProcessor] = RetouchProcessor,
    ):
        self.layers = layers
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
        """Mean subject-token map per image over recorded layers and calls, (N, h, w)."""
        return self._results.subject_maps()

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
            roles = LayerRoles.of(self.layers, name)
            proc = self._processors[name] = self._make_processor(roles, self.n_references)
        return proc

    def __call__(self, name, module, x, context, mask, original):
        """One attention module's forward in the current call."""
        state = self._state
        if state is None or mask is not None:
            return original(x, context=context, mask=mask)
        out = self.processor(name)(module, x, context, state, self._results)
        return original(x, context=context, mask=mask) if out is None else out
