"""The retouch on a joint-attention DiT (Flux.1), on the tiny Flux of tests/fixtures/flux.py: the model,
the flow sampler and its inversions, the block processors and the retouch loop
(docs/ALGORITHM.md, "DiT (Flux)")."""

import pytest
import torch

from lib_layout_retouch import retouch as pl
from lib_layout_retouch.dit import flow
from lib_layout_retouch.dit.flux.blocks import (
    DiTRetouchAttention,
    dit_blocks,
    double_block,
    merge_heads,
    patched_blocks,
    plain_attention,
    single_block,
)
from lib_layout_retouch.dit.flux.family import FluxFamily
from lib_layout_retouch.dit.flux.layers import dit_layer_table, layer_table_for_dit
from lib_layout_retouch.dit.flux.model import image_ids, pack, piece_positions, token_grid, unpack
from lib_layout_retouch.dit.joint import SHARED, SHIFTED, JointProcessor
from lib_layout_retouch.errors import Interrupted
from lib_layout_retouch.masks import LayerMasks
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.retouch.editor import COND, LAYOUT, TARGET, RowPlan, StepState
from lib_layout_retouch.schedule import Schedule
from tests.fixtures.flux import (
    TinyFlux,
    build_tiny_flux,
    build_tiny_flux_model,
    flux_config_of_state_dict,
    make_tiny_t5_folder,
)
from tests.paths import photo_tensor
from tests.tolerance import (
    SubjectMapGain,
    assert_differs_beyond,
    assert_rounding_close,
    assert_same_mask,
    network_roundings,
)

T = 8
HW = (8, 8)  # latent; 4×4 image tokens


@pytest.fixture(scope="module")
def flux(tmp_path_factory, tiny_clip_dir):
    """(FluxModel, conds, subject T5 positions, reference latent, two layout latents)."""
    t5 = make_tiny_t5_folder(str(tmp_path_factory.mktemp("tiny-t5")))
    model = build_tiny_flux_model(t5, tiny_clip_dir)
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    conds = pl.encode_prompts(model, prompts, "")
    subject = model.subject_tokens(prompts.personalized, ["sks", "dog"])
    ref = model.encode(photo_tensor())
    g = torch.Generator().manual_seed(7)
    layouts = 0.6 * torch.randn(2, 16, *HW, generator=g)
    return model, conds, subject, ref, layouts


def run(flux, **kw):
    """pl.retouch on the tiny Flux; `solver`, `reference_rope`, `with_target_tokens`: the family's."""
    model, conds, subject, ref, layouts = flux
    family = model.family
    model.family = FluxFamily(
        kw.pop("solver", flow.MIDPOINT),
        kw.pop("reference_rope", SHIFTED),
        kw.pop("with_target_tokens", False),
    )
    try:
        return _run(flux, **kw)
    finally:
        model.family = family


def _run(flux, **kw):
    model, conds, subject, ref, layouts = flux
    sched = kw.pop(
        "schedule", Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=5, scale=False)
    )
    fields = pl.RetouchSettings.__dataclass_fields__
    settings = pl.RetouchSettings(
        schedule=sched,
        guidance_scale=kw.pop("guidance_scale", 1.0),
        **{k: kw.pop(k) for k in list(kw) if k in fields},
    )
    return pl.retouch(
        model,
        reference_latent=kw.pop("ref", ref),
        layout_latents=kw.pop("layouts", layouts),
        conds=conds,
        subject_tokens=subject,
        settings=settings,
        **kw,
    )


def _roundings(flux, solver=flow.MIDPOINT) -> int:
    """A retouched latent is the end of 2T steps in sequence (an inversion, then the retouch), each
    `flow.EVALUATIONS[solver]` transformer forwards (other batch compositions round differently)."""
    return 2 * T * flow.EVALUATIONS[solver] * network_roundings(flux[0].transformer)


def another_reference(flux, **kw) -> pl.RetouchResult:
    """The retouch with the reference latent mirrored: what painting another identity moves (a
    change every comparison up to rounding here must be able to see, so that it can fail)."""
    return run(flux, ref=flux[3].flip(-1), **kw)


