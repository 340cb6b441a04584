"""SDXL-family models: the layer table, dict conditioning, the VAE, and the SD1 invariants again.

Every model test runs on two builds of a tiny SDXL (tests/fixtures/sdxl.py): "ldm" (ldm's UNet in SDXL_LAYERS
configuration; always available) and "sgm" (the real sgm DiffusionEngine; skipped with a reason
where sgm is not importable — it is not on PyPI).
"""

import pytest
import torch

from lib_layout_retouch import conditioning as C
from lib_layout_retouch import retouch as pl
from lib_layout_retouch.checkpoints import unet_family
from lib_layout_retouch.errors import Interrupted, LayoutRetouchError
from lib_layout_retouch.prompts import derive_prompts, subject_token_positions
from lib_layout_retouch.retouch.editor import LAYOUT, TARGET
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.unet.attention import patched_attention
from lib_layout_retouch.unet.family import SD1_FAMILY, SDXL_FAMILY
from lib_layout_retouch.unet.layers import (
    SD1_LAYERS,
    SDXL_LAYERS,
    SDXL_LIGHT_LAYERS,
    attention_modules,
    check_layer_table,
    infer_layer_table,
    is_self_attention,
    layer_table_for,
)
from lib_layout_retouch.unet.model import LdmModel, check_model_supported
from tests.fixtures import sdxl as TS
from tests.paths import photo_tensor
from tests.tolerance import (
    assert_differs_beyond,
    assert_rounding_close,
    attention_roundings,
    network_roundings,
    rounding_atol,
)

SGM_OK, SGM_WHY = TS.sgm_status()
T = 4


def _param(kind):
    return pytest.param(
        kind, marks=pytest.mark.skipif(kind == "sgm" and not SGM_OK, reason=SGM_WHY)
    )


@pytest.fixture(scope="module", params=[_param(k) for k in TS.BUILDS])
def xl(request, tmp_path_factory):
    """(kind, model, adapter) of the personalized tiny SDXL_LAYERS."""
    model = TS.build(request.param, str(tmp_path_factory.mktemp("xl-clip")), seed=0)
    return request.param, model, LdmModel(model)


