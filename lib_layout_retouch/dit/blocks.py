"""The retouch on a joint-attention DiT (Flux.1): per-block processors and the DiT retouch editor
(docs/ALGORITHM.md, "DiT (Flux)").

A Flux block has no separate self- and cross-attention: the image tokens and the T5 text tokens are
one sequence in one attention (double-stream blocks project them with two weight sets, single-stream
blocks with one). The UNet editor's three jobs translate as:

- copy (s ≤ λ2): the target rows take the layout rows' Q, K, V over the WHOLE joint sequence, text
  and image tokens (a UNet copies every self- AND cross-attention). With the layout's pooled vector
  on the target path the target then equals the layout exactly;
- paint (s > λ2, reference blocks): the target's image-token queries attend to
  [its own text K/V ; the reference's image-token K/V] — its own cross-attention plus the reference's
  self-attention, as Attention(Q_t, K_r, V_r) in the UNet — optionally also its own image tokens
  (`with_target_tokens`); the reference keys carry rotary positions `shared` with the target's grid
  or `shifted` past its right edge (`reference_rope`);
- mask (until mask start, mask blocks): the layout's image→text attention of the subject's T5
  tokens, softmax over the text keys (a UNet cross-attention map), averaged into M^c;
- blend (s ≥ mask start, blend blocks): φ* = M⊙φ_t + (1−M)⊙φ_o on the image tokens of the attention
  output (before the output projection / linear2), the text tokens untouched.

`patched_blocks` puts a wrapper on each block INSTANCE's forward (the class may be swapped by a host,
instance attributes survive) and always restores what was there, exception or interrupt included.
The wrapper computes the block the way BFL's blocks do (Forge's and ComfyUI's compute the same) with
the attention routed through the editor; where the editor has nothing to do at a block in a call, the
block's own forward runs, untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import LayoutRetouchError
from ..unet.attention import (
    COND,
    LAYOUT,
    REFERENCE,
    LayerRoles,
    RetouchAttention,
    RetouchProcessor,
    StepResults,
    StepState,
    forwards_replaced,
)
from ..unet.layers import PRESETS, LayerTable
from .tokens import image_ids, token_grid

DOUBLE, SINGLE = "double_blocks", "single_blocks"
SHARED, SHIFTED = "shared", "shifted"
ROPE_MODES = (SHARED, SHIFTED)


# -- the blocks -------------------------------------------------------------------------------------
def dit_blocks(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every double- and single-stream block by name (`double_blocks.3`, `single_blocks.10`), in
    execution order."""
    if not all(hasattr(transformer, a) for a in (DOUBLE, SINGLE)):
        raise LayoutRetouchError(
            "the model has no double_blocks/single_blocks: not a Flux-architecture transformer",
            parameter="sd_model",
        )
    out = {f"{DOUBLE}.{i}": b for i, b in enumerate(getattr(transformer, DOUBLE))}
    out.update({f"{SINGLE}.{i}": b for i, b in enumerate(getattr(transformer, SINGLE))})
    return out


# The block editor: editor(name, block, args, kwargs, original) -> the block's output
BlockEditor = Callable[[str, torch.nn.Module, tuple, dict, Callable], object]


@contextlib.contextmanager
def patched_blocks(
    transformer: torch.nn.Module, editor: BlockEditor, names: Optional[Sequence[str]] = None
) -> Iterator[None]:
    """Route every (or the named) block of `transformer` through `editor` while the `with` runs; on
    any exit each block gets back exactly its previous instance attribute (or none)."""
    blocks = dit_blocks(transformer)
    if names is not None:
        blocks = {n: blocks[n] for n in names}
    with forwards_replaced(blocks, editor, _make_wrapper):
        yield


def _make_wrapper(name, block, editor, previous) -> Callable:
    def original(*args, **kwargs):
        if previous is not None:
            return previous(*args, **kwargs)
        return type(block).forward(block, *args, **kwargs)

    def forward(*args, **kwargs):
        return editor(name, block, args, kwargs, original)

    forward._layout_retouch = True  # type: ignore[attr-defined]
    return forward


