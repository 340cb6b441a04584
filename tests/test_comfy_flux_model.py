"""lib_layout_retouch.adapters.comfy.flux and the nodes' Flux path (layout_retouch_comfy.run) against
stand-ins written the way ComfyUI v0.3.64 writes its Flux objects (`comfy/model_base.py` Flux and
BaseModel._apply_model, `comfy/model_sampling.py` CONST + ModelSamplingFlux, `comfy/samplers.py`
simple_scheduler, `comfy/sd1_clip.py` SDTokenizer's word-by-word T5 tokens, `comfy/text_encoders/
flux.py` FluxClipModel, `comfy/latent_formats.py` Flux) around the tests' tiny Flux and a tiny
SentencePiece T5: the velocity is what the denoised implies, the σ list is ComfyUI's scheduler's,
the conditioning and subject rows are what CLIPTextEncode gives, unsupported and mixed models are
refused by name, and the retouch through the nodes' path keeps its invariants. The real ComfyUI is
tests/host/comfy/smoke_inprocess_flux.py's."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from layout_retouch_comfy import run
from lib_layout_retouch import retouch as pl
from lib_layout_retouch.adapters.comfy.flux import COMFY_FLUX, check_blocks_free, comfy_flux_model
from lib_layout_retouch.adapters.comfy.sd import check_same_architecture, check_supported
from lib_layout_retouch.dit import flow
from lib_layout_retouch.dit.flux.blocks import dit_blocks
from lib_layout_retouch.dit.flux.model import FluxModel
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.retouch.editor import LAYOUT, TARGET
from lib_layout_retouch.schedule import Schedule
from tests.fixtures.flux import TinyFluxVAE, build_tiny_flux, make_tiny_t5_folder
from tests.paths import photo_tensor
from tests.test_comfy_model import BaseModel, comfy_of
from tests.test_comfy_model import ModelPatcher as SDModelPatcher
from tests.tolerance import assert_differs_beyond, assert_rounding_close, network_roundings

T = 6
HW = (8, 8)
SHIFT, SCALE = 0.1159, 0.3611  # comfy/latent_formats.py Flux
T5_MIN = 16  # ComfyUI pads T5 tokens to 256; the tiny T5 to 16 (the adapter reads no length)


# -- ComfyUI-shaped stand-ins -----------------------------------------------------------------------
class CONST:
    def calculate_input(self, sigma, noise):
        return noise

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(-1, *([1] * (model_output.ndim - 1)))

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


class ModelSamplingFlux(torch.nn.Module):
    """A table of 10000 σ = exp(μ)/(exp(μ) + 1/t − 1); timestep(σ) = σ."""

    def __init__(self, shift=1.15):
        super().__init__()
        t = torch.arange(1, 10001, 1) / 10000
        self.register_buffer("sigmas", math.exp(shift) / (math.exp(shift) + (1 / t - 1)))

    def timestep(self, sigma):
        return sigma


class ModelSampling(ModelSamplingFlux, CONST):  # model_base.model_sampling's class
    pass


class EPS:
    pass


def config(name, **unet):
    c = type(name, (), {})()
    c.unet_config = {
        "image_model": "flux",
        "in_channels": 16,
        "hidden_size": 64,
        "depth": 2,
        "depth_single_blocks": 4,
        "context_in_dim": 32,
        "guidance_embed": True,
        **unet,
    }
    return c


class Flux(BaseModel):
    """`comfy.model_base.Flux` as far as the adapter reads it: BaseModel's `_apply_model` (with the
    flow's sampling object: x unscaled in, timestep(σ), extra conds to the network, denoised =
    x − out·σ out) and Flux's latent format."""

    def __init__(self, transformer, name="Flux", **unet):
        torch.nn.Module.__init__(self)
        self.diffusion_model = transformer
        self.model_sampling = ModelSampling()
        self.model_config = config(name, **unet)
        self.seen_options = []
        self.manual_cast_dtype = None

    def get_dtype(self):
        return torch.float32

    def process_latent_in(self, latent):
        return (latent - SHIFT) * SCALE

    def process_latent_out(self, latent):
        return latent / SCALE + SHIFT