def _forward(adapter, seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    cond = C.expand(
        adapter.conditioning(["a photo of sks dog"], adapter.generation_size(64, 64)), n
    )
    with torch.no_grad():
        return adapter.eps(x, torch.tensor([500] * n), cond)


# -- layer tables ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not SGM_OK, reason=SGM_WHY)
def test_sdxl_base_table_is_the_structural_rule_on_the_real_unet():
    unet = TS.sgm_base_unet_on_meta()
    names = list(attention_modules(unet))
    selfs = [n for n in names if is_self_attention(n)]
    assert len(selfs) == 70 and len(names) == 140
    assert (
        layer_table_for(unet) is SDXL_LAYERS and layer_table_for(unet, "light") is SDXL_LIGHT_LAYERS
    )
    check_layer_table(SDXL_LAYERS, unet)
    assert tuple(selfs[44:]) == SDXL_LAYERS.reference_layers  # MasaCtrl start_layer=44 of 70
    inferred = infer_layer_table(unet)
    assert inferred.reference_layers == SDXL_LAYERS.reference_layers and set(
        inferred.mask_layers
    ) == set(SDXL_LAYERS.mask_layers)
    assert set(infer_layer_table(unet, "light").reference_layers) == set(
        SDXL_LIGHT_LAYERS.reference_layers
    )
    assert len(SDXL_LAYERS.mask_layers) == 50 and all(
        n.endswith("attn2") for n in SDXL_LAYERS.mask_layers
    )


def test_written_tables_follow_their_rules():
    assert (
        len(SDXL_LAYERS.reference_layers) == 26
        and SDXL_LAYERS.blend_layers == SDXL_LAYERS.reference_layers
    )
    assert all(
        n.startswith(
            (
                "output_blocks.1.",
                "output_blocks.2.",
                "output_blocks.3.",
                "output_blocks.4.",
                "output_blocks.5.",
            )
        )
        for n in SDXL_LAYERS.reference_layers
    )
    assert (
        set(SDXL_LIGHT_LAYERS.reference_layers) < set(SDXL_LAYERS.reference_layers)
        and len(SDXL_LIGHT_LAYERS.reference_layers) == 6
    )
    assert SDXL_LAYERS.swaps_every_layer() and SD1_LAYERS.swaps_every_layer()


def test_tiny_sdxl_table_by_level(xl):
    kind, _, adapter = xl
    table = layer_table_for(adapter.unet)
    depth = 2 if kind == "ldm" else None
    assert table.name == "inferred-sdxl"
    # mask: every cross-attention at latent/4 (input 7–8, output 0–2), no other level
    assert {n.split(".1.transformer")[0] for n in table.mask_layers} == {
        "input_blocks.7",
        "input_blocks.8",
        "output_blocks.0",
        "output_blocks.1",
        "output_blocks.2",
    }
    # reference: latent/4 without its first decoder block, and latent/2
    assert {n.split(".1.transformer")[0] for n in table.reference_layers} == {
        "output_blocks.1",
        "output_blocks.2",
        "output_blocks.3",
        "output_blocks.4",
        "output_blocks.5",
    }
    if depth:  # every transformer block of each, not just block 0
        assert len(table.reference_layers) == 5 * depth
    light = layer_table_for(adapter.unet, "light")
    assert {n.split(".1.transformer")[0] for n in light.reference_layers} == {
        "output_blocks.3",
        "output_blocks.4",
        "output_blocks.5",
    }
    with pytest.raises(ValueError, match="unknown layer preset"):
        layer_table_for(adapter.unet, "heavy")


# -- model kind, families --------------------------------------------------------------------------------
def test_sdxl_is_supported_and_other_kinds_are_refused_by_name(xl):
    _, model, adapter = xl
    check_model_supported(model)
    assert adapter.is_sdxl and adapter.family.name == SDXL_FAMILY
    assert unet_family(adapter.unet.state_dict()) == SDXL_FAMILY


def test_unet_family_from_state_dict(tiny_ldm):
    assert unet_family(tiny_ldm.model.diffusion_model.state_dict()) == SD1_FAMILY


# -- conditioning ------------------------------------------------------------------------------------------
def test_sdxl_conditioning_is_a_dict_and_size_terms_touch_only_the_vector(xl):
    _, _, adapter = xl
    a = adapter.conditioning(["a photo of sks dog"], C.SizeTerms((64, 64), (0, 0), (64, 64)))
    b = adapter.conditioning(["a photo of sks dog"], C.SizeTerms((300, 200), (8, 0), (64, 64)))
    assert set(a) == {"crossattn", "vector"} and a["crossattn"].shape[:2] == (1, 77)
    assert torch.equal(a["crossattn"], b["crossattn"])
    assert not torch.allclose(a["vector"], b["vector"])
    other = adapter.conditioning(["a red vase"], C.SizeTerms((64, 64), (0, 0), (64, 64)))
    assert not torch.allclose(a["crossattn"], other["crossattn"])


def test_empty_negative_prompt_is_sdxls_zero_embedding(xl):
    _, _, adapter = xl
    size = adapter.generation_size(64, 64)
    zero = adapter.conditioning([""], size, negative=True)
    positive_empty = adapter.conditioning([""], size)
    assert zero["crossattn"].abs().max() == 0
    assert positive_empty["crossattn"].abs().max() > 0
    # the size part of the vector stays (only the text part is zeroed)
    assert zero["vector"].abs().max() > 0


def _size_part(vector, kind):
    """The size terms at the end of SDXL's vector (after the pooled text embedding)."""
    return vector[:, -(3 * 2 * (TS.SIZE_DIM if kind == "ldm" else 256)) :]


def test_encode_prompts_gives_each_path_its_own_size_terms(xl):
    kind, _, adapter = xl
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    conds = pl.encode_prompts(
        adapter,
        prompts,
        "",
        image_size=(64, 64),
        reference_size=C.SizeTerms((480, 640), (0, 10), (64, 64)),
    )
    # y_r's tokens on both paths: the reference's encoded alone, the target's beside y_p (another
    # batch of the text encoders, so up to their rounding); y_p's tokens are not y_r's
    tol = assert_rounding_close(
        conds.target["crossattn"],
        conds.reference["crossattn"],
        network_roundings(adapter.ldm.conditioner),
    )
    assert_differs_beyond(conds.layout["crossattn"], conds.reference["crossattn"], tol)
    assert not torch.equal(conds.reference["vector"], conds.target["vector"])  # other size terms
    assert torch.equal(
        conds.cond_of(TARGET)["vector"], conds.layout["vector"]
    )  # the layout's global conditioning
    assert not torch.equal(
        _size_part(conds.reference["vector"], kind), _size_part(conds.layout["vector"], kind)
    )
    assert not torch.equal(
        conds.uncond_of("reference")["vector"], conds.uncond_of(LAYOUT)["vector"]
    )
    assert (
        conds.uncond["crossattn"].abs().max() == 0
        and conds.layout_empty["crossattn"].abs().max() == 0
    )


def test_condition_helpers_on_dicts():
    a = {"crossattn": torch.arange(77 * 2.0).view(1, 77, 2), "vector": torch.ones(1, 3)}
    b = {"crossattn": torch.zeros(1, 154, 2), "vector": torch.zeros(1, 3)}
    both = C.cat([C.expand(a, 2), b])
    assert both["crossattn"].shape == (3, 154, 2) and both["vector"].shape == (3, 3)
    assert torch.equal(
        both["crossattn"][0, 77:], a["crossattn"][0]
    )  # padded by repeating its last chunk
    assert torch.equal(C.rows(both, slice(2, 3))["vector"], b["vector"])
    with pytest.raises(ValueError):
        C.cat([a, torch.zeros(1, 77, 2)])


# -- VAE ----------------------------------------------------------------------------------------------------
def test_encode_is_the_deterministic_mode(xl):
    _, _, adapter = xl
    img = photo_tensor()
    z1, z2 = adapter.encode(img), adapter.encode(img)
    assert torch.equal(z1, z2) and z1.shape == (1, 4, 8, 8)
    vae = adapter.ldm.first_stage_model
    with torch.no_grad():
        mean = vae.quant_conv(vae.encoder(img)).chunk(2, dim=1)[0]
    roundings = network_roundings(vae.encoder) + network_roundings(vae.quant_conv)
    assert_rounding_close(z1, adapter.ldm.scale_factor * mean, roundings)


def test_half_precision_vae_that_overflows_is_retried_in_float32(xl):
    _, model, adapter = xl
    img = photo_tensor()
    expected = adapter.decode(adapter.encode(img))
    vae = model.first_stage_model
    original = vae.decoder.forward

    def overflowing(z, **kw):  # what an fp16 SDXL VAE does: inf in half precision only
        out = original(z, **kw)
        return out * torch.inf if out.dtype == torch.float16 else out

    vae.decoder.forward = overflowing
    try:
        vae.half()
        out = adapter.decode(adapter.encode(img).half())
    finally:
        del vae.decoder.forward
        vae.float()
    assert torch.isfinite(out).all()
    assert (
        next(vae.parameters()).dtype == torch.float32
    )  # put back as it was (float32 after .float())
    assert any("VAE overflowed in decode" in n for n in adapter.notes)
    # .half() rounded the latent and the VAE's weights to fp16 for good: the float32 retry decodes
    # with fp16-rounded numbers, so it matches to fp16 rounding through the decoder
    fp16 = rounding_atol(expected, network_roundings(vae.decoder), dtype=torch.float16)
    assert (out.float() - expected).abs().max() <= fp16, (
        (out.float() - expected).abs().max(),
        fp16,
    )


# -- the SD1 invariants on the SDXL UNet --------------------------------------------------------------------
@pytest.fixture(scope="module")
def xl_setup(xl):
    kind, model, adapter = xl
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    conds = pl.encode_prompts(
        adapter,
        prompts,
        "",
        image_size=(64, 64),
        reference_size=C.SizeTerms((96, 64), (16, 0), (64, 64)),
    )
    subject = subject_token_positions(adapter.tokenize, prompts.personalized, ["sks", "dog"])
    ref = adapter.encode(photo_tensor())
    layouts = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return adapter, conds, subject, ref, layouts


def _run(xl_setup, **kw):
    """pl.retouch on the tiny SDXL; `ref`: another reference latent."""
    adapter, conds, subject, ref, layouts = xl_setup
    sched = kw.pop(
        "schedule", Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=3, scale=False)
    )
    fields = pl.RetouchSettings.__dataclass_fields__
    settings = pl.RetouchSettings(schedule=sched, **{k: kw.pop(k) for k in list(kw) if k in fields})
    return pl.retouch(
        adapter,
        reference_latent=kw.pop("ref", ref),
        layout_latents=layouts,
        conds=conds,
        subject_tokens=subject,
        settings=settings,
        **kw,
    )