_DOUBLE_ARGS, _SINGLE_ARGS = ("img", "txt", "vec", "pe"), ("x", "vec", "pe")
# Extra keyword arguments some hosts pass; the processors accept them when they are inert.
_INERT = ("transformer_options",)


def _bind(kind: str, args: tuple, kwargs: dict) -> dict:
    names = _DOUBLE_ARGS if kind == DOUBLE else _SINGLE_ARGS
    bound = dict(zip(names, args))
    for k, v in kwargs.items():
        if k == "img" and kind == SINGLE:
            k = "x"
        if k in names:
            bound[k] = v
        elif k not in _INERT and v is not None:
            raise LayoutRetouchError(
                f"the {kind} block was called with '{k}', which the retouch does not model "
                "(attention masks / per-token modulation): run this model without Layout-and-Retouch",
                parameter="sd_model",
            )
    return bound


def _modulation(mod: torch.nn.Module, vec: torch.Tensor) -> list[tuple]:
    """[(shift, scale, gate), …] from a Modulation: Forge returns a tuple of tensors, ComfyUI/BFL
    `ModulationOut`s (the second None for a single block)."""
    out = mod(vec)
    if isinstance(out[0], torch.Tensor):
        return [tuple(out[i : i + 3]) for i in range(0, len(out), 3)]
    return [(o.shift, o.scale, o.gate) for o in out if o is not None]


def _heads(qkv: torch.Tensor, heads: int):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)


def apply_rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """BFL's rotary embedding: x (B, H, L, D), pe (B or 1, 1, L, D/2, 2, 2), in float32."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def double_block(block, img, txt, vec, pe, attend):
    """A double-stream block with its attention routed through `attend(q, k, v, pe, n_txt)`."""
    if getattr(block, "flipped_img_txt", False):  # ComfyUI's variant with [image ; text] order
        raise LayoutRetouchError(
            "this DiT puts the image tokens before the text tokens (flipped_img_txt), which the "
            "retouch does not model: run this model without Layout-and-Retouch",
            parameter="sd_model",
        )
    (i_sh1, i_sc1, i_g1), (i_sh2, i_sc2, i_g2) = _modulation(block.img_mod, vec)
    (t_sh1, t_sc1, t_g1), (t_sh2, t_sc2, t_g2) = _modulation(block.txt_mod, vec)
    heads = block.num_heads
    iq, ik, iv = _heads(block.img_attn.qkv((1 + i_sc1) * block.img_norm1(img) + i_sh1), heads)
    iq, ik = block.img_attn.norm(iq, ik, iv)
    tq, tk, tv = _heads(block.txt_attn.qkv((1 + t_sc1) * block.txt_norm1(txt) + t_sh1), heads)
    tq, tk = block.txt_attn.norm(tq, tk, tv)
    n_txt = txt.shape[1]
    attn = attend(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe, n_txt)
    t_att, i_att = attn[:, :n_txt], attn[:, n_txt:]
    img = img + i_g1 * block.img_attn.proj(i_att)
    img = img + i_g2 * block.img_mlp((1 + i_sc2) * block.img_norm2(img) + i_sh2)
    txt = txt + t_g1 * block.txt_attn.proj(t_att)
    txt = txt + t_g2 * block.txt_mlp((1 + t_sc2) * block.txt_norm2(txt) + t_sh2)
    if txt.dtype == torch.float16:
        txt = txt.clip(-65504, 65504)
    return img, txt


def single_block(block, x, vec, pe, n_txt, attend):
    """A single-stream block with its attention routed through `attend`."""
    ((shift, scale, gate),) = _modulation(block.modulation, vec)[:1]
    qkv, mlp = torch.split(
        block.linear1((1 + scale) * block.pre_norm(x) + shift),
        [3 * block.hidden_size, block.mlp_hidden_dim],
        dim=-1,
    )
    q, k, v = _heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    out = block.linear2(torch.cat((attend(q, k, v, pe, n_txt), block.mlp_act(mlp)), 2))
    x = x + gate * out
    if x.dtype == torch.float16:
        x = x.clip(-65504, 65504)
    return x


def plain_attention(q, k, v, pe, n_txt):
    """The block's own attention (RoPE + SDPA), what the editor does where it has nothing to do."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return merge_heads(F.scaled_dot_product_attention(q, k, v))