def call(model, x, sigma=0.7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(x.shape[0], 16, 32, generator=g)
    y = torch.randn(x.shape[0], 32, generator=g)
    with torch.no_grad():
        return model(x, torch.full((x.shape[0],), sigma), ctx, y, torch.full((x.shape[0],), 3.5))


def latent(n=2, seed=0):
    return torch.randn(n, 16, *HW, generator=torch.Generator().manual_seed(seed))


# -- the tiny Flux ------------------------------------------------------------------------------------
def test_tiny_flux_has_bfl_keys_and_loads_from_its_state_dict():
    model, state = build_tiny_flux(seed=0)
    for key in (
        "img_in.weight",
        "time_in.in_layer.weight",
        "vector_in.out_layer.bias",
        "guidance_in.in_layer.weight",
        "txt_in.weight",
        "double_blocks.1.img_mod.lin.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.0.txt_attn.norm.key_norm.scale",
        "double_blocks.0.img_attn.proj.weight",
        "double_blocks.0.img_mlp.0.weight",
        "double_blocks.0.txt_mlp.2.bias",
        "single_blocks.3.linear1.weight",
        "single_blocks.3.linear2.weight",
        "single_blocks.0.norm.query_norm.scale",
        "single_blocks.0.modulation.lin.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert key in state, key
    assert not any(k.startswith("pe_embedder") for k in state)  # RoPE has no weights
    cfg = flux_config_of_state_dict(state)
    assert cfg == dict(
        in_channels=16,
        vec_in_dim=32,
        context_in_dim=32,
        hidden_size=64,
        depth=2,
        depth_single_blocks=4,
        guidance_embed=True,
    )
    assert all(bool(v.any()) for k, v in state.items() if v.dim() > 1)  # no all-zero matrix
    fresh = TinyFlux()
    fresh.load_state_dict(state)
    x = latent()
    assert torch.equal(call(fresh.eval(), x), call(model, x))


def test_attention_matters_in_every_block():
    """Zeroing one block's attention changes the velocity (else attention tests pass vacuously)."""
    model, _ = build_tiny_flux(seed=0)
    x = latent()
    before = call(model, x)
    for name, block in dit_blocks(model).items():
        kind = "double" if name.startswith("double") else "single"

        def no_attention(*args, _b=block, _k=kind, **kwargs):
            zero = lambda q, k, v, pe, n: torch.zeros(q.shape[0], q.shape[2], 64)  # noqa: E731
            if _k == "double":
                return double_block(
                    _b, kwargs["img"], kwargs["txt"], kwargs["vec"], kwargs["pe"], zero
                )
            return single_block(_b, args[0], kwargs["vec"], kwargs["pe"], 16, zero)

        block.forward = no_attention
        try:
            change = (call(model, x) - before).abs().max()
        finally:
            del block.forward
        assert change > 1e-3 * before.abs().max(), name


def test_pack_unpack_and_image_ids():
    x = latent()
    tokens = pack(x)
    assert tokens.shape == (2, 16, 64)
    assert torch.equal(unpack(tokens, HW), x)
    # token k holds the 2×2 patch at grid (k // 4, k % 4), channels (c, ph, pw)
    assert torch.equal(tokens[0, 5].view(16, 2, 2), x[0, :, 2:4, 2:4])
    ids = image_ids((4, 4), col_offset=4)
    assert ids.shape == (1, 16, 3) and ids[0, 5].tolist() == [0.0, 1.0, 5.0]
    assert token_grid((8, 8)) == (4, 4) and token_grid((9, 7)) == (5, 4)


# -- subject tokens -----------------------------------------------------------------------------------
def test_subject_pieces_in_t5_and_tokens_in_clip(flux):
    model = flux[0]
    prompt = "a sks dog on the beach"
    # `sks` is rare for this SentencePiece model: several pieces (`▁s`, `k`, `s`), all subject rows
    sks, dog, ids = model.tokenize_t5("sks"), model.tokenize_t5("dog"), model.tokenize_t5(prompt)
    assert len(sks) > 1 and len(dog) == 1 and ids[1 : 2 + len(sks)] == sks + dog
    assert model.subject_tokens(prompt, ["sks", "dog"]) == list(range(1, 2 + len(sks)))
    assert model.subject_tokens(prompt, ["dog"]) == [1 + len(sks)]
    twice = "a dog and a sks dog"
    ids, dog = model.tokenize_t5(twice), model.tokenize_t5("dog")
    found = model.subject_tokens(twice, ["dog"])  # every occurrence
    assert len(dog) == 1 and len(found) == 2 and found[0] == 1
    assert [ids[i] for i in found] == dog * 2
    assert model.clip_subject_tokens(prompt, ["sks", "dog"]) == [2, 3]  # BOS at row 0
    with pytest.raises(Exception, match="class phrase|class_phrase|subject words"):
        piece_positions(model.tokenize_t5, prompt, ["cat"])


# -- flow sampler -----------------------------------------------------------------------------------
def test_flux_schedule_shift():
    assert flow.flux_mu(256) == pytest.approx(0.5) and flow.flux_mu(4096) == pytest.approx(1.15)
    plain = flow.FlowSchedule.flux(4)
    assert plain.sigmas.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    shifted = flow.FlowSchedule.for_image(4, (128, 128))  # 1024² → 4096 tokens → μ = 1.15
    e = torch.exp(torch.tensor(1.15, dtype=torch.float64))
    expected = e / (e + (1 / torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64) - 1))
    assert torch.allclose(shifted.sigmas[1:-1], expected, rtol=1e-12)
    assert shifted.sigmas[0] == 0 and shifted.sigmas[-1] == 1
    assert shifted.step_sigmas(1) == (1.0, float(shifted.sigmas[3]))
    host = flow.FlowSchedule.from_sigmas([1.0, 0.6, 0.2, 0.0])  # a host sampler's descending list
    assert host.sigmas.tolist() == [0.0, 0.2, 0.6, 1.0] and host.steps == 3
    with pytest.raises(ValueError):
        flow.FlowSchedule.from_sigmas([1.0, 0.5, 0.5, 0.0])


def test_second_order_inversion_reconstructs_better_than_euler(flux):
    """Invert then sample with the same solver; the relative error of each is printed (and recorded in
    docs/ALGORITHM.md). The midpoint (RF-Solver-2) error is below Euler's at the same steps AND at the
    same number of transformer calls (midpoint at T/2)."""
    model, _, _, ref, _ = flux
    empty = model.conditioning([""])

    def velocity(x, sigma):
        return model.velocity(
            x, sigma, {k: v.expand(x.shape[0], *v.shape[1:]) for k, v in empty.items()}
        )

    sched = model.schedule(T, HW)
    euler = flow.reconstruction_error(velocity, ref, sched, flow.EULER)
    midpoint = flow.reconstruction_error(velocity, ref, sched, flow.MIDPOINT)
    same_calls = flow.reconstruction_error(velocity, ref, model.schedule(T // 2, HW), flow.MIDPOINT)
    print(
        f"\ninversion error at T={T}: euler {euler:.2e}, midpoint {midpoint:.2e}, midpoint T/2 {same_calls:.2e}"
    )
    assert 0 < midpoint < euler / 4
    assert same_calls < euler / 2
    # and Euler's shrinks with T (first order)
    assert (
        flow.reconstruction_error(velocity, ref, model.schedule(2 * T, HW), flow.EULER)
        < euler * 0.75
    )


# -- processors -------------------------------------------------------------------------------------
class Reimplementing:
    """Runs every block through the library's re-implementation with plain attention."""

    def __init__(self):
        self.calls = []

    def __call__(self, name, block, args, kwargs, original):
        self.calls.append(name)
        if name.startswith("double"):
            return double_block(
                block, kwargs["img"], kwargs["txt"], kwargs["vec"], kwargs["pe"], plain_attention
            )
        return single_block(block, args[0], kwargs["vec"], kwargs["pe"], 16, plain_attention)


def test_block_processors_compute_the_blocks_and_are_restored():
    model, _ = build_tiny_flux(seed=0)
    x = latent()
    before = call(model, x)
    editor = Reimplementing()
    with patched_blocks(model, editor):
        during = call(model, x)
        assert all("forward" in b.__dict__ for b in dit_blocks(model).values())
    assert editor.calls == list(dit_blocks(model))  # every block, in execution order
    # the same math in another order of float operations: relative to the output's size
    assert (during - before).abs().max() <= 1e-5 * before.abs().max()
    assert all("forward" not in b.__dict__ for b in dit_blocks(model).values())
    assert torch.equal(call(model, x), before)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), Interrupted("stop"), KeyboardInterrupt()])