def _roundings(xl_setup) -> int:
    """A retouched latent is the end of 2T UNet forwards in sequence: the reference's inversion,
    then the T retouch steps."""
    return 2 * T * network_roundings(xl_setup[0].unet)


def test_copy_phase_target_equals_layout_then_identity_is_painted(xl_setup):
    res = _run(xl_setup, skip_equal_target=False, keep_trajectories=True)
    lay, tgt = res.trajectories[LAYOUT], res.trajectories[TARGET]
    for s in (1, 2):
        tol = assert_rounding_close(tgt[s - 1], lay[s - 1], _roundings(xl_setup))
    assert_differs_beyond(tgt[-1], lay[-1], tol)


def test_batched_equals_one_call_per_path_and_fast_path(xl_setup):
    batched = _run(xl_setup, skip_equal_target=False)
    sequential = _run(xl_setup, skip_equal_target=False, sequential=True)
    fast = _run(xl_setup)
    # Other batch sizes round differently (seen: 7.7e-6 on an AVX-512 Xeon, 1.5e-5 on an AMD EPYC,
    # values up to 3.4, against a tolerance of ~2.7e-4); another reference moves the result further
    tol = assert_rounding_close(sequential.latents, batched.latents, _roundings(xl_setup))
    assert_rounding_close(fast.latents, batched.latents, _roundings(xl_setup))
    other = _run(xl_setup, skip_equal_target=False, ref=xl_setup[3].flip(-1))
    assert_differs_beyond(other.latents, batched.latents, tol)
    assert batched.masks.shape == (2, 8, 8) and batched.ca_maps.shape == (2, 2, 2)  # latent/4 maps