# -- the layer table ---------------------------------------------------------------------------------
# Flux.1 (dev and schnell: 19 double-, 38 single-stream blocks; 57 in all, counted 0–56 in execution
# order). Reference = blend blocks, `standard`: Stable Flow's "vital layers" of Flux.1-dev (Avrahami
# et al. 2025, measured by bypassing each block: 0, 1, 17, 18, 25, 28, 53, 54, 56), which FreeCus also
# shares attention in: the blocks where replacing attention changes the image. `light`: the late ones
# only (17, 18, 53, 54, 56: the last two double blocks and the last single ones), where appearance
# rather than layout is set. Mask: every double block (text and image keep their own projections there,
# the closest a DiT has to a UNet cross-attention).
VITAL_FLUX1 = (0, 1, 17, 18, 25, 28, 53, 54, 56)
LIGHT_FLUX1 = (17, 18, 53, 54, 56)
FLUX1_DEPTH = (19, 38)


def _unified_names(indices, depth: int) -> tuple[str, ...]:
    return tuple(f"{DOUBLE}.{u}" if u < depth else f"{SINGLE}.{u - depth}" for u in indices)


def dit_layer_table(depth: int, depth_single: int, preset: str = "standard") -> LayerTable:
    """The DiT layer table for a Flux-architecture transformer of `depth` double- and `depth_single`
    single-stream blocks. Flux.1's size gets the written sets; other sizes get them placed at the
    same relative depth (index u of 57 → round(u·(N−1)/56) of N)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown layer preset {preset!r}; one of {', '.join(PRESETS)}")
    chosen = VITAL_FLUX1 if preset == "standard" else LIGHT_FLUX1
    n, full = depth + depth_single, sum(FLUX1_DEPTH)
    if (depth, depth_single) != FLUX1_DEPTH:
        chosen = tuple(sorted({int(u * (n - 1) / (full - 1) + 0.5) for u in chosen}))
    reference = _unified_names(chosen, depth)
    mask = tuple(f"{DOUBLE}.{i}" for i in range(depth))
    name = ("flux" if (depth, depth_single) == FLUX1_DEPTH else "flux-inferred") + (
        "-light" if preset == "light" else ""
    )
    return LayerTable(name, reference, mask, reference)


def layer_table_for_dit(transformer: torch.nn.Module, preset: str = "standard") -> LayerTable:
    return dit_layer_table(
        len(getattr(transformer, DOUBLE)), len(getattr(transformer, SINGLE)), preset
    )


# -- the editor --------------------------------------------------------------------------------------
class _BlockStep(NamedTuple):
    """What a processor does at its block in the current call (its roles × the step state)."""

    target_rows: list
    copy_layout: bool
    reference: bool
    blend: bool
    record_maps: bool
    stores: bool
    acts: bool


@dataclass
class DiTOptions:
    """The DiT family's choices (docs/ALGORITHM.md, "DiT (Flux)"), shared by every block's processor."""

    grid: tuple[int, int]  # the image-token grid
    rope_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # the model's pe_embedder
    reference_rope: str = SHIFTED
    with_target_tokens: bool = False
    _shifted: dict = field(default_factory=dict, repr=False)

    def shifted_pe(self, device) -> torch.Tensor:
        """Rotary embedding of the image grid moved right by its width (the reference sits beside
        the target, as OminiControl places subject conditions), (1, 1, n, D/2, 2, 2)."""
        pe = self._shifted.get(device)
        if pe is None:
            ids = image_ids(self.grid, col_offset=self.grid[1], device=device)
            pe = self._shifted[device] = self.rope_of(ids)
        return pe


class DiTProcessor(RetouchProcessor):
    """The retouch at ONE joint-attention block (the `RetouchProcessor` of the DiT family): the
    block's Q, K, V over [text tokens ; image tokens] come in from the block's own projections and
    QK-norm (`double_block` / `single_block`), the edits of the step state are applied, and the
    attention output (B, L, H·D) goes back into the block."""

    def __init__(self, roles: LayerRoles, n_references: int, options: DiTOptions):
        super().__init__(roles, n_references)
        self.options = options

    def at_layer(self, state: StepState) -> _BlockStep:
        """A joint-attention block has no self/cross split: its roles × the step state."""
        plan, roles = state.plan, self.roles
        target_rows = plan.target_rows()
        copy_here = state.copy_layout and roles.copies_layout
        ref_here = state.paint_identity and roles.reference
        blend_here = state.blend and roles.blend and state.masks is not None
        maps_here = state.record_maps and roles.mask and plan.get(LAYOUT, COND) is not None
        needs = copy_here or ref_here or blend_here
        stores = state.keep_sources and needs and plan.has_sources()
        acts = (bool(target_rows) and needs) or maps_here or stores
        return _BlockStep(target_rows, copy_here, ref_here, blend_here, maps_here, stores, acts)

    def joint(self, state: StepState, at: _BlockStep, results: StepResults, q, k, v, pe, n_txt):
        """The block's joint attention in this call (q, k, v: (B, H, L, D) before RoPE)."""
        k_plain = k  # before the rotary embedding: the reference's keys may get other positions
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        if at.copy_layout:  # s ≤ λ2: the whole joint sequence of the target ← the layout's
            v = v.clone()  # a view of the block's qkv projection
            for half, rows in at.target_rows:
                src = self.source(state, LAYOUT, half, q, k, v)
                q[rows], k[rows], v[rows] = src[0], src[1], src[2]
        if at.record_maps:
            self.record_joint_maps(state, results, q, k, n_txt)
        out = F.scaled_dot_product_attention(q, k, v)
        if at.reference:  # s > λ2: target image queries → [own text ; reference image] K/V
            self.paint(state, at, results, q, k, v, k_plain, out, n_txt)
        if at.blend:  # s ≥ mask start: φ* = M⊙φ_t + (1−M)⊙φ_o on the image tokens
            self.blend_image_tokens(state, at, q, k, v, out, n_txt)
        if at.stores:
            self.keep_joint_sources(state, results, q, k, v, out, k_plain, n_txt)
        return merge_heads(out)

    def reference_kv(self, state: StepState, half, q, k, v, k_plain, n_txt):
        """The reference rows' image-token K (with the chosen positions) and V, (R, H, n, D)."""
        rows = state.plan.get(REFERENCE, half)
        if rows is None:
            _, kr, vr, _ = self.source(state, REFERENCE, half, q, k, v)
            return kr, vr
        if self.options.reference_rope == SHIFTED:
            kr = apply_rope(k_plain[rows, :, n_txt:], self.options.shifted_pe(k.device))
        else:
            kr = k[rows, :, n_txt:]
        return kr, v[rows, :, n_txt:]

    def paint(self, state, at, results, q, k, v, k_plain, out, n_txt) -> None:
        for half, rows in at.target_rows:
            kr, vr = self.reference_kv(state, half, q, k, v, k_plain, n_txt)
            if results.captured is not None and state.plan.get(REFERENCE, half) is not None:
                results.captured[(self.name, REFERENCE, half)] = (
                    None,
                    kr.clone(),
                    vr.clone(),
                    None,
                )
            n = rows.stop - rows.start
            heads, d = kr.shape[1], kr.shape[3]
            # several references: all their image tokens side by side, (R, H, n, D) → (1, H, R·n, D)
            kr = kr.transpose(0, 1).reshape(1, heads, -1, d).expand(n, -1, -1, -1)
            vr = vr.transpose(0, 1).reshape(1, heads, -1, d).expand(n, -1, -1, -1)
            keys, values = [k[rows, :, :n_txt], kr], [v[rows, :, :n_txt], vr]
            if self.options.with_target_tokens:
                keys.append(k[rows, :, n_txt:])
                values.append(v[rows, :, n_txt:])
            out[rows, :, n_txt:] = F.scaled_dot_product_attention(
                q[rows, :, n_txt:], torch.cat(keys, 2), torch.cat(values, 2)
            )

    def blend_image_tokens(self, state, at, q, k, v, out, n_txt) -> None:
        n_img = out.shape[2] - n_txt
        w = state.masks.for_tokens(n_img, out.dtype, complement=True).unsqueeze(1)  # (N,1,n,1)
        for half, rows in at.target_rows:
            phi_o = self.source(state, LAYOUT, half, q, k, v, out=out)[3][:, :, n_txt:]
            out[rows, :, n_txt:] = out[rows, :, n_txt:].lerp(phi_o, w)

    def keep_joint_sources(self, state, results, q, k, v, out, k_plain, n_txt) -> None:
        for (path, half), rows in state.plan.slices.items():
            if path == LAYOUT:
                results.kept[(self.name, path, half)] = (q[rows], k[rows], v[rows], out[rows])
            elif path == REFERENCE:
                kr, vr = self.reference_kv(state, half, q, k, v, k_plain, n_txt)
                results.kept[(self.name, path, half)] = (None, kr, vr, None)

    def record_joint_maps(self, state, results: StepResults, q, k, n_txt: int) -> None:
        """The layout's image→text attention, softmax over the text keys (a UNet cross-attention
        map): (N, H, image tokens, text tokens) to `StepResults.record_maps`."""
        tokens = results.subject_tokens
        if tokens and max(tokens) >= n_txt:
            raise LayoutRetouchError(
                f"subject token {max(tokens)} lies past the {n_txt} T5 tokens",
                parameter="class_phrase",
            )
        rows = state.plan.get(LAYOUT, COND)
        qi, kt = q[rows, :, n_txt:].float(), k[rows, :, :n_txt].float()
        results.record_maps((qi @ kt.transpose(-1, -2) * qi.shape[-1] ** -0.5).softmax(-1))


