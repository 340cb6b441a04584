"""Flux.1's transformer blocks as the retouch runs them: the double- and single-stream blocks with
their attention routed through the editor, the patch that installs it on each block instance, and
the DiT retouch editor (docs/ALGORITHM.md, "DiT (Flux)"; the edits: `dit.joint`, `retouch.editor`).

A Flux block has no separate self- and cross-attention: the image tokens and the T5 text tokens are
one sequence in one attention (double-stream blocks project them with two weight sets, single-stream
blocks with one). `patched_blocks` puts a wrapper on each block INSTANCE's forward (the class may be
swapped by a host, instance attributes survive) and always restores what was there, exception or
interrupt included. The wrapper computes the block the way BFL's blocks do (Forge's and ComfyUI's
compute the same) with the attention routed through the editor; where the editor has nothing to do
at a block in a call, the block's own forward runs, untouched.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ...errors import LayoutRetouchError
from ...retouch.editor import RetouchEditor
from ...retouch.layers import LayerTable
from ...retouch.patch import forwards_replaced, mark
from ..joint import SHIFTED, JointOptions, JointProcessor
from ..tokens import token_grid
from .layers import DOUBLE, SINGLE, layer_roles


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

    return mark(forward)


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


# -- the editor --------------------------------------------------------------------------------------
class DiTRetouchAttention(RetouchEditor):
    """The retouch editor of Flux's blocks: the same contract as the UNet's (`begin_step(StepState)`,
    `subject_maps()`, `kept_sources()`, `captured_reference()`), one `JointProcessor` per block,
    called as a block editor (`patched_blocks`)."""

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
        options = JointOptions(
            token_grid(latent_hw), apply_rope, rope_of, reference_rope, with_target_tokens
        )
        super().__init__(
            lambda name: layer_roles(layers, name),
            subject_tokens,
            latent_hw,
            n_references,
            lambda roles, n: JointProcessor(roles, n, options),
        )
        self.layers = layers
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
            return merge_heads(proc.joint(state, at, self._results, q, k, v, pe, n_txt))

        if kind == DOUBLE:
            return double_block(block, b["img"], b["txt"], b["vec"], b["pe"], attend)
        if self.n_txt is None:
            raise RuntimeError(f"{name}: no double block told the text length of this call")
        return single_block(block, b["x"], b["vec"], b["pe"], self.n_txt, attend)