@pytest.mark.parametrize("m_value", [1.0, 0.0, 0.3])
def test_mask_blend_on_an_sdxl_reference_layer(xl, m_value):
    """M ≡ 1 → the target's own self-attention output; M ≡ 0 → the layout's; else the blend —
    on a depth-2 transformer block's self-attention of the SDXL UNet."""
    from lib_layout_retouch.masks import LayerMasks
    from lib_layout_retouch.retouch.editor import COND, RowPlan, StepState
    from lib_layout_retouch.retouch.layers import LayerTable
    from lib_layout_retouch.unet.attention import RetouchAttention

    _, _, adapter = xl
    name = next(
        n for n in layer_table_for(adapter.unet).reference_layers if ".transformer_blocks.1." in n
    )
    module = attention_modules(adapter.unet)[name]
    width = module.to_q.in_features
    table = LayerTable(
        "t", reference_layers=(), mask_layers=(), blend_layers=(name,), layout_layers=()
    )
    g = torch.Generator().manual_seed(3)
    x_layout, x_target = (
        torch.randn(1, 4, width, generator=g),
        torch.randn(1, 4, width, generator=g),
    )
    with torch.no_grad():
        own_t, own_o = module(x_target), module(x_layout)
    editor = RetouchAttention(table, subject_tokens=[1], latent_hw=(8, 8))
    editor.begin_step(
        StepState(
            RowPlan.build([(LAYOUT, 1), (TARGET, 1)], halves=(COND,)),
            blend=True,
            masks=LayerMasks(torch.full((1, 8, 8), m_value), (8, 8)),
        )
    )
    with torch.no_grad():
        out = editor(name, module, torch.cat([x_layout, x_target]), None, None, None)
    roundings = attention_roundings(module, tokens=4)
    assert_rounding_close(out[0:1], own_o, roundings)
    tol = assert_rounding_close(out[1:2], m_value * own_t + (1 - m_value) * own_o, roundings)
    assert_differs_beyond(own_t, own_o, tol)  # the two rows differ, so the test can fail


def test_layer_presets_give_different_results(xl_setup):
    standard = _run(xl_setup)
    light = _run(xl_setup, layer_preset="light")
    tol = rounding_atol(standard.latents, _roundings(xl_setup))
    assert_differs_beyond(standard.latents, light.latents, tol)


def test_inversion_cached_and_repeat_bit_identical(xl_setup):
    cache = pl.InversionCache(2)
    first = _run(xl_setup, cache=cache, reference_key=("ref", "xl"))
    again = _run(xl_setup, cache=cache, reference_key=("ref", "xl"))
    assert again.reference_cached and torch.equal(first.latents, again.latents)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), Interrupted("stop"), KeyboardInterrupt()])
