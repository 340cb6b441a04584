"""The host-independent half of a k-diffusion host adapter (Forge): σ ↔ ᾱ, the σ-scaled input, and ε
from a denoiser's output — exact values, and ε through a denoiser built from a real (tiny) ldm UNet
equal to the UNet's own ε."""

import math

import torch

from lib_layout_retouch.unet.model import (
    KDiffusionModel,
    LdmModel,
    alpha_cumprod_of_sigma,
    eps_from_denoised,
    sigma_of_alpha_cumprod,
    sigma_scale_input,
)
from tests.tolerance import network_roundings, rounding_atol


def test_sigma_and_alpha_cumprod_are_inverse_with_exact_values():
    ac = torch.tensor([0.25, 0.5, 0.8], dtype=torch.float64)
    sigma = sigma_of_alpha_cumprod(ac)
    assert torch.allclose(
        sigma, torch.tensor([math.sqrt(3), 1.0, 0.5], dtype=torch.float64), rtol=0, atol=1e-15
    )
    assert torch.allclose(alpha_cumprod_of_sigma(sigma), ac, rtol=0, atol=1e-15)


def test_eps_from_denoised_recovers_the_noise_row_by_row():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    ac = torch.tensor([0.9, 0.3, 0.05], dtype=torch.float64)
    z_t = (
        ac.sqrt().view(-1, 1, 1, 1) * x0 + (1 - ac).sqrt().view(-1, 1, 1, 1) * eps
    )  # DDIM's latent
    x = sigma_scale_input(z_t, ac)
    sigma = sigma_of_alpha_cumprod(ac)
    assert torch.allclose(x, x0 + sigma.view(-1, 1, 1, 1) * eps, atol=1e-12)  # x = x₀ + σε
    assert torch.allclose(eps_from_denoised(x, x0, sigma), eps, atol=1e-12)
    # a wrong σ per row gives a wrong ε: the rows are not mixed up
    assert not torch.allclose(eps_from_denoised(x, x0, sigma.flip(0)), eps, atol=1e-3)


class _DenoiserOverLdm(KDiffusionModel):
    """A k-diffusion denoiser made from an ε-UNet the way Forge's KModel does it:
    D(x; σ) = x − σ·ε_θ(x/√(σ²+1), t(σ))."""

    def denoise(self, x, sigma, cond):
        t = torch.stack(
            [
                torch.argmin((sigma_of_alpha_cumprod(self.ldm.alphas_cumprod.float()) - s).abs())
                for s in sigma
            ]
        )
        inner = x / (sigma**2 + 1).sqrt().view(-1, 1, 1, 1)
        return x - sigma.view(-1, 1, 1, 1) * self.ldm.apply_model(inner, t, cond)


@torch.no_grad()
def test_eps_through_a_sigma_denoiser_equals_the_unets_eps(tiny_ldm):
    torch.manual_seed(1)
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([981, 41])
    cond = tiny_ldm.get_learned_conditioning(["a photo of a dog", ""])
    eps = LdmModel(tiny_ldm).eps(z, t, cond)
    k_eps = _DenoiserOverLdm(tiny_ldm).eps(z, t, cond)
    assert eps.abs().mean() > 0.01  # a real prediction, not zeros
    # D = x − σ·ε is rounded at the scale of x (≈ z), and ε = (x − D)/σ keeps that error: one
    # UNet forward's rounding at the magnitude of z (tests/tolerance.py)
    tol = rounding_atol(z, network_roundings(tiny_ldm.model.diffusion_model))
    assert (k_eps - eps).abs().max() <= tol, ((k_eps - eps).abs().max(), tol)


# --- Forge's model kinds and attention conflicts (host objects faked by their shape) ---------------
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from lib_layout_retouch.adapters.forge.engines import (  # noqa: E402
    attention_replacements,
    check_forge_engine_supported,
)
from lib_layout_retouch.errors import LayoutRetouchError  # noqa: E402


