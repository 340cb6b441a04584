"""The model half of the Forge adapter (`lib_layout_retouch.adapters.forge.sd.ForgeModel`) against stand-ins
built exactly as Forge builds its objects (`backend/modules/k_model.py`, `k_prediction.py`,
`backend/diffusion_engine/sdxl.py` at dfdcbab6), around the tiny ldm UNet: ε equals the UNet's own ε,
the vanilla UNet is swapped through the KModel, SDXL's vector keeps the pooled text and gets the size
terms asked for, in Forge's order."""

import math
from types import SimpleNamespace

import torch

from lib_layout_retouch.adapters.forge.sd import EnginePrompts, ForgeModel
from lib_layout_retouch.conditioning import SizeTerms
from lib_layout_retouch.unet.model import LdmModel
from tests.tolerance import assert_differs_beyond, assert_rounding_close, network_roundings


class FakePredictor(torch.nn.Module):
    """Forge's `Prediction` (ε): σ_t from ᾱ, t from σ by the nearest log σ."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("log_sigmas", sigmas.log().float())
        self.prediction_type = "epsilon"

    def timestep(self, sigma):
        dists = sigma.log().float()[:, None] - self.log_sigmas[None]
        return dists.abs().argmin(dim=1).view(sigma.shape)


class FakeKModel(torch.nn.Module):
    """`KModel.apply_model`: input x/√(σ²+1), t from σ, UNet ε, returns the denoised x − σ·ε."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = FakePredictor(alphas_cumprod)

    def apply_model(self, x, t, c_crossattn=None, transformer_options=None, **kwargs):
        sigma = t
        xc = x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
        eps = self.diffusion_model(
            xc, self.predictor.timestep(sigma), context=c_crossattn, **kwargs
        )
        return x - eps * sigma.view(-1, 1, 1, 1)


def sd1_engine(tiny_ldm):
    kmodel = FakeKModel(tiny_ldm.model.diffusion_model, tiny_ldm.alphas_cumprod)
    engine = SimpleNamespace(
        is_sd1=True,
        is_sdxl=False,
        forge_objects=SimpleNamespace(unet=SimpleNamespace(model=kmodel)),
    )
    engine.seen = []

    def get_learned_conditioning(prompts):
        engine.seen.append(prompts)
        return tiny_ldm.get_learned_conditioning(list(prompts))

    engine.get_learned_conditioning = get_learned_conditioning
    return engine


@torch.no_grad()
def test_eps_through_forges_kmodel_equals_the_unets_eps(tiny_ldm, tiny_vanilla_unet):
    forge = ForgeModel(sd1_engine(tiny_ldm))
    ldm = LdmModel(tiny_ldm)
    torch.manual_seed(3)
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([961, 21])
    cond = tiny_ldm.get_learned_conditioning(["a photo of a dog", ""])
    # one UNet forward each, by two routes that round differently
    roundings = network_roundings(tiny_ldm.model.diffusion_model)
    assert_rounding_close(forge.eps(z, t, cond), ldm.eps(z, t, cond), roundings)
    assert torch.equal(forge.alphas_cumprod, tiny_ldm.alphas_cumprod.float())
    # DreamBooth's vanilla UNet goes in through the KModel (and comes out again)
    personal = forge.unet
    vanilla_eps = forge.denoiser(tiny_vanilla_unet)(z, t, cond)
    assert forge.unet is personal
    tol = assert_rounding_close(vanilla_eps, ldm.denoiser(tiny_vanilla_unet)(z, t, cond), roundings)
    assert_differs_beyond(vanilla_eps, ldm.eps(z, t, cond), tol)


def test_sd1_conditioning_is_the_engines_with_the_negative_flag(tiny_ldm):
    engine = sd1_engine(tiny_ldm)
    forge = ForgeModel(engine)
    c = forge.conditioning(["a photo of a dog"])
    assert torch.equal(c, tiny_ldm.get_learned_conditioning(["a photo of a dog"]))
    forge.conditioning([""], negative=True)
    assert isinstance(engine.seen[-1], EnginePrompts) and engine.seen[-1].is_negative_prompt