def test_restored_after_exception_and_interrupt(exc):
    model, _ = build_tiny_flux(seed=0)
    x = latent()
    before = call(model, x)
    own = model.single_blocks[1].forward  # a foreign per-instance hook is given back as it was
    model.single_blocks[1].forward = own

    def failing(name, block, args, kwargs, original):
        if name == "single_blocks.2":
            raise exc
        return original(*args, **kwargs)

    with pytest.raises(type(exc)):
        with patched_blocks(model, failing):
            call(model, x)
    assert model.single_blocks[1].__dict__["forward"] is own
    assert all(
        "forward" not in b.__dict__ for n, b in dit_blocks(model).items() if n != "single_blocks.1"
    )
    assert torch.equal(call(model, x), before)


def test_layer_tables():
    full = dit_layer_table(19, 38)
    assert full.name == "flux"
    assert full.reference_layers == (
        "double_blocks.0",
        "double_blocks.1",
        "double_blocks.17",
        "double_blocks.18",
        "single_blocks.6",
        "single_blocks.9",
        "single_blocks.34",
        "single_blocks.35",
        "single_blocks.37",
    )
    light = dit_layer_table(19, 38, "light")
    assert set(light.reference_layers) < set(full.reference_layers)
    assert full.mask_layers == tuple(f"double_blocks.{i}" for i in range(19))
    tiny = layer_table_for_dit(build_tiny_flux()[0])
    assert tiny.name == "flux-inferred" and tiny.blend_layers == tiny.reference_layers
    names = set(dit_blocks(build_tiny_flux()[0]))
    assert set(tiny.reference_layers) <= names and set(tiny.mask_layers) <= names
    with pytest.raises(ValueError):
        dit_layer_table(19, 38, "heavy")