def test_attention_restored_after_errors_on_the_sdxl_unet(xl, exc):
    _, _, adapter = xl
    before = _forward(adapter)

    def failing(name, module, x, context, mask, original):
        if name.startswith("output_blocks"):
            raise exc
        return original(x, context=context, mask=mask)

    with pytest.raises(type(exc)):
        with patched_attention(adapter.unet, failing):
            _forward(adapter)
    assert all("forward" not in m.__dict__ for m in attention_modules(adapter.unet).values())
    assert torch.equal(_forward(adapter), before)


def test_generate_both_stages_with_a_vanilla_unet(xl, tmp_path_factory):
    kind, _, adapter = xl
    vanilla = TS.build(
        kind, str(tmp_path_factory.mktemp("xl-vanilla")), seed=1
    ).model.diffusion_model
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    settings = pl.RetouchSettings(
        schedule=Schedule.for_steps(T, lambda1=2, lambda2=2, mask_start=3, scale=False)
    )
    out = pl.generate(
        adapter,
        prompts=prompts,
        reference_image=photo_tensor(),
        noise=noise,
        settings=settings,
        vanilla_unet=vanilla,
    )
    same = pl.generate(
        adapter, prompts=prompts, reference_image=photo_tensor(), noise=noise, settings=settings
    )
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()
    # the vanilla UNet drew it: T forwards in sequence
    tol = rounding_atol(same.layout_latents, T * network_roundings(adapter.unet))
    assert_differs_beyond(out.layout_latents, same.layout_latents, tol)


def test_refiner_inpaint_and_vpred_refused_by_name(xl):
    _, model, _ = xl
    model.is_sdxl_inpaint = True
    try:
        with pytest.raises(LayoutRetouchError, match="inpainting"):
            check_model_supported(model)
    finally:
        model.is_sdxl_inpaint = False
    emb = model.conditioner.embedders[-1]
    key = emb.input_key
    emb.input_key = "aesthetic_score"  # what the refiner's conditioner reads
    try:
        with pytest.raises(LayoutRetouchError, match="refiner"):
            check_model_supported(model)
    finally:
        emb.input_key = key
    model.parameterization = "v"
    try:
        with pytest.raises(LayoutRetouchError, match="v-prediction"):
            check_model_supported(model)
    finally:
        model.parameterization = "eps"


def test_several_references_each_with_its_own_size_terms(xl, xl_setup):
    """Several reference photos on SDXL: one reference row per photo, each with its photo's size terms; the same
    photo twice gives the result of once (K/V concatenated with a copy of themselves)."""
    kind, _, adapter = xl
    _, conds1, subject, ref, layouts = xl_setup
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    sizes = [C.SizeTerms((96, 64), (16, 0), (64, 64)), C.SizeTerms((480, 640), (0, 10), (64, 64))]
    conds = pl.encode_prompts(adapter, prompts, "", image_size=(64, 64), reference_size=sizes)
    assert (
        C.batch_size(conds.reference)
        == C.batch_size(conds.reference_uncond)
        == C.batch_size(conds.reference_empty)
        == 2
    )
    assert torch.equal(
        conds.reference["vector"][:1], conds1.reference["vector"]
    )  # photo 1: its own terms
    assert not torch.equal(
        _size_part(conds.reference["vector"][1:], kind),
        _size_part(conds1.reference["vector"], kind),
    )
    assert torch.equal(
        conds.layout["vector"], conds1.layout["vector"]
    )  # the generation's untouched
    twice = pl.encode_prompts(
        adapter,
        prompts,
        "",
        image_size=(64, 64),
        reference_size=[sizes[0], sizes[0]],
    )
    once = _run(xl_setup)
    res = pl.retouch(
        adapter,
        reference_latent=torch.cat([ref, ref]),
        layout_latents=layouts,
        conds=twice,
        subject_tokens=subject,
        settings=pl.RetouchSettings(
            schedule=Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=3, scale=False)
        ),
    )
    tol = assert_rounding_close(res.latents, once.latents, _roundings(xl_setup))
    assert_differs_beyond(_run(xl_setup, ref=ref.flip(-1)).latents, once.latents, tol)