class DiTRetouchAttention(RetouchAttention):
    """The retouch editor of a joint-attention DiT: the same contract as the UNet's
    (`begin_step(StepState)`, `subject_maps()`, `kept_sources()`, `captured_reference()`), one
    `DiTProcessor` per block, called as a block editor (`patched_blocks`)."""

    def __init__(
        self,
        layers: LayerTable,
        subject_tokens: Sequence[int],
        latent_hw: tuple[int, int],
        n_references: int = 1,
        *,
        rope_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        reference_rope: str = SHIFTED,
        with_target_tokens: bool = False,
    ):
        if reference_rope not in ROPE_MODES:
            raise ValueError(f"reference_rope must be one of {ROPE_MODES}, got {reference_rope!r}")
        if reference_rope == SHIFTED and rope_of is None:
            raise ValueError("shifted reference positions need the transformer's rope (rope_of)")
        options = DiTOptions(token_grid(latent_hw), rope_of, reference_rope, with_target_tokens)
        super().__init__(
            layers,
            subject_tokens,
            latent_hw,
            n_references,
            processor=lambda roles, n: DiTProcessor(roles, n, options),
        )
        self.options = options
        self.n_txt: Optional[int] = None  # text tokens of the current call (read at a double block)

    def __call__(self, name, block, args, kwargs, original):
        """One block's forward in the current call."""
        kind = DOUBLE if name.startswith(DOUBLE) else SINGLE
        if kind == DOUBLE:
            txt = args[1] if len(args) > 1 else kwargs.get("txt")
            if txt is not None:
                self.n_txt = txt.shape[1]
        state = self._state
        if state is None:
            return original(*args, **kwargs)
        proc = self.processor(name)
        at = proc.at_layer(state)
        if not at.acts:
            return original(*args, **kwargs)
        b = _bind(kind, args, kwargs)

        def attend(q, k, v, pe, n_txt):
            return proc.joint(state, at, self._results, q, k, v, pe, n_txt)

        if kind == DOUBLE:
            return double_block(block, b["img"], b["txt"], b["vec"], b["pe"], attend)
        if self.n_txt is None:
            raise RuntimeError(f"{name}: no double block told the text length of this call")
        return single_block(block, b["x"], b["vec"], b["pe"], self.n_txt, attend)