class ModelPatcher(SDModelPatcher):
    """ComfyUI's ModelPatcher with object patches (a ModelSamplingFlux node sets one)."""

    def __init__(self, model, model_options=None):
        super().__init__(model, model_options)
        self.object_patches = {}

    def get_model_object(self, name):
        return self.object_patches.get(name) or getattr(self.model, name)

    def clone(self):
        n = super().clone()
        n.object_patches = dict(self.object_patches)
        return n


class Clip:
    """ComfyUI's Flux CLIP: tokenize → {"l": CLIP chunks, "t5xxl": [[(piece, 1.0), …, (EOS 1, 1.0),
    (pad 0, 1.0) …]]} with T5 tokenized word by word (sd1_clip.SDTokenizer); encode_from_tokens →
    (T5 states of every token, EOS and padding included (no attention mask, as FluxClipModel),
    pooled CLIP-L)."""

    def __init__(self, t5_folder, clip_folder):
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        self.t5_tok = T5Tokenizer.from_pretrained(t5_folder, legacy=True)
        self.t5 = T5EncoderModel.from_pretrained(t5_folder).eval()
        self.clip_tok = CLIPTokenizer.from_pretrained(clip_folder)
        self.clip = CLIPTextModel.from_pretrained(clip_folder).eval()
        self.encoded = []

    def tokenize(self, text):
        pieces = [p for w in text.split(" ") if w for p in self.t5_tok(w).input_ids[:-1]]
        t5 = [(p, 1.0) for p in pieces] + [(1, 1.0)]
        t5 += [(0, 1.0)] * (T5_MIN - len(t5))
        words = [p for w in text.split(" ") if w for p in self.clip_tok(w).input_ids[1:-1]]
        bos, eos = self.clip_tok.bos_token_id, self.clip_tok.eos_token_id
        clip = [(bos, 1.0)] + [(p, 1.0) for p in words][:75] + [(eos, 1.0)] * 76
        return {"l": [clip[:77]], "t5xxl": [t5]}

    @torch.no_grad()
    def encode_from_tokens(self, tokens, return_pooled=False):
        self.encoded.append(tokens)
        ids = torch.tensor([[t for t, _ in tokens["t5xxl"][0]]])
        states = self.t5(input_ids=ids).last_hidden_state
        clip_ids = torch.tensor([[t for t, _ in tokens["l"][0]]])
        pooled = self.clip(input_ids=clip_ids).pooler_output
        return (states, pooled) if return_pooled else states


class Vae:
    """ComfyUI's VAE object: encode((B, H, W, 3) in [0, 1]) → raw latents; decode the reverse."""

    def __init__(self):
        self.impl = TinyFluxVAE()

    def encode(self, pixels):
        return self.impl.encode(pixels.movedim(-1, 1) * 2 - 1) / SCALE + SHIFT

    def decode(self, raw):
        return (self.impl.decode((raw - SHIFT) * SCALE).movedim(1, -1) + 1) / 2