def _one_call(model, editor, x, conds, masks=None, **flags):
    """One transformer call over [layout, target] rows (cond half only) with the given step flags;
    returns the velocity and what every block's joint attention returned."""
    plan = RowPlan.build([(LAYOUT, 1), (TARGET, 1)], halves=(COND,))
    seen = {}
    real = JointProcessor.joint

    def spy(self, *a):
        out = real(self, *a)  # (B, H, L, D)
        seen[self.name] = merge_heads(out).clone()  # (B, L, H·D): tokens on axis 1
        return out

    real_at = (
        JointProcessor.at_layer
    )  # every block runs through `joint` (and is seen), acting or not
    editor.begin_step(StepState(plan, masks=masks, **flags))
    JointProcessor.joint, JointProcessor.at_layer = (
        spy,
        lambda self, st: real_at(self, st)._replace(acts=True),
    )
    try:
        with patched_blocks(model.transformer, editor), torch.no_grad():
            v = model.velocity(x, 0.6, conds)
    finally:
        JointProcessor.joint, JointProcessor.at_layer = real, real_at
    return v, seen


def test_mask_one_gives_target_zero_gives_layout_exactly_at_a_block(flux):
    model, conds, subject, _, _ = flux
    from lib_layout_retouch import conditioning as C

    cond = C.cat([conds.layout, conds.target])
    x = latent(2, seed=3)
    table = layer_table_for_dit(model.transformer)
    block = table.blend_layers[-1]
    outs = {}
    for m in (None, 1.0, 0.0):
        editor = DiTRetouchAttention(table, subject, HW, rope_of=model.transformer.pe_embedder)
        masks = None if m is None else LayerMasks(torch.full((1, *HW), m), HW)
        # the first blend block sees identical inputs in all three runs (earlier blocks do not blend)
        outs[m] = _one_call(model, editor, x, cond, masks=masks, blend=m is not None)[1]
    first = table.blend_layers[0]
    n_txt = cond["crossattn"].shape[1]
    assert torch.equal(outs[1.0][first], outs[None][first])  # M ≡ 1: the target's own output
    blended, plain = outs[0.0][first], outs[None][first]
    assert torch.equal(blended[1, n_txt:], plain[0, n_txt:])  # M ≡ 0: the layout's image tokens
    assert torch.equal(blended[1, :n_txt], plain[1, :n_txt])  # text tokens are never blended
    assert not torch.equal(plain[1, n_txt:], plain[0, n_txt:])  # (they differ without the blend)
    assert block in outs[0.0]


def test_copy_phase_makes_the_target_rows_the_layout_rows_in_one_call(flux):
    model, conds, subject, _, _ = flux
    from lib_layout_retouch import conditioning as C

    cond = C.cat([conds.layout, conds.target])  # different T5 tokens, the same pooled vector
    x = latent(1, seed=4).expand(2, -1, -1, -1)
    table = layer_table_for_dit(model.transformer)
    editor = DiTRetouchAttention(table, subject, HW, rope_of=model.transformer.pe_embedder)
    v, _ = _one_call(model, editor, x, cond, copy_layout=True)
    # equal rows of one batch; a blocked GEMM may round edge rows differently
    tol = assert_rounding_close(v[1], v[0], network_roundings(model.transformer))
    v_free, _ = _one_call(model, editor, x, cond)
    assert_differs_beyond(v_free[1], v_free[0], tol)


