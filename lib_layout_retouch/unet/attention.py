"""The retouch on a UNet's attention modules (ldm `CrossAttention`: to_q/to_k/to_v, to_out): the
UNet family's processor and editor over `retouch.editor`, and the patch that routes every module
through it (docs/ALGORITHM.md; the edits themselves are `retouch.editor`'s).

A UNet attention layer is either self-attention (`attn1`: image tokens attend to image tokens) or
cross-attention (`attn2`: image queries, text keys): the token span of `retouch.editor` is all image
for the one, image queries over text keys for the other. One reference photo at a self-attention
layer takes the fast path: the target rows are fed the reference's hidden states before to_k/to_v
(one gather kernel), so their K, V *are* the reference's and one batched attention does the rest.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..retouch.editor import (
    CROSS_ATTENTION,
    SELF_ATTENTION,
    LayerRoles,
    LayerStep,
    RetouchEditor,
    RetouchProcessor,
    StepResults,
    StepState,
)
from ..retouch.layers import LayerTable
from ..retouch.patch import forwards_replaced, mark
from .layers import attention_modules, layer_roles

# editor(name, module, x, context, mask, original_forward) -> output
Editor = Callable[
    [str, torch.nn.Module, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Callable],
    torch.Tensor,
]


@contextlib.contextmanager
def patched_attention(
    unet: torch.nn.Module, editor: Editor, names: Optional[Sequence[str]] = None
) -> Iterator[None]:
    """Route every (or the named) attention module of `unet` through `editor` while the block runs;
    always restored (`retouch.patch.forwards_replaced`)."""
    modules = attention_modules(unet)
    if names is not None:
        modules = {n: modules[n] for n in names}
    with forwards_replaced(modules, editor, _make_wrapper):
        yield


def _make_wrapper(name: str, module: torch.nn.Module, editor: Editor, previous) -> Callable:
    def original(x, context=None, mask=None, **kwargs):
        # Looked up at call time: the class forward may have been swapped by the host meanwhile.
        if previous is not None:
            return previous(x, context=context, mask=mask, **kwargs)
        return type(module).forward(module, x, context=context, mask=mask, **kwargs)

    def forward(x, context=None, mask=None, **kwargs):
        return editor(name, module, x, context, mask, original)

    return mark(forward)


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class UNetProcessor(RetouchProcessor):
    """The retouch at one UNet attention module: project Q, K, V (with the reference gather on the
    fast path), the shared edits, the output projection."""

    def __call__(self, module, x, context, state: StepState, results: StepResults):
        at = self.at_layer(state)
        if not at.acts:
            return None  # the module runs unchanged
        span = SELF_ATTENTION if context is None else CROSS_ATTENTION
        q, k, v, gathered = self.project(module, x, context, state, at, span)
        out = self.edit(state, at, results, q, k, v, span, gathered=gathered)
        return module.to_out(merge_heads(out))

    def project(self, module, x, context, state: StepState, at: LayerStep, span):
        """Q, K, V (split into heads). When the reference rows are in this call and the target takes
        them in place, the target rows are fed the reference's hidden states before to_k/to_v (one
        gather kernel) — instead of four row copies into K and V after the projections."""
        heads = module.heads
        q = split_heads(module.to_q(x), heads)
        use_gather = at.reference and not at.copy_layout and self.paints_in_place(span)
        gather = state.plan.reference_gather(x.device) if use_gather else None
        if gather is not None:
            kv_in = x.index_select(0, gather)
        else:
            kv_in = x if context is None else context
        k = split_heads(module.to_k(kv_in), heads)
        v = split_heads(module.to_v(kv_in), heads)
        return q, k, v, gather is not None


class RetouchAttention(RetouchEditor):
    """The retouch editor of a UNet: one `UNetProcessor` per attention module, roles from the UNet
    layer table (`layers.layer_roles`), called as each module's forward (`patched_attention`)."""

    def __init__(
        self,
        layers: LayerTable,
        subject_tokens: Sequence[int],
        latent_hw: tuple[int, int],
        n_references: int = 1,
        processor: Callable[[LayerRoles, int], RetouchProcessor] = UNetProcessor,
    ):
        super().__init__(
            lambda name: layer_roles(layers, name),
            subject_tokens,
            latent_hw,
            n_references,
            processor,
        )
        self.layers = layers

    def __call__(self, name, module, x, context, mask, original):
        """One attention module's forward in the current call."""
        state = self._state
        if state is None or mask is not None:
            return original(x, context=context, mask=mask)
        out = self.processor(name)(module, x, context, state, self._results)
        return original(x, context=context, mask=mask) if out is None else out
