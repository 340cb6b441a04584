"""lib_layout_retouch.adapters.forge.flux against stand-ins built the way Forge builds its Flux engine
(backend/diffusion_engine/flux.py, backend/modules/k_model.py, k_prediction.PredictionFlux) around the
tests' tiny Flux: the velocity is what the KModel's denoised implies, the σ list is Forge's "Simple"
scheduler, text and VAE go through the engine's objects. The real Forge is the Forge tier's
(tests/host/forge/test_forge_flux_engine.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lib_layout_retouch.adapters.forge.flux import forge_flux_model, is_forge_flux
from lib_layout_retouch.dit.flow import simple_sigmas
from tests.fixtures.flux import TinyFluxVAE, build_tiny_flux


class PredictionFlux(torch.nn.Module):
    """Forge's PredictionFlux (k_prediction.py:285-322): const prediction, timestep(σ) = σ, a table of
    10000 σ = time_shift(μ, t)."""

    def __init__(self, mu: float = 1.15):
        super().__init__()
        t = torch.arange(1, 10001, 1) / 10000
        self.register_buffer("sigmas", math.exp(mu) / (math.exp(mu) + (1 / t - 1)))

    def timestep(self, sigma):
        return sigma

    def calculate_denoised(self, sigma, out, x):
        return x - out * sigma.view(-1, 1, 1, 1)


class KModel(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.diffusion_model = transformer
        self.predictor = PredictionFlux()
        self.computation_dtype = torch.float32

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        out = self.diffusion_model(
            x, self.predictor.timestep(t).float(), context=c_crossattn, **kwargs
        ).float()
        return self.predictor.calculate_denoised(t, out, x)


class Engine:
    """The parts of Forge's `Flux` engine the adapter reads (class name matters: `is_forge_flux`)."""


def make_engine(transformer, loads):
    g = torch.Generator().manual_seed(5)
    t5_table = torch.randn(100, 32, generator=g)
    clip_table = torch.randn(100, 32, generator=g)

    def ids(text):
        return [(ord(c) % 97) + 1 for c in text.replace(" ", "")][:20]

    class T5Engine:
        def tokenize(self, texts):
            return [ids(t) for t in texts]

        def __call__(self, texts):
            rows = []
            for t in texts:
                tok = (ids(t) + [1] + [0] * 256)[:256]  # EOS 1, pad 0 to 256 (t5_engine.py)
                rows.append(t5_table[torch.tensor(tok)])
            return torch.stack(rows)

    class ClipEngine:
        def tokenize(self, texts):
            return [ids(t) for t in texts]

        def __call__(self, texts):
            pooled = torch.stack([clip_table[torch.tensor(ids(t) or [0])].mean(0) for t in texts])
            return torch.zeros(len(texts), 77, 32), pooled

    vae_impl = TinyFluxVAE()

    class FirstStage:
        def encode(self, x, regulation=None):
            class Posterior:
                def mode(self_inner):
                    return vae_impl.encode(x)

                def sample(self_inner):
                    return vae_impl.encode(x) + torch.randn_like(vae_impl.encode(x))

            return regulation(Posterior()) if regulation else Posterior().sample()

        def process_in(self, z):
            return (z - 0.1159) * 0.3611

    class Vae:
        patcher = "vae-patcher"
        device = torch.device("cpu")
        vae_dtype = torch.float32
        first_stage_model = FirstStage()

    class Objects:
        pass

    engine = type("Flux", (Engine,), {})()
    objects = Objects()
    objects.unet = Objects()
    objects.unet.model = KModel(transformer)
    objects.clip = Objects()
    objects.clip.patcher = "clip-patcher"
    objects.vae = Vae()
    engine.forge_objects = objects
    engine.text_processing_engine_t5 = T5Engine()
    engine.text_processing_engine_l = ClipEngine()
    engine.decode_first_stage = lambda z: vae_impl.decode(z / 0.3611 + 0.1159)
    return engine


@pytest.fixture(scope="module")
def forge_flux():
    transformer = build_tiny_flux(3)[0].eval()
    loads = []
    engine = make_engine(transformer, loads)
    model = forge_flux_model(engine, load_model=loads.append)
    return engine, model, loads


def test_recognises_forge_flux_by_engine_and_predictor(forge_flux):
    engine, _, _ = forge_flux
    assert is_forge_flux(engine)
    other = type("Chroma", (), {"forge_objects": engine.forge_objects})()
    assert not is_forge_flux(other)


@torch.no_grad()
def test_velocity_is_what_the_kmodels_denoised_implies(forge_flux):
    engine, model, _ = forge_flux
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g)
    cond = model.conditioning(["a sks dog", "a dog"], 3.5)
    for s in (0.9, 0.4):
        sigma = torch.full((2,), s)
        v = model.velocity(x, sigma, cond)
        denoised = engine.forge_objects.unet.model.apply_model(
            x, sigma, c_crossattn=cond["crossattn"], y=cond["vector"], guidance=cond["guidance"]
        )
        implied = (x - denoised) / s
        # (x − (x − v·σ))/σ loses ~|x|·ε/σ to rounding
        tol = 8 * torch.finfo(torch.float32).eps * float(x.abs().max()) / s
        assert float((implied - v).abs().max()) <= tol + 1e-6 * float(v.abs().max())