def simple_scheduler(model_sampling, steps):
    """comfy/samplers.py simple_scheduler, written out."""
    s = model_sampling.sigmas
    ss = len(s) / steps
    return torch.FloatTensor([float(s[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


class Calls:
    """The ComfyUI calls the Retouch path makes (no sampler: the layout is given)."""

    def __init__(self):
        self.loads, self.sigma_requests = [], []
        self.stop_after = None
        self.polls = 0

    def load(self, patcher):
        self.loads.append(patcher)

    def sigmas(self, model, steps, sampler_name, scheduler, denoise):
        self.sigma_requests.append((sampler_name, scheduler, denoise))
        assert scheduler == "simple"
        return simple_scheduler(model.get_model_object("model_sampling"), steps)

    def interrupted(self):
        self.polls += 1
        return self.stop_after is not None and self.polls > self.stop_after

    def interrupt_exception(self):
        return KeyboardInterrupt("interrupted")

    def progress_bar(self, total):
        return SimpleNamespace(update_absolute=lambda *a: None)

    def previewer(self, model):
        return None


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_clip_dir):
    t5 = make_tiny_t5_folder(str(tmp_path_factory.mktemp("tiny-t5")))
    transformer = build_tiny_flux(3)[0].eval()
    patcher = ModelPatcher(Flux(transformer))
    clip, vae = Clip(t5, tiny_clip_dir), Vae()
    loads = []
    model = comfy_flux_model(patcher, clip, vae, load_model=loads.append, guidance=4.0)
    return SimpleNamespace(
        patcher=patcher, clip=clip, vae=vae, model=model, loads=loads, transformer=transformer
    )


def layout_latents(n=1, seed=7):
    return 0.6 * torch.randn(n, 16, *HW, generator=torch.Generator().manual_seed(seed))


# -- the model --------------------------------------------------------------------------------------
@torch.no_grad()
def test_velocity_is_what_the_denoised_implies_and_is_defined_at_sigma_zero(comfy):
    model, patcher = comfy.model, comfy.patcher
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, *HW, generator=g)
    cond = model.conditioning(["a sks dog", "a dog"])
    assert cond["guidance"].tolist() == [4.0, 4.0]
    seen = []
    hook = comfy.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    comfy.loads.clear()
    try:
        for s in (0.9, 0.3):
            sigma = torch.full((2,), s)
            v = model.velocity(x, sigma, cond)
            denoised = patcher.model.apply_model(
                x,
                sigma,
                c_crossattn=cond["crossattn"],
                y=cond["vector"],
                guidance=cond["guidance"],
                transformer_options={},
            )
            implied = (x - denoised) / s
            # (x − (x − v·σ))/σ rounds by ~eps·|x|/σ
            gain = float(x.abs().max() / v.abs().max()) / s
            tol = assert_rounding_close(implied, v, roundings=2, gain=gain)
            assert_differs_beyond(implied, v * (1 - s), tol)  # a mis-scaled velocity would show
        v0 = model.velocity(x, torch.zeros(2), cond)  # where the inversion starts
        assert torch.isfinite(v0).all() and v0.abs().max() > 0
    finally:
        hook.remove()
    assert comfy.loads and all(p is patcher for p in comfy.loads), "loaded before each call"
    options = [k["transformer_options"] for k in seen[::2]]  # ours (apply_model's in between)
    assert all("sigmas" in o for o in options), "ComfyUI's transformer options, with σ"
    assert options[0] is not options[1], "a fresh options dict per call"


def test_sigmas_are_comfys_simple_scheduler_on_the_patched_sampling_object(comfy):
    model, patcher = comfy.model, comfy.patcher
    got = [float(s) for s in model.schedule(T, HW).sigmas]
    want = simple_scheduler(patcher.model.model_sampling, T).tolist()
    assert got[::-1] == want  # FlowSchedule holds them ascending, the same float32 values
    shifted = patcher.clone()  # the ModelSamplingFlux node: another shift, as an object patch
    shifted.object_patches["model_sampling"] = ModelSampling(shift=0.5)
    m = comfy_flux_model(shifted, comfy.clip, comfy.vae)
    got = [float(s) for s in m.schedule(T, HW).sigmas][::-1]
    assert got == simple_scheduler(shifted.object_patches["model_sampling"], T).tolist()
    assert got != want


def test_the_nodes_retouch_uses_the_samplers_sigma_list(comfy):
    calls = Calls()
    m = run.library_model(calls, comfy.patcher, comfy.clip, comfy.vae, "simple", 2.5)
    assert isinstance(m, FluxModel) and m.guidance == 2.5
    got = [float(s) for s in m.schedule(T, HW).sigmas][::-1]
    assert got == simple_scheduler(comfy.patcher.model.model_sampling, T).tolist()
    assert calls.sigma_requests == [("euler", "simple", 1.0)]


@torch.no_grad()
def test_conditioning_is_what_clip_text_encode_gives(comfy):
    model, clip = comfy.model, comfy.clip
    cond = model.conditioning(["a sks dog on the beach", ""])
    states, pooled = clip.encode_from_tokens(clip.tokenize("a sks dog on the beach"), True)
    assert torch.equal(cond["crossattn"][:1], states) and torch.equal(cond["vector"][:1], pooled)
    empty = clip.encode_from_tokens(clip.tokenize(""), True)[0]
    assert torch.equal(cond["crossattn"][1:], empty), "ComfyUI encodes an empty prompt too"
    # y_r's T5 tokens with y_p's pooled vector on the target path (flux_model.retouch_conds)
    conds = model.retouch_conds(derive_prompts("a sks dog", "sks", "dog"), "")
    assert torch.equal(conds.target["vector"], conds.layout["vector"])
    assert torch.equal(conds.target["crossattn"], conds.reference["crossattn"])


def test_subject_rows_are_the_t5_pieces_of_the_phrases(comfy):
    model, clip = comfy.model, comfy.clip
    prompt = "a photo of sks dog on the beach"
    rows = model.subject_tokens(prompt, ["sks", "dog"])
    pieces = [t for t, _ in clip.tokenize(prompt)["t5xxl"][0]]
    sks = clip.t5_tok("sks").input_ids[:-1]
    dog = clip.t5_tok("dog").input_ids[:-1]
    assert len(sks) > 1, "the tiny T5 splits the rare word into several pieces"
    assert sorted(pieces[r] for r in rows) == sorted(sks + dog)
    i = next(i for i in range(len(pieces)) if pieces[i : i + len(sks)] == sks)
    assert rows[: len(sks)] == list(range(i, i + len(sks))), "row i is T5 token i (no BOS)"
    with pytest.raises(LayoutRetouchError, match="appears in the prompt"):
        model.subject_tokens("a photo of a cat", ["sks", "dog"])
    bare = SimpleNamespace(tokenize=lambda text: {"l": clip.tokenize(text)["l"]})
    with pytest.raises(LayoutRetouchError, match="t5xxl") as e:
        comfy_flux_model(comfy.patcher, bare, comfy.vae).subject_tokens("a sks dog", ["sks"])
    assert e.value.parameter == "clip"


def test_vae_is_the_latent_sockets_scale(comfy):
    model, vae = comfy.model, comfy.vae
    img = photo_tensor()
    z = model.encode(img)
    assert z.shape == (1, 16, img.shape[-2] // 8, img.shape[-1] // 8)
    raw = vae.encode(((img + 1) / 2).movedim(1, -1))
    assert torch.equal(z, (raw - SHIFT) * SCALE)
    assert torch.allclose(model.model_latents(model.raw_latents(z)), z, atol=1e-6)


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, words",
    [("Chroma", "Chroma"), ("SD3", "SD3"), ("HunyuanDiT", "HunyuanDiT"), ("FluxInpaint", "Fill")],
)
def test_other_dits_are_refused_naming_the_kind_and_the_fix(comfy, name, words):
    p = ModelPatcher(Flux(comfy.transformer, name=name))
    with pytest.raises(LayoutRetouchError) as e:
        check_supported(p, "model")
    msg = str(e.value)
    assert words in msg and "connect an SD1.x, SDXL or Flux.1 model to 'model'" in msg
    check_supported(comfy.patcher)
    check_supported(ModelPatcher(Flux(comfy.transformer, name="FluxSchnell", guidance_embed=False)))


def test_flux_sampled_as_eps_is_refused(comfy):
    p = comfy.patcher.clone()

    class Discrete(ModelSamplingFlux, EPS):
        pass

    p.object_patches["model_sampling"] = Discrete()
    with pytest.raises(LayoutRetouchError, match="EPS.*'model'"):
        check_supported(p, "model")


def test_mixed_families_are_refused_by_name(comfy, tiny_ldm):
    sd = comfy_of(tiny_ldm)
    with pytest.raises(LayoutRetouchError) as e:
        check_same_architecture(comfy.patcher, sd, "vanilla_model")
    assert "'vanilla_model' is SD1.x but 'model' is Flux" in str(e.value)
    assert "another model family" in str(e.value)
    with pytest.raises(LayoutRetouchError, match="'vanilla_model' is Flux but 'model' is SD1.x"):
        check_same_architecture(sd, comfy.patcher, "vanilla_model")
    schnell = ModelPatcher(Flux(comfy.transformer, name="FluxSchnell", guidance_embed=False))
    with pytest.raises(LayoutRetouchError, match="another network"):
        check_same_architecture(comfy.patcher, schnell, "vanilla_model")
    check_same_architecture(comfy.patcher, comfy.patcher.clone())


def test_a_dit_block_replacement_is_refused_naming_it(comfy):
    p = comfy.patcher.clone()
    p.model_options["transformer_options"]["patches_replace"] = {
        "dit": {("double_block", 0): lambda args, extra: extra["original_block"](args)}
    }
    with pytest.raises(LayoutRetouchError, match="double_block 0"):
        check_blocks_free(p, "model")
    with pytest.raises(LayoutRetouchError, match="double_block 0"):
        run.check_models(p, None)


def test_layout_source_stage1_is_refused_on_flux(comfy):
    with pytest.raises(LayoutRetouchError, match="layout source 'stage1'") as e:
        retouch(comfy, layout_source="stage1", layout=None)
    assert e.value.parameter == "layout_source"


def test_a_scheduler_the_flow_cannot_step_is_refused(comfy):
    calls = Calls()
    calls.sigmas = lambda *a: torch.tensor([1.0, 0.5, 0.5, 0.0])
    m = run.library_model(calls, comfy.patcher, comfy.clip, comfy.vae, "weird", 3.5)
    with pytest.raises(LayoutRetouchError, match="scheduler 'weird'") as e:
        COMFY_FLUX.check_schedule(m, 3, HW, "weird")
    assert e.value.parameter == "scheduler"


# -- stage 1's split ----------------------------------------------------------------------------
@pytest.mark.parametrize("empty", [False, True])
def test_the_second_stage1_pass_continues_the_first_on_the_flow(comfy, empty):
    """ComfyUI starts a pass at noise_scaling(σ, noise, latent) = σ·noise + (1−σ)·latent and returns
    inverse_noise_scaling(σ_last, x) = x/(1−σ_last): the continuation noise lands on the state. An
    all-zero LATENT is not shifted into the model's scale (CFGGuider.inner_sample), so its latent
    is 0 there, not process_latent_in(0) (Flux's shift factor)."""
    base, ms = comfy.patcher.model, CONST()
    g = torch.Generator().manual_seed(4)
    latent_raw = torch.zeros(1, 16, *HW) if empty else torch.randn(1, 16, *HW, generator=g)
    latent = latent_raw if empty else base.process_latent_in(latent_raw)
    state = torch.randn(1, 16, *HW, generator=g)  # the first pass's x at σ_λ1
    sigma = 0.62
    x1_raw = base.process_latent_out(ms.inverse_noise_scaling(sigma, state))
    noise2 = run.continuation_noise(comfy.patcher, x1_raw, latent_raw, sigma)
    start = ms.noise_scaling(sigma, noise2, latent)
    tol = assert_rounding_close(start, state, roundings=8, gain=1 / sigma)
    assert_differs_beyond(start, state * (1 - sigma), tol)
    shifted = ms.noise_scaling(sigma, noise2, base.process_latent_in(latent_raw))
    assert empty == bool((shifted - state).abs().max() > tol), "the empty latent's own case"


def test_stage1_conditioning_carries_the_distilled_guidance(comfy):
    calls = SimpleNamespace(encode=lambda clip, text: [["states", {"pooled_output": "p"}]])
    encode = run.encoder(calls, comfy.patcher, 2.0)
    assert encode(None, "a dog") == [["states", {"pooled_output": "p", "guidance": 2.0}]]
    sd = SimpleNamespace(model=SimpleNamespace())
    assert run.encoder(calls, sd, 2.0) is calls.encode


# -- the retouch through the nodes' path ----------------------------------------------------------
def retouch(comfy, calls=None, **kw):
    """The Retouch node's call (run.layout_and_retouch with a layout) on the tiny Comfy Flux."""
    values = dict(
        concept_token="sks",
        class_phrase="dog",
        lambda2=2,
        mask_start=4,
        scale_with_steps=False,
        steps=T,
        cfg=1.0,
    )
    values.update(kw)
    raw = comfy.patcher.model.process_latent_out(layout_latents())
    return run.layout_and_retouch(
        calls or Calls(),
        model=comfy.patcher,
        clip=comfy.clip,
        vae=comfy.vae,
        reference=((photo_tensor() + 1) / 2).movedim(1, -1),  # IMAGE (1, H, W, 3) in [0, 1]
        prompt="a photo of sks dog on the beach",
        negative_prompt="",
        seed=0,
        sampler_name="euler",
        scheduler="simple",
        layout=values.pop("layout", {"samples": raw}),
        **values,
    )


def test_the_retouch_node_path_runs_and_restores_every_block(comfy):
    out = retouch(comfy)
    layout = comfy.patcher.model.process_latent_out(layout_latents())
    assert out.retouched["samples"].shape == layout.shape
    assert not torch.allclose(out.retouched["samples"], layout, atol=1e-3)
    assert out.mask.shape == (1, 8 * HW[0], 8 * HW[1]) and out.mask.max() > 0
    assert all("forward" not in b.__dict__ for b in dit_blocks(comfy.transformer).values())


def test_an_interrupt_in_the_retouch_leaves_nothing_patched(comfy):
    x = layout_latents(2, seed=1)
    cond = comfy.model.conditioning(["a dog", "a dog"])
    with torch.no_grad():
        before = comfy.model.velocity(x, torch.full((2,), 0.5), cond)
    calls = Calls()
    calls.stop_after = 2 * T + 2  # past the two inversions (a poll a step), in the retouch loop
    with pytest.raises(KeyboardInterrupt):
        retouch(comfy, calls)
    whole = Calls()
    retouch(comfy, whole)
    assert whole.polls > calls.polls, "the interrupt came before the end of the retouch"
    assert all("forward" not in b.__dict__ for b in dit_blocks(comfy.transformer).values())
    with torch.no_grad():
        assert torch.equal(comfy.model.velocity(x, torch.full((2,), 0.5), cond), before)


@pytest.mark.parametrize("solver", [flow.EULER, flow.MIDPOINT])
def test_copy_phase_target_equals_layout_then_differs(comfy, solver):
    from lib_layout_retouch.dit.flux.family import FluxFamily

    model = comfy.model
    prompts = derive_prompts("a photo of sks dog on the beach", "sks", "dog")
    conds = pl.encode_prompts(model, prompts, "")
    subject = model.subject_tokens(prompts.personalized, ["sks", "dog"])
    family = model.family
    model.family = FluxFamily(solver)
    try:
        res = pl.retouch(
            model,
            reference_latent=model.encode(photo_tensor()),
            layout_latents=layout_latents(),
            conds=conds,
            subject_tokens=subject,
            settings=pl.RetouchSettings(
                schedule=Schedule.for_steps(T, lambda1=1, lambda2=2, mask_start=4, scale=False),
                guidance_scale=1.0,
                skip_equal_target=False,
                keep_trajectories=True,
            ),
        )
    finally:
        model.family = family
    lay, tgt = res.trajectories[LAYOUT], res.trajectories[TARGET]
    roundings = network_roundings(comfy.transformer)
    for s in (1, 2):  # s ≤ λ2: the target rows take the layout rows' Q, K, V in every block
        tol = assert_rounding_close(tgt[s - 1], lay[s - 1], roundings)
    assert_differs_beyond(tgt[-1], lay[-1], tol)  # then the reference's identity is painted
    assert all("forward" not in b.__dict__ for b in dit_blocks(comfy.transformer).values())
