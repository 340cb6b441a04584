"""The attention engine: wrappers installed and restored exactly; the mask blend; SDPA."""

import pytest
import torch

from lib_layout_retouch.errors import Interrupted
from lib_layout_retouch.masks import LayerMasks
from lib_layout_retouch.retouch import editor as editor_module
from lib_layout_retouch.retouch.editor import (
    COND,
    LAYOUT,
    TARGET,
    UNCOND,
    RowPlan,
    StepState,
    attention_probabilities,
)
from lib_layout_retouch.retouch.layers import LayerTable
from lib_layout_retouch.retouch.patch import AttentionAlreadyPatched
from lib_layout_retouch.unet import attention as attn
from lib_layout_retouch.unet.attention import RetouchAttention, patched_attention
from lib_layout_retouch.unet.layers import attention_modules, layer_table_for
from tests.tolerance import assert_differs_beyond, assert_rounding_close, attention_roundings


def unet_forward(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500, 20]), context=ctx)


class CountingEditor:
    def __init__(self):
        self.calls = []

    def __call__(self, name, module, x, context, mask, original):
        self.calls.append(name)
        return original(x, context=context, mask=mask)


def forwards(unet):
    return {n: m.__dict__.get("forward") for n, m in attention_modules(unet).items()}


def test_every_attention_module_routed_by_name_and_restored(tiny_ldm):
    unet = tiny_ldm.model.diffusion_model
    before = unet_forward(unet)
    editor = CountingEditor()
    with patched_attention(unet, editor):
        during = unet_forward(unet)
        assert all(f is not None for f in forwards(unet).values())
    assert editor.calls == list(attention_modules(unet))  # once each, in execution order
    assert torch.equal(during, before)  # pass-through editor changes nothing
    assert all(f is None for f in forwards(unet).values())
    assert torch.equal(unet_forward(unet), before)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), Interrupted("stop"), KeyboardInterrupt()])
def test_restored_after_exception_and_interrupt(tiny_ldm, exc):
    unet = tiny_ldm.model.diffusion_model
    before = unet_forward(unet)

    def failing_editor(name, module, x, context, mask, original):
        if name.startswith("output_blocks"):
            raise exc
        return original(x, context=context, mask=mask)

    with pytest.raises(type(exc)):
        with patched_attention(unet, failing_editor):
            unet_forward(unet)
    assert all(f is None for f in forwards(unet).values())
    assert torch.equal(unet_forward(unet), before)


def test_restores_a_foreign_instance_forward_and_refuses_double_patch(tiny_ldm):
    unet = tiny_ldm.model.diffusion_model
    name, module = next(iter(attention_modules(unet).items()))
    own = lambda x, context=None, mask=None: type(module).forward(module, x, context, mask)  # noqa: E731
    module.forward = own  # another extension's per-instance hook
    try:
        editor = CountingEditor()
        with patched_attention(unet, editor):
            with pytest.raises(AttentionAlreadyPatched):
                with patched_attention(unet, editor):
                    pass
            assert module.__dict__["forward"] is not own
        assert module.__dict__["forward"] is own
    finally:
        del module.forward
    assert "forward" not in module.__dict__


def test_patches_survive_a_class_forward_swap(tiny_ldm):
    """A1111 replaces CrossAttention.forward on the class when the optimisation changes."""
    unet = tiny_ldm.model.diffusion_model
    cls = type(next(iter(attention_modules(unet).values())))
    old = cls.forward
    seen = []

    def swapped(self, x, context=None, mask=None):
        seen.append(1)
        return old(self, x, context, mask)

    editor = CountingEditor()
    with patched_attention(unet, editor):
        cls.forward = swapped
        try:
            unet_forward(unet)
        finally:
            cls.forward = old
    assert len(editor.calls) == len(attention_modules(unet)) and len(seen) == len(editor.calls)


def _self_attention_module(tiny_ldm):
    name = "output_blocks.3.1.transformer_blocks.0.attn1"
    return name, attention_modules(tiny_ldm.model.diffusion_model)[name]