def _engine(kind, prediction="epsilon", **flags):
    kmodel = SimpleNamespace(
        diffusion_model=object(), predictor=SimpleNamespace(prediction_type=prediction)
    )
    cls = type(kind, (), {})
    engine = cls()
    engine.forge_objects = SimpleNamespace(unet=SimpleNamespace(model=kmodel))
    for k, v in flags.items():
        setattr(engine, k, v)
    return engine


@pytest.mark.parametrize(
    "kind,words",
    [
        ("Flux", "Flux"),
        ("Chroma", "Chroma"),
        ("StableDiffusion3", "SD3"),
        ("StableDiffusionXLRefiner", "refiner"),
    ],
)
def test_forge_engines_without_a_retouchable_unet_are_refused_by_name(kind, words):
    with pytest.raises(LayoutRetouchError, match=words) as e:
        check_forge_engine_supported(_engine(kind, is_sdxl=kind.endswith("Refiner")))
    assert e.value.parameter == "sd_model"


def test_forge_sd1_and_sdxl_pass_and_inpaint_vpred_and_unknown_kinds_do_not():
    check_forge_engine_supported(_engine("StableDiffusion", is_sd1=True))
    check_forge_engine_supported(_engine("StableDiffusionXL", is_sdxl=True))
    with pytest.raises(LayoutRetouchError, match="inpainting"):
        check_forge_engine_supported(_engine("StableDiffusion", is_sd1=True, is_inpaint=True))
    with pytest.raises(LayoutRetouchError, match="v_prediction"):
        check_forge_engine_supported(
            _engine("StableDiffusionXL", prediction="v_prediction", is_sdxl=True)
        )
    with pytest.raises(LayoutRetouchError, match="StableDiffusion2.*neither"):
        check_forge_engine_supported(_engine("StableDiffusion2", is_sd2=True))


def test_attention_replacements_name_what_another_extension_replaced():
    assert attention_replacements({}) == []
    assert (
        attention_replacements({"transformer_options": {"patches": {"attn1_patch": [print]}}}) == []
    )
    opts = {
        "transformer_options": {
            "patches_replace": {"attn2": {("output", 3): print}, "attn1": {}, "dit": {"x": print}}
        }
    }
    assert attention_replacements(opts) == ["attn2"]
    opts["transformer_options"]["patches_replace"]["attn1"] = {("input", 1, 0): print}
    assert attention_replacements(opts) == ["attn1", "attn2"]


# --- which family adapter answers for an engine (adapters/forge/__init__.py) ----------------------
from lib_layout_retouch.adapters.forge import FAMILIES, FORGE_FLUX, FORGE_SD, engine_family  # noqa: E402


def _flux_engine(kind="Flux", predictor="PredictionFlux"):
    engine = _engine(kind)
    engine.forge_objects.unet.model.predictor = type(predictor, (), {})()
    return engine


def test_engine_family_tells_flux_from_sd_and_leaves_the_rest_to_sds_refusals():
    assert engine_family(_flux_engine()) is FORGE_FLUX
    assert engine_family(_engine("StableDiffusion", is_sd1=True)) is FORGE_SD
    assert engine_family(_engine("StableDiffusionXL", is_sdxl=True)) is FORGE_SD
    engine_family(_flux_engine()).check(_flux_engine())
    # not Flux.1 as the retouch drives it: the SD adapter takes it and refuses it by name
    for engine, words in (
        (_flux_engine(predictor="PredictionDiscreteFlow"), "PredictionFlux"),
        (_flux_engine(kind="Chroma"), "Chroma"),
        (_engine("StableDiffusion3"), "SD3"),
    ):
        family = engine_family(engine)
        assert family is FORGE_SD
        with pytest.raises(LayoutRetouchError, match=words) as e:
            family.check(engine)
        assert e.value.parameter == "sd_model"
    assert FAMILIES[-1] is FORGE_SD  # last: it matches every engine