def test_reference_positions_shared_or_shifted(flux):
    model, conds, subject, ref, layouts = flux
    a = run(flux, reference_rope=SHARED)
    b = run(flux, reference_rope=SHIFTED)
    assert not torch.allclose(a.latents, b.latents, atol=1e-5)
    c = run(flux, with_target_tokens=True)
    assert not torch.allclose(b.latents, c.latents, atol=1e-5)


# -- the retouch loop ------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", [flow.EULER, flow.MIDPOINT])
def test_copy_phase_target_equals_layout_then_differs(flux, solver):
    res = run(flux, skip_equal_target=False, keep_trajectories=True, solver=solver)
    lay, tgt = res.trajectories[LAYOUT], res.trajectories[TARGET]
    for s in (1, 2):  # s ≤ λ2 (equal rows of one batch: rounding of edge rows aside)
        tol = assert_rounding_close(tgt[s - 1], lay[s - 1], _roundings(flux, solver))
    assert_differs_beyond(tgt[-1], lay[-1], tol)  # then the reference identity is painted
    assert (
        res.masks is not None and res.masks.shape == (2, *HW) and res.mask_kind == pl.MASK_CA_ONLY
    )
    assert res.ca_maps.shape == (2, 4, 4)
    calls_per_step = flow.EVALUATIONS[solver]
    # 2 inversions of T steps, then T steps; every evaluation is ONE call carrying all paths
    assert res.unet_calls == 3 * T * calls_per_step


def test_fast_path_equals_the_computed_target(flux):
    fast = run(flux, keep_trajectories=True)
    slow = run(flux, skip_equal_target=False, keep_trajectories=True)
    # the fast path's calls have no target rows while the layout is copied: another GEMM blocking
    tol = assert_rounding_close(fast.latents, slow.latents, _roundings(flux))
    assert_differs_beyond(another_reference(flux).latents, slow.latents, tol)
    assert fast.unet_rows < slow.unet_rows


def test_batched_equals_one_call_per_path(flux):
    with SubjectMapGain() as gain:
        batched = run(flux)
        sequential = run(flux, sequential=True)
    assert sequential.unet_calls > batched.unet_calls
    # one call per path: other batch sizes, other roundings (and SDPA may sum in another order)
    tol = assert_rounding_close(sequential.latents, batched.latents, _roundings(flux))
    assert_differs_beyond(another_reference(flux).latents, batched.latents, tol)
    assert_same_mask(sequential, batched, _roundings(flux), gain.value)


def test_real_cfg_runs_both_halves(flux):
    one = run(flux)
    two = run(flux, guidance_scale=2.0)
    assert two.unet_rows > one.unet_rows
    assert not torch.allclose(one.latents, two.latents, atol=1e-4)


def test_cached_inversion_is_bit_identical(flux):
    cache = pl.InversionCache()
    first = run(flux, cache=cache, reference_key=("dog", "tiny-flux"))
    second = run(flux, cache=cache, reference_key=("dog", "tiny-flux"))
    assert not first.reference_cached and second.reference_cached
    assert second.unet_calls == first.unet_calls - T * flow.EVALUATIONS[flow.MIDPOINT]
    assert torch.equal(first.latents, second.latents)


def test_interrupt_during_the_retouch_restores_every_block(flux):
    model = flux[0]
    x = latent()
    before = call(model.transformer, x)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2 * T * 2 + 3  # past both (midpoint) inversions: in the retouch loop

    with pytest.raises(Interrupted):
        run(flux, should_stop=stop)
    assert all("forward" not in b.__dict__ for b in dit_blocks(model.transformer).values())
    assert torch.equal(call(model.transformer, x), before)


def test_reference_kv_cache_hit_runs_no_reference_rows_and_agrees_up_to_rounding(flux):
    """The loop's reference K/V cache (one call per step: the Euler solver) serves the DiT too."""
    kv = pl.ReferenceAttentionCache(max_bytes=1 << 30)
    cache = pl.InversionCache()
    first = run(flux, solver=flow.EULER, cache=cache, kv_cache=kv, reference_key=("dog",))
    second = run(flux, solver=flow.EULER, cache=cache, kv_cache=kv, reference_key=("dog",))
    assert len(kv) == 1 and second.unet_rows < first.unet_rows
    # the hit runs its calls with fewer rows (no reference rows): another GEMM blocking, so the
    # latents agree up to fp32 rounding over the chain of 2T transformer forwards, not bit for bit
    tol = assert_rounding_close(second.latents, first.latents, _roundings(flux, flow.EULER))
    flipped = another_reference(flux, solver=flow.EULER)  # another reference's K/V
    assert_differs_beyond(flipped.latents, first.latents, tol)
    # the midpoint solver calls twice per step: no per-step cache, same result as without one
    mid = run(flux, cache=cache, kv_cache=kv, reference_key=("dog",))
    assert torch.equal(mid.latents, run(flux, cache=cache, reference_key=("dog",)).latents)