@pytest.mark.parametrize("m_value", [1.0, 0.0, 0.3])
def test_mask_blend_values(tiny_ldm, m_value):
    """M ≡ 1 → the target's own self-attention output; M ≡ 0 → the layout's; else the blend (to
    fp32 rounding: the editor's SDPA against the module's own attention)."""
    name, module = _self_attention_module(tiny_ldm)
    table = LayerTable(
        "t", reference_layers=(), mask_layers=(), blend_layers=(name,), layout_layers=()
    )
    g = torch.Generator().manual_seed(3)
    x_layout = torch.randn(1, 64, 32, generator=g)
    x_target = torch.randn(1, 64, 32, generator=g)
    with torch.no_grad():
        own_t = module(x_target)
        own_o = module(x_layout)
    editor = RetouchAttention(table, subject_tokens=[1], latent_hw=(8, 8))
    plan = RowPlan.build([(LAYOUT, 1), (TARGET, 1)], halves=(COND,))
    masks = LayerMasks(torch.full((1, 8, 8), m_value), (8, 8))
    editor.begin_step(StepState(plan, blend=True, masks=masks))
    x = torch.cat([x_layout, x_target])
    with torch.no_grad():
        out = editor(
            name, module, x, None, None, lambda *a, **k: pytest.fail("must not pass through")
        )
    roundings = attention_roundings(module, 64)
    assert_rounding_close(out[0:1], own_o, roundings)  # the layout row is untouched
    expected = m_value * own_t + (1 - m_value) * own_o
    tol = assert_rounding_close(out[1:2], expected, roundings)
    if m_value == 1.0:
        assert_rounding_close(out[1:2], own_t, roundings)
    if m_value == 0.0:
        assert_rounding_close(out[1:2], own_o, roundings)
    assert_differs_beyond(own_t, own_o, tol)  # the rows differ, so a swap could not pass


def test_reference_kv_injection_and_sdpa(tiny_ldm, monkeypatch):
    """s > λ2: target uses its own Q with the reference K, V (one reference row for N targets)."""
    name, module = _self_attention_module(tiny_ldm)
    table = LayerTable(
        "t", reference_layers=(name,), mask_layers=(), blend_layers=(), layout_layers=()
    )
    g = torch.Generator().manual_seed(4)
    x_ref, x_lay, x_t = (torch.randn(1, 64, 32, generator=g) for _ in range(3))
    x_t2 = torch.randn(1, 64, 32, generator=g)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        editor_module.F,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(1) or real(*a, **k),
    )
    editor = RetouchAttention(table, subject_tokens=[1], latent_hw=(8, 8))
    plan = RowPlan.build([("reference", 1), (LAYOUT, 1), (TARGET, 2)], halves=(COND,))
    editor.begin_step(StepState(plan, paint_identity=True))
    with torch.no_grad():
        out = editor(name, module, torch.cat([x_ref, x_lay, x_t, x_t2]), None, None, None)
        h = module.heads
        for i, xt in enumerate((x_t, x_t2)):
            q = attn.split_heads(module.to_q(xt), h)
            k = attn.split_heads(module.to_k(x_ref), h)
            v = attn.split_heads(module.to_v(x_ref), h)
            probs = attention_probabilities(q, k)
            expected = module.to_out(attn.merge_heads(torch.matmul(probs, v)))
            tol = assert_rounding_close(
                out[2 + i : 3 + i], expected, attention_roundings(module, 64)
            )
        assert_differs_beyond(out[2:3], module(x_t), tol)
    assert calls == [1]  # one SDPA call for the whole batch, no hand-written softmax


def _expected_with_reference(module, x_target, x_reference):
    h = module.heads
    q = attn.split_heads(module.to_q(x_target), h)
    k = attn.split_heads(module.to_k(x_reference), h)
    v = attn.split_heads(module.to_v(x_reference), h)
    return module.to_out(attn.merge_heads(torch.matmul(attention_probabilities(q, k), v)))