def test_sigmas_are_forges_simple_scheduler(forge_flux):
    engine, model, _ = forge_flux
    table = engine.forge_objects.unet.model.predictor.sigmas
    # modules/sd_schedulers.py:81-87, written out
    n = 8
    want = [float(table[-(1 + int(x * len(table) / n))]) for x in range(n)] + [0.0]
    assert simple_sigmas(table, n) == want
    got = [float(s) for s in model.schedule(n, (8, 8)).sigmas]
    assert got[::-1] == want  # FlowSchedule holds them ascending


def test_text_goes_through_the_engines_and_loads_the_clip_patcher(forge_flux):
    engine, model, loads = forge_flux
    loads.clear()
    cond = model.conditioning(["a sks dog on the beach"], 2.5)
    assert loads and set(loads) == {"clip-patcher"}
    assert torch.equal(
        cond["crossattn"], engine.text_processing_engine_t5(["a sks dog on the beach"])
    )
    assert torch.equal(
        cond["vector"], engine.text_processing_engine_l(["a sks dog on the beach"])[1]
    )
    assert cond["guidance"].tolist() == [2.5]
    assert model.tokenize_t5("sks") == engine.text_processing_engine_t5.tokenize(["sks"])[0]


def test_vae_encode_is_the_posterior_mode_and_decode_inverts_it(forge_flux):
    engine, model, loads = forge_flux
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    loads.clear()
    a, b = model.encode(img), model.encode(img)
    assert torch.equal(a, b), "the encode must be deterministic (the posterior's mode)"
    assert loads == ["vae-patcher", "vae-patcher"]
    assert a.shape == (1, 16, 8, 8)
    back = model.decode(a)
    assert back.shape == (1, 3, 64, 64)


def test_unet_family_tells_a_flux_transformer_from_sd(forge_flux):
    """The DreamBooth vanilla check (layout_retouch_webui/vanilla.py) compares families: a Flux
    vanilla for an SD model (or the reverse) is refused by name, not as 'SD1.x of another size'."""
    from lib_layout_retouch.checkpoints import unet_family
    from lib_layout_retouch.unet.family import SD1_FAMILY

    _, model, _ = forge_flux
    assert unet_family(model.transformer.state_dict()) == "Flux"
    assert (
        unet_family(
            {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 768)}
        )
        == SD1_FAMILY
    )


def test_the_generations_guidance_reaches_every_paths_conds(forge_flux):
    engine, _, _ = forge_flux
    model = forge_flux_model(engine, guidance=5.0)
    from lib_layout_retouch.prompts import derive_prompts

    conds = model.retouch_conds(derive_prompts("a sks dog", "sks", "dog"), "")
    assert conds.layout["guidance"].tolist() == [5.0] and conds.reference["guidance"].tolist() == [
        5.0
    ]


# --- the Flux.1 family adapter (what hosts/forge.py asks of it) --------------------------------------
from lib_layout_retouch.adapters.forge.flux import FORGE_FLUX  # noqa: E402
from lib_layout_retouch.adapters.forge.vae import encode_mode  # noqa: E402
from lib_layout_retouch.dit.flux.family import DEFAULT_GUIDANCE, FluxFamily  # noqa: E402
from lib_layout_retouch.errors import LayoutRetouchError  # noqa: E402
from lib_layout_retouch.params import LayoutRetouchParams  # noqa: E402


@pytest.mark.parametrize(
    "params,img2img,parameter,words",
    [
        (dict(personalization="textual_inversion"), False, "personalization", "CLIP-L"),
        (dict(personalization="lora", layout_source="stage1"), False, "layout_source", "DDIM"),
        (dict(personalization="lora"), True, "sd_model", "img2img"),
    ],
)
def test_flux_adapter_refuses_what_flux_cannot_do_by_parameter(params, img2img, parameter, words):
    with pytest.raises(LayoutRetouchError, match=words) as e:
        FORGE_FLUX.check_params(LayoutRetouchParams(**params), img2img=img2img)
    assert e.value.parameter == parameter


def test_flux_adapter_accepts_txt2img_lora_and_dreambooth_with_inversion(forge_flux):
    engine, _, _ = forge_flux
    assert FORGE_FLUX.matches(engine)
    FORGE_FLUX.check(engine)
    for kind in ("lora", "dreambooth"):
        FORGE_FLUX.check_params(LayoutRetouchParams(personalization=kind), img2img=False)


def test_flux_adapter_model_carries_the_generations_distilled_guidance(forge_flux):
    engine, _, _ = forge_flux
    loads = []
    for asked, want in ((5.0, 5.0), (None, DEFAULT_GUIDANCE), (0, DEFAULT_GUIDANCE)):
        model = FORGE_FLUX.model(
            engine, load_model=loads.append, sdxl_crop=(8, 8), distilled_cfg_scale=asked
        )
        assert isinstance(model.family, FluxFamily)
        assert model.conditioning(["a dog"])["guidance"].tolist() == [want]
    assert set(loads) == {"clip-patcher"}  # the host's loader reaches the engine's objects


def test_flux_adapter_stage1_latent_is_x_itself_and_no_text_encoder_is_swapped(forge_flux):
    engine, _, _ = forge_flux
    x = torch.randn(2, 16, 4, 4)
    assert FORGE_FLUX.stage1_latent(x, torch.tensor([0.9, 0.3])) is x
    assert FORGE_FLUX.text_encoder_slots(engine) == []
    note = FORGE_FLUX.text_encoder_note
    assert "T5 and CLIP-L" in note and "stage1_text_encoder" in note


def test_flux_vae_encode_is_the_shared_deterministic_encode(forge_flux):
    engine, model, _ = forge_flux
    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert torch.equal(
        model.encode(img), encode_mode(engine.forge_objects.vae, img, lambda patcher: None)
    )