def test_two_references_and_an_inpaint_mask(flux):
    model, conds, subject, ref, layouts = flux
    two = run(flux, ref=torch.cat([ref, ref.flip(-1)]))
    one = run(flux)
    assert two.latents.shape == one.latents.shape
    assert not torch.allclose(two.latents, one.latents, atol=1e-5)
    u = torch.zeros(1, 1, *HW)
    u[..., :, 4:] = 1
    res = run(flux, user_mask=u)
    assert torch.equal(res.latents[..., :4], layouts[..., :4])  # the input's latents outside U
    assert not torch.allclose(res.latents[..., 4:], layouts[..., 4:], atol=1e-3)


def test_generate_runs_stage1_with_the_vanilla_model_for_lambda1_steps(flux):
    """Both stages on the tiny Flux: stage 1 through the flow sampler, the vanilla model (the host's
    `vanilla()` context: LoRA off) for exactly the first λ1 steps, then the retouch."""
    import contextlib

    model = flux[0]
    inside = {"vanilla": False, "calls": []}

    @contextlib.contextmanager
    def vanilla():
        inside["vanilla"] = True
        try:
            yield
        finally:
            inside["vanilla"] = False

    real = model.velocity

    def spy(x, sigma, cond):
        inside["calls"].append((round(float(sigma), 6), inside["vanilla"]))
        return real(x, sigma, cond)

    own_vanilla = model.vanilla
    model.vanilla, model.velocity = vanilla, spy
    try:
        out = pl.generate(
            model,
            prompts=derive_prompts("a sks dog on the beach", "sks", "dog"),
            reference_image=photo_tensor(),
            noise=latent(1, seed=9),
            settings=pl.RetouchSettings(
                schedule=Schedule.for_steps(T, lambda1=2, lambda2=2, mask_start=5, scale=False),
                guidance_scale=1.0,
            ),
        )
    finally:
        model.vanilla = own_vanilla
        del model.velocity
    stage1 = inside["calls"][: 2 * T]  # midpoint: two calls per step
    assert [v for _, v in stage1] == [True] * 4 + [False] * (2 * T - 4)  # λ1 = 2 steps
    assert not any(v for _, v in inside["calls"][2 * T :])
    assert out.images.shape == (1, 3, 64, 64) and out.layout_images.shape == (1, 3, 64, 64)
    assert not torch.allclose(out.retouch.latents, out.layout_latents, atol=1e-3)


def test_shifted_reference_positions_weaken_the_same_cell_tie_at_flux_geometry():
    """The premise of `reference_rope = shifted` (docs/ALGORITHM.md): in a purely positional head
    (every query and key one RMS-normed vector, RoPE alone steers) at Flux.1's geometry — head dim
    128, axes 16/56/56, 64×64 tokens — a target query's attention to the reference token at its own
    cell is far weaker when the reference sits beside the target than on the same grid."""
    from lib_layout_retouch.dit.flux.blocks import apply_rope
    from tests.fixtures.flux import EmbedND

    grid, axes = (64, 64), (16, 56, 56)
    embed = EmbedND(128, 10_000, axes)
    u = torch.randn(128, generator=torch.Generator().manual_seed(0))
    x = (u / u.pow(2).mean().sqrt()).expand(1, 1, 64 * 64, 128)
    q = apply_rope(x, embed(image_ids(grid)))
    same_cell = {}
    for mode, offset in ((SHARED, 0), (SHIFTED, 64)):
        k = apply_rope(x, embed(image_ids(grid, col_offset=offset)))
        p = (q @ k.transpose(-1, -2) * 128**-0.5).softmax(-1)[0, 0]
        same_cell[mode] = p.diagonal().mean().item()
    uniform = 1 / (64 * 64)
    assert same_cell[SHARED] > 10 * uniform  # shared positions: a strong same-place prior
    assert same_cell[SHIFTED] < same_cell[SHARED] / 3