# --- SDXL: Forge's get_learned_conditioning (sdxl.py) reproduced around a fixed text encoder --------
def timestep_embedding(v: torch.Tensor, dim: int = 8) -> torch.Tensor:
    """sgm's sinusoidal `Timestep(dim)` (Forge's `engine.embedder`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = v.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FakeSdxlEngine:
    is_sdxl = True
    crop = (0, 0)  # opts.sdxl_crop_top / sdxl_crop_left

    def __init__(self):
        self.embedder = timestep_embedding

    def _text(self, prompts):
        g = torch.Generator().manual_seed(sum(map(ord, "|".join(prompts))))
        return torch.randn(len(prompts), 77, 12, generator=g), torch.randn(
            len(prompts), 6, generator=g
        )

    def get_learned_conditioning(self, prompt):  # as backend/diffusion_engine/sdxl.py
        crossattn, pooled = self._text(list(prompt))
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        out = [
            self.embedder(torch.Tensor([height])),
            self.embedder(torch.Tensor([width])),
            self.embedder(torch.Tensor([self.crop[0]])),
            self.embedder(torch.Tensor([self.crop[1]])),
            self.embedder(torch.Tensor([height])),
            self.embedder(torch.Tensor([width])),
        ]
        flat = torch.flatten(torch.cat(out)).unsqueeze(dim=0).repeat(pooled.shape[0], 1).to(pooled)
        if getattr(prompt, "is_negative_prompt", False) and all(x == "" for x in prompt):
            pooled, crossattn = torch.zeros_like(pooled), torch.zeros_like(crossattn)
        return dict(crossattn=crossattn, vector=torch.cat([pooled, flat], dim=1))


def test_sdxl_generation_size_terms_equal_the_engines_own():
    engine = FakeSdxlEngine()
    forge = ForgeModel(engine)
    got = forge.conditioning(["a photo of a dog", "a cat"], SizeTerms.of_generation(832, 1216))
    own = engine.get_learned_conditioning(
        EnginePrompts(["a photo of a dog", "a cat"], width=832, height=1216)
    )
    assert torch.equal(got["crossattn"], own["crossattn"]) and torch.equal(
        got["vector"], own["vector"]
    )


def test_sdxl_reference_size_terms_replace_only_the_size_part_in_forges_order():
    engine = FakeSdxlEngine()
    forge = ForgeModel(engine)
    ref = SizeTerms(original_hw=(600, 400), crop_top_left=(10, 3), target_hw=(64, 48))
    got = forge.conditioning(["a photo of sks dog"], ref)
    own = engine.get_learned_conditioning(
        EnginePrompts(["a photo of sks dog"], width=400, height=600)
    )
    pooled = own["vector"][:, :6]
    expected = torch.cat(
        [timestep_embedding(torch.tensor([v])) for v in (600, 400, 10, 3, 64, 48)], dim=1
    )
    assert torch.equal(got["vector"][:, :6], pooled), "the pooled text must be kept"
    assert torch.allclose(got["vector"][:, 6:], expected, atol=0), (
        "size terms: original (h, w), crop (top, left), target (h, w)"
    )
    assert torch.equal(got["crossattn"], own["crossattn"])


def test_sdxl_empty_negative_is_zero_text_with_size_terms():
    forge = ForgeModel(FakeSdxlEngine())
    got = forge.conditioning([""], SizeTerms.of_generation(64, 64), negative=True)
    assert not got["crossattn"].any() and not got["vector"][:, :6].any()
    assert got["vector"][:, 6:].abs().sum() > 0


def test_denoise_passes_sdxls_vector_as_y():
    seen = {}

    class KModel:
        diffusion_model = torch.nn.Linear(1, 1)

        def apply_model(self, x, sigma, transformer_options=None, **kw):
            seen.update(kw)
            return x

    engine = SimpleNamespace(
        is_sdxl=True, forge_objects=SimpleNamespace(unet=SimpleNamespace(model=KModel()))
    )
    cond = {"crossattn": torch.ones(1, 77, 4), "vector": torch.full((1, 10), 2.0)}
    ForgeModel(engine).denoise(torch.zeros(1, 4, 2, 2), torch.ones(1), cond)
    assert torch.equal(seen["c_crossattn"], cond["crossattn"]) and torch.equal(
        seen["y"], cond["vector"]
    )


# --- the SD1.x/SDXL family adapter (what hosts/forge.py asks of it) ---------------------------------
from lib_layout_retouch.adapters.forge.sd import FORGE_SD  # noqa: E402
from lib_layout_retouch.adapters.forge.vae import encode_mode  # noqa: E402
from lib_layout_retouch.params import LayoutRetouchParams  # noqa: E402
from lib_layout_retouch.unet.family import SD1, SDXL  # noqa: E402
from lib_layout_retouch.unet.text_encoders import TEXT_ENCODER_PREFIXES  # noqa: E402


def test_sd_adapter_builds_forge_model_with_the_hosts_crop_and_loader(tiny_ldm):
    loads = []
    model = FORGE_SD.model(
        sd1_engine(tiny_ldm), load_model=loads.append, sdxl_crop=(8, 16), distilled_cfg_scale=5.0
    )
    assert isinstance(model, ForgeModel) and model.family is SD1
    assert model.sdxl_crop == (8, 16) and model.load_model == loads.append
    sdxl = FORGE_SD.model(FakeSdxlEngine(), load_model=loads.append)
    assert sdxl.family is SDXL and sdxl.sdxl_crop == (0, 0)


def test_sd_adapter_stage1_latent_undoes_the_sigma_scaling_exactly():
    """z_t = x/√(σ²+1): σ = 0.75 → ÷1.25 and σ = 0 → x, both exact in float32."""
    x = torch.full((2, 4, 2, 2), 5.0)
    z = FORGE_SD.stage1_latent(x, torch.tensor([0.75, 0.0], dtype=torch.float64))
    assert z.dtype == torch.float32
    assert torch.equal(z[0], torch.full((4, 2, 2), 4.0)) and torch.equal(z[1], x[1])


def test_sd_adapter_refuses_nothing_a_valid_parameter_set_asks():
    FORGE_SD.check_params(LayoutRetouchParams(personalization="textual_inversion"), img2img=True)
    FORGE_SD.check_params(LayoutRetouchParams(layout_source="stage1"), img2img=False)


def _clip(transformer):
    return SimpleNamespace(text_encoder=SimpleNamespace(transformer=transformer))


def test_sd_adapter_text_encoder_slots_are_clip_l_keyed_as_in_the_checkpoint():
    sd1_clip, sdxl_clip = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    sd1 = SimpleNamespace(is_sdxl=False, text_processing_engine=_clip(sd1_clip))
    [(holder, attr, prefix)] = FORGE_SD.text_encoder_slots(sd1)
    assert getattr(holder, attr) is sd1_clip and prefix == TEXT_ENCODER_PREFIXES["sd1"]
    sdxl = SimpleNamespace(
        is_sdxl=True,
        text_processing_engine_l=_clip(sdxl_clip),
        text_processing_engine_g=_clip(torch.nn.Linear(2, 2)),
    )
    [(holder, attr, prefix)] = FORGE_SD.text_encoder_slots(sdxl)
    assert getattr(holder, attr) is sdxl_clip and prefix == TEXT_ENCODER_PREFIXES["sdxl_clip_l"]
    # a transformer that is not a module (a stand-in, a hijacked wrapper) is not swapped
    assert FORGE_SD.text_encoder_slots(SimpleNamespace(text_processing_engine=_clip(None))) == []
    assert FORGE_SD.text_encoder_note is None  # the host's own note then


class PosteriorVae:
    """Forge's `forge_objects.vae`: encode(x, regulation) hands the posterior to `regulation` (mode =
    the mean here; a sample adds noise from the global RNG), `process_in` = (z − shift)·scale."""

    patcher = "vae-patcher"
    device = torch.device("cpu")
    vae_dtype = torch.float32

    def __init__(self):
        class FirstStage:
            def encode(self, x, regulation=None):
                mean = x[:, :1, ::8, ::8].repeat(1, 4, 1, 1)
                posterior = SimpleNamespace(
                    mode=lambda: mean, sample=lambda: mean + torch.randn_like(mean)
                )
                return regulation(posterior) if regulation else posterior.sample()

            def process_in(self, z):
                return (z - 0.5) * 0.25

        self.first_stage_model = FirstStage()


def test_forge_model_encodes_with_the_shared_deterministic_encode(tiny_ldm):
    engine = sd1_engine(tiny_ldm)
    engine.forge_objects.vae = PosteriorVae()
    loads = []
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    got = ForgeModel(engine, load_model=loads.append).encode(img)
    assert torch.equal(got, (img[:, :1, ::8, ::8].repeat(1, 4, 1, 1) - 0.5) * 0.25)
    assert torch.equal(got, encode_mode(engine.forge_objects.vae, img, lambda patcher: None))
    assert loads == ["vae-patcher"]