def test_reference_kv_per_cfg_half_in_call_and_from_a_cached_reference(tiny_ldm):
    """Both CFG halves: each half's targets take that half's reference K, V — whether the reference
    rows are in the call (gathered before to_k/to_v) or come from a cached reference (`sources`)."""
    name, module = _self_attention_module(tiny_ldm)
    table = LayerTable(
        "t", reference_layers=(name,), mask_layers=(), blend_layers=(), layout_layers=()
    )
    g = torch.Generator().manual_seed(5)
    x = {
        (p, h): torch.randn(n, 64, 32, generator=g)
        for h in (UNCOND, COND)
        for p, n in (("reference", 1), (LAYOUT, 2), (TARGET, 2))
    }
    plan = RowPlan.build([("reference", 1), (LAYOUT, 2), (TARGET, 2)])
    batch = torch.cat([x[(p, h)] for h in (UNCOND, COND) for p in ("reference", LAYOUT, TARGET)])
    roundings = attention_roundings(module, 64)
    editor = RetouchAttention(table, subject_tokens=[1], latent_hw=(8, 8))
    editor.begin_step(StepState(plan, paint_identity=True, capture_reference=True))
    with torch.no_grad():
        out = editor(name, module, batch, None, None, None)
        for h in (UNCOND, COND):
            rows = plan.get(TARGET, h)
            expected = _expected_with_reference(module, x[(TARGET, h)], x[("reference", h)])
            tol = assert_rounding_close(out[rows], expected, roundings)
            assert_rounding_close(out[plan.get(LAYOUT, h)], module(x[(LAYOUT, h)]), roundings)
            assert_rounding_close(
                out[plan.get("reference", h)], module(x[("reference", h)]), roundings
            )
        # the halves differ, so a mix-up of halves could not pass
        assert_differs_beyond(
            out[plan.get(TARGET, UNCOND)],
            _expected_with_reference(module, x[(TARGET, UNCOND)], x[("reference", COND)]),
            tol,
        )
        captured = editor.captured_reference()
        assert set(captured) == {(name, "reference", UNCOND), (name, "reference", COND)}

        # The same step with the reference from the capture instead of reference rows.
        cached_plan = RowPlan.build([(LAYOUT, 2), (TARGET, 2)])
        editor.begin_step(StepState(cached_plan, paint_identity=True, sources=captured))
        cached_batch = torch.cat([x[(p, h)] for h in (UNCOND, COND) for p in (LAYOUT, TARGET)])
        cached_out = editor(name, module, cached_batch, None, None, None)
        for h in (UNCOND, COND):
            assert_rounding_close(
                cached_out[cached_plan.get(TARGET, h)], out[plan.get(TARGET, h)], roundings
            )


def test_mask_blend_both_cfg_halves_with_a_varying_mask(tiny_ldm):
    """The one in-place kernel over both CFG halves gives M⊙φ_t + (1−M)⊙φ_o per image and half."""
    name, module = _self_attention_module(tiny_ldm)
    table = LayerTable(
        "t", reference_layers=(), mask_layers=(), blend_layers=(name,), layout_layers=()
    )
    g = torch.Generator().manual_seed(6)
    x = {
        (p, h): torch.randn(2, 64, 32, generator=g)
        for h in (UNCOND, COND)
        for p in (LAYOUT, TARGET)
    }
    m = torch.rand(2, 8, 8, generator=g)
    m[0, :4] = 1.0
    m[1, :, :3] = 0.0
    editor = RetouchAttention(table, subject_tokens=[1], latent_hw=(8, 8))
    plan = RowPlan.build([(LAYOUT, 2), (TARGET, 2)])
    editor.begin_step(StepState(plan, blend=True, masks=LayerMasks(m, (8, 8))))
    batch = torch.cat([x[(p, h)] for h in (UNCOND, COND) for p in (LAYOUT, TARGET)])
    with torch.no_grad():
        out = editor(name, module, batch, None, None, None)
        w = m.reshape(2, 64, 1)
        r = attention_roundings(module, 64)
        for h in (UNCOND, COND):
            own_t, own_o = module(x[(TARGET, h)]), module(x[(LAYOUT, h)])
            assert_rounding_close(out[plan.get(LAYOUT, h)], own_o, r)
            tol = assert_rounding_close(out[plan.get(TARGET, h)], w * own_t + (1 - w) * own_o, r)
            # the target's own output where M is 1, the layout's where M is 0
            assert_rounding_close(out[plan.get(TARGET, h)][0, :32], own_t[0, :32], r)
            assert_rounding_close(
                out[plan.get(TARGET, h)][1].view(8, 8, -1)[:, :3],
                own_o[1].view(8, 8, -1)[:, :3],
                r,
            )
            assert_differs_beyond(own_t, own_o, tol)  # so a swap of the two could not pass


def test_layer_masks_complement_is_exact():
    m = torch.tensor([[[1.0, 0.0], [0.25, 0.7]]])
    lm = LayerMasks(m, (2, 2))
    for dtype in (torch.float32, torch.float16):
        w = lm.for_tokens(4, dtype, complement=True)
        assert w.dtype == dtype and w.shape == (1, 4, 1)
        assert w.flatten().tolist() == [
            0.0,
            1.0,
            torch.tensor(0.75, dtype=dtype).item(),
            torch.tensor(0.3, dtype=dtype).item(),
        ]
        assert lm.for_tokens(4, dtype, complement=True) is w  # cached
    assert torch.equal(lm.for_tokens(4), m.reshape(1, 4, 1))  # the mask itself is unchanged by it


def test_cross_attention_maps_recorded_for_subject_tokens(tiny_ldm):
    unet = tiny_ldm.model.diffusion_model
    table = layer_table_for(unet)
    name = table.mask_layers[0]
    module = attention_modules(unet)[name]
    editor = RetouchAttention(table, subject_tokens=[4, 5], latent_hw=(8, 8))
    plan = RowPlan.build([(LAYOUT, 2)])
    editor.begin_step(StepState(plan, record_maps=True))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 16, 64, generator=g)
    ctx = torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        out = editor(name, module, x, ctx, None, None)
        # recording does not change the output
        assert_rounding_close(out, module(x, ctx), attention_roundings(module, 77))
        q = attn.split_heads(module.to_q(x[2:]), module.heads)
        k = attn.split_heads(module.to_k(ctx[2:]), module.heads)
        expected = attention_probabilities(q, k)[..., [4, 5]].mean(dim=(1, 3)).reshape(2, 4, 4)
    # the COND half only (probabilities ≤ 1: Q·Kᵀ and the softmax's sum round)
    assert_rounding_close(editor.subject_maps(), expected, attention_roundings(module, 77))


def _multi_reference_out(module, name, x_refs, x_t, n_references, sources=None):
    table = LayerTable(
        "t", reference_layers=(name,), mask_layers=(), blend_layers=(), layout_layers=()
    )
    editor = RetouchAttention(
        table, subject_tokens=[1], latent_hw=(8, 8), n_references=n_references
    )
    if sources is None:
        plan = RowPlan.build(
            [("reference", x_refs.shape[0]), (LAYOUT, 1), (TARGET, x_t.shape[0])], halves=(COND,)
        )
        batch = torch.cat([x_refs, x_t[:1], x_t])
    else:
        plan = RowPlan.build([(LAYOUT, 1), (TARGET, x_t.shape[0])], halves=(COND,))
        batch = torch.cat([x_t[:1], x_t])
    editor.begin_step(
        StepState(
            plan, paint_identity=True, sources=sources or {}, capture_reference=sources is None
        )
    )
    with torch.no_grad():
        out = editor(name, module, batch, None, None, None)
    return out[plan.get(TARGET, COND)], editor.captured_reference()


def test_the_same_reference_twice_attends_like_it_once(tiny_ldm):
    """K/V of [ref, ref] concatenated along the tokens: every softmax weight halves and every value
    appears twice, so the output is the same as with [ref] (up to float rounding)."""
    name, module = _self_attention_module(tiny_ldm)
    g = torch.Generator().manual_seed(11)
    x_ref, x_other = torch.randn(1, 64, 32, generator=g), torch.randn(1, 64, 32, generator=g)
    x_t = torch.randn(2, 64, 32, generator=g)
    once, _ = _multi_reference_out(module, name, x_ref, x_t, 1)
    twice, captured = _multi_reference_out(module, name, torch.cat([x_ref, x_ref]), x_t, 2)
    assert_rounding_close(twice, once, attention_roundings(module, 128))
    # against the formula: Attention(Q_t, [K_1; K_2], [V_1; V_2]) with two different references
    both, _ = _multi_reference_out(module, name, torch.cat([x_ref, x_other]), x_t, 2)
    h = module.heads
    q = attn.split_heads(module.to_q(x_t), h)
    k = attn.split_heads(module.to_k(torch.cat([x_ref, x_other], dim=1)), h)  # tokens side by side
    v = attn.split_heads(module.to_v(torch.cat([x_ref, x_other], dim=1)), h)
    with torch.no_grad():
        expected = module.to_out(
            attn.merge_heads(
                torch.matmul(
                    attention_probabilities(q, k.expand(2, -1, -1, -1)),
                    v.expand(2, -1, -1, -1),
                )
            )
        )
    tol = assert_rounding_close(both, expected, attention_roundings(module, 128))
    assert_differs_beyond(both, once, tol)  # the second reference does count
    # from a cached reference (the captured K/V of both rows) the result is the same
    cached, _ = _multi_reference_out(module, name, None, x_t, 2, sources=captured)
    assert_rounding_close(cached, twice, attention_roundings(module, 128))
