"""The model half of the ComfyUI adapter (`lib_layout_retouch.adapters.comfy.sd.ComfyModel`) against
stand-ins written the way ComfyUI v0.3.64 writes its objects (`comfy/model_base.py` BaseModel.
_apply_model, `comfy/model_sampling.py` EPS + ModelSamplingDiscrete, `comfy/model_patcher.py`,
`comfy/sd1_clip.py` tokenize_with_weights, `comfy/sd.py` CLIP / VAE) around the tiny ldm model:
ε equals the UNet's own ε, the retouch through it equals the retouch through the ldm model, text
positions follow ComfyUI's chunking, and bad models are refused naming the input."""

import math
import uuid
from types import SimpleNamespace

import pytest
import torch

from lib_layout_retouch import retouch as pl
from lib_layout_retouch.adapters.comfy.sd import (
    END_TOKEN,
    START_TOKEN,
    ComfyModel,
    check_attention_free,
    check_same_architecture,
    check_supported,
)
from lib_layout_retouch.conditioning import SizeTerms
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.prompts import subject_token_positions
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.unet.layers import attention_modules
from lib_layout_retouch.unet.model import LdmModel


class EPS:
    pass


class ModelSamplingDiscrete(torch.nn.Module, EPS):
    """EPS: input x/√(σ²+1), denoised x − σ·out; t from σ by the nearest log σ."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma):
        dists = sigma.log().float()[:, None] - self.log_sigmas[None]
        return dists.abs().argmin(dim=1).view(sigma.shape)

    def calculate_input(self, sigma, noise):
        return noise / (sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1)) ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(
            sigma.shape[:1] + (1,) * (model_output.ndim - 1)
        )


def config(name, **unet):
    cls = type(name, (), {})
    c = cls()
    c.unet_config = {"in_channels": 4, "context_dim": 32, "model_channels": 32, **unet}
    return c


class BaseModel(torch.nn.Module):
    """`comfy.model_base.BaseModel` as far as the adapter reads it."""

    scale = 0.18215

    def __init__(self, unet, alphas_cumprod, name="SD15", **unet_config):
        super().__init__()
        self.diffusion_model = unet
        self.model_sampling = ModelSamplingDiscrete(alphas_cumprod)
        self.model_config = config(name, **unet_config)
        self.model_type = SimpleNamespace(name="EPS")
        self.seen_options = []

    def apply_model(
        self,
        x,
        t,
        c_concat=None,
        c_crossattn=None,
        control=None,
        transformer_options={},  # noqa: B006 (ComfyUI's signature)
        **kwargs,
    ):
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        t = self.model_sampling.timestep(t).float()
        self.seen_options.append(transformer_options)
        transformer_options["original_shape"] = list(x.shape)  # the UNet writes into it
        out = self.diffusion_model(xc, t, context=c_crossattn, **kwargs).float()
        return self.model_sampling.calculate_denoised(sigma, out, x)

    def process_latent_in(self, latent):
        return latent * self.scale

    def process_latent_out(self, latent):
        return latent / self.scale


class ModelPatcher:
    def __init__(self, model, model_options=None):
        self.model = model
        self.model_options = model_options or {"transformer_options": {}}
        self.load_device = torch.device("cpu")
        self.patches_uuid = uuid.uuid4()

    def clone(self):
        n = type(self)(
            self.model, {"transformer_options": dict(self.model_options["transformer_options"])}
        )
        n.patches_uuid = self.patches_uuid
        return n


class Clip:
    """ComfyUI's CLIP: tokenize → {"l": [chunk, …]}, each chunk [(BOS,1.0), ≤75 tokens, (EOS,1.0),
    EOS padding] of 77, a word that does not fit in a chunk starting the next; encode_from_tokens
    → (cond, pooled). Here the words are encoded by the tiny ldm's own text encoder."""

    def __init__(self, ldm, chunk=75):
        self.ldm, self.chunk = ldm, chunk
        self.tokenizer = ldm.cond_stage_model.tokenizer
        self.texts = {}

    def tokenize(self, text):
        chunks, batch = [], [(START_TOKEN, 1.0)]
        for word in text.split():
            ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(batch) - 1 + len(ids) > self.chunk:
                batch += [(END_TOKEN, 1.0)] * (self.chunk + 2 - len(batch))
                chunks.append(batch)
                batch = [(START_TOKEN, 1.0)]
            batch += [(i, 1.0) for i in ids]
        batch += [(END_TOKEN, 1.0)] * (self.chunk + 2 - len(batch))
        chunks.append(batch)
        self.texts[id(chunks)] = text
        return {"l": chunks}

    def encode_from_tokens(self, tokens, return_pooled=False):
        text = self.texts[id(tokens["l"])]
        cond = self.ldm.get_learned_conditioning([text])
        return (cond, cond[:, 0]) if return_pooled else cond


def comfy_of(ldm, unet=None, name="SD15"):
    base = BaseModel(unet or ldm.model.diffusion_model, ldm.alphas_cumprod, name)
    return ModelPatcher(base)


@torch.no_grad()
def test_eps_through_comfys_base_model_equals_the_unets_eps(tiny_ldm):
    patcher = comfy_of(tiny_ldm)
    model = ComfyModel(patcher, Clip(tiny_ldm), None)
    ldm = LdmModel(tiny_ldm)
    torch.manual_seed(3)
    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([961, 21])
    cond = tiny_ldm.get_learned_conditioning(["a photo of a dog", ""])
    # σ round trip: ᾱ from ComfyUI's σ table equals ldm's ᾱ to float rounding
    assert torch.allclose(model.alphas_cumprod, tiny_ldm.alphas_cumprod.float(), rtol=1e-5, atol=0)
    assert torch.allclose(model.eps(z, t, cond), ldm.eps(z, t, cond), atol=2e-5)
    # every call gets its own transformer_options (the UNet writes into it), with σ
    seen = patcher.model.seen_options
    assert seen[-1] is not patcher.model_options["transformer_options"]
    assert "original_shape" not in patcher.model_options["transformer_options"]
    assert torch.equal(seen[-1]["sigmas"], model.alphas_cumprod.new_tensor(0) + seen[-1]["sigmas"])


def test_tokenize_lays_ids_out_as_comfys_chunks(tiny_ldm):
    clip = Clip(tiny_ldm, chunk=6)
    model = ComfyModel(comfy_of(tiny_ldm), clip, None)
    tok = clip.tokenizer
    ids = lambda w: tok(w, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert model.tokenize("a sks dog") == ids("a") + ids("sks") + ids("dog")
    # "qzx" (several character tokens) does not fit in the first 6-slot chunk: ComfyUI pads that
    # chunk and starts the next with it
    words = ["a", "a", "a", "a", "a", "qzx"]
    assert sum(len(ids(w)) for w in words[:5]) == 5 and len(ids("qzx")) > 1
    positions = subject_token_positions(model.tokenize, " ".join(words), ["qzx"], chunk_length=6)
    assert positions == [8 + k + 1 for k in range(len(ids("qzx")))]  # chunk 2, after its BOS


def test_tokenize_gives_an_embeddings_vectors_stable_ids(tiny_ldm):
    class EmbeddingClip(Clip):
        def tokenize(self, text):
            vec = torch.arange(4.0)
            chunk = [(START_TOKEN, 1.0), (5, 1.0), (vec, 1.0), (vec + 1, 1.0), (END_TOKEN, 1.0)]
            return {"l": [chunk]}

    model = ComfyModel(comfy_of(tiny_ldm), EmbeddingClip(tiny_ldm), None)
    a, b = model.tokenize("x"), model.tokenize("y")
    assert a == b and a[0] == 5 and a[1] < 0 and a[2] < 0 and a[1] != a[2]


def test_sd1_conditioning_is_the_clips(tiny_ldm):
    model = ComfyModel(comfy_of(tiny_ldm), Clip(tiny_ldm), None)
    c = model.conditioning(["a photo of a dog", ""])
    assert torch.equal(c, tiny_ldm.get_learned_conditioning(["a photo of a dog", ""]))


def timestep_embedding(v, dim=8):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = v.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_sdxl_vector_is_comfys_encode_adm_with_the_size_terms_asked_for(tiny_ldm):
    class SDXLBase(BaseModel):
        def encode_adm(self, **kw):  # comfy/model_base.py SDXL.encode_adm
            out = [
                timestep_embedding(torch.Tensor([kw[k]]))
                for k in ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
            ]
            flat = (
                torch.flatten(torch.cat(out)).unsqueeze(0).repeat(kw["pooled_output"].shape[0], 1)
            )
            return torch.cat((kw["pooled_output"], flat), dim=1)

    base = SDXLBase(tiny_ldm.model.diffusion_model, tiny_ldm.alphas_cumprod, "SDXL")
    model = ComfyModel(ModelPatcher(base), Clip(tiny_ldm), None)
    assert model.is_sdxl
    ref = SizeTerms(original_hw=(600, 400), crop_top_left=(10, 3), target_hw=(64, 48))
    got = model.conditioning(["a photo of sks dog"], ref)
    cond = tiny_ldm.get_learned_conditioning(["a photo of sks dog"])
    assert torch.equal(got["crossattn"], cond)
    assert torch.equal(got["vector"][:, : cond.shape[-1]], cond[:, 0]), "pooled text kept"
    expected = torch.cat(
        [timestep_embedding(torch.tensor([v])) for v in (600, 400, 10, 3, 64, 48)], 1
    )
    assert torch.equal(got["vector"][:, cond.shape[-1] :], expected)


def test_denoise_passes_sdxls_vector_as_y():
    seen = {}

    class Base(torch.nn.Module):
        diffusion_model = torch.nn.Linear(1, 1)
        model_config = config("SDXL")

        def apply_model(self, x, sigma, transformer_options=None, **kw):
            seen.update(kw)
            return x

    cond = {"crossattn": torch.ones(1, 77, 4), "vector": torch.full((1, 10), 2.0)}
    ComfyModel(ModelPatcher(Base()), None, None).denoise(
        torch.zeros(1, 4, 2, 2), torch.ones(1), cond
    )
    assert torch.equal(seen["c_crossattn"], cond["crossattn"]) and torch.equal(
        seen["y"], cond["vector"]
    )


def test_vae_takes_comfys_images_and_scales_latents(tiny_ldm):
    seen = {}

    class Vae:
        def encode(self, pixels):  # (B, H, W, 3) in [0, 1] → raw latents
            seen["pixels"] = pixels
            return pixels.movedim(-1, 1)[:, :1].repeat(1, 4, 1, 1)[..., ::8, ::8] + 1

        def decode(self, raw):
            seen["raw"] = raw
            return torch.full((raw.shape[0], 16, 16, 3), 0.25)

    model = ComfyModel(comfy_of(tiny_ldm), None, Vae())
    images = torch.linspace(-1, 1, 3 * 16 * 16).view(1, 3, 16, 16)
    z = model.encode(images)
    assert seen["pixels"].shape == (1, 16, 16, 3)
    assert torch.allclose(seen["pixels"].movedim(-1, 1), (images + 1) / 2)
    assert torch.allclose(
        z, ((images[:, :1, ::8, ::8] + 1) / 2 + 1).repeat(1, 4, 1, 1) * BaseModel.scale
    )
    out = model.decode(z)
    assert torch.allclose(seen["raw"], z / BaseModel.scale)
    assert out.shape == (1, 3, 16, 16) and torch.allclose(out, torch.full_like(out, -0.5))


@torch.no_grad()
def test_retouch_through_comfy_equals_retouch_through_ldm_and_restores_the_unet(setup, tiny_ldm):
    ldm_model, conds, subject, ref, layouts = setup
    loads = []
    comfy_model = ComfyModel(comfy_of(tiny_ldm), Clip(tiny_ldm), None, load_model=loads.append)
    settings = pl.RetouchSettings(
        schedule=Schedule.for_steps(6, lambda1=1, lambda2=2, mask_start=4, scale=False)
    )
    kw = dict(
        reference_latent=ref,
        layout_latents=layouts,
        conds=conds,
        subject_tokens=subject,
        settings=settings,
    )
    before = {
        n: dict(m.__dict__) for n, m in attention_modules(tiny_ldm.model.diffusion_model).items()
    }
    a = pl.retouch(ldm_model, **kw)
    b = pl.retouch(comfy_model, **kw)
    assert loads and all(p is comfy_model.patcher for p in loads), "the patcher is loaded first"
    scale = a.latents.abs().max().item()
    assert torch.allclose(a.latents, b.latents, atol=1e-4 * max(1.0, scale), rtol=0)
    assert torch.equal(a.masks, b.masks)
    after = {
        n: dict(m.__dict__) for n, m in attention_modules(tiny_ldm.model.diffusion_model).items()
    }
    assert after.keys() == before.keys() and all("forward" not in d for d in after.values())


def test_model_key_follows_the_weight_patches(tiny_ldm):
    p = comfy_of(tiny_ldm)
    q = p.clone()
    assert ComfyModel(p, None, None).model_key() == ComfyModel(q, None, None).model_key()
    q.patches_uuid = uuid.uuid4()  # a LoRA added
    assert ComfyModel(p, None, None).model_key() != ComfyModel(q, None, None).model_key()
    other = comfy_of(tiny_ldm)  # another model object
    assert ComfyModel(p, None, None).model_key() != ComfyModel(other, None, None).model_key()


@pytest.mark.parametrize(
    "name, words",
    [("Chroma", "Chroma"), ("SD3", "SD3"), ("SDXLRefiner", "refiner"), ("SD21UnclipL", "neither")],
)
def test_unsupported_models_are_refused_naming_the_input(tiny_ldm, name, words):
    with pytest.raises(LayoutRetouchError) as e:
        check_supported(comfy_of(tiny_ldm, name=name), "vanilla_model")
    assert words in str(e.value) and "'vanilla_model'" in str(e.value)
    assert e.value.parameter == "vanilla_model"


def test_inpaint_and_v_prediction_models_are_refused(tiny_ldm):
    p = comfy_of(tiny_ldm)
    p.model.model_config.unet_config["in_channels"] = 9
    with pytest.raises(LayoutRetouchError, match="inpainting"):
        check_supported(p)

    class V_PREDICTION:
        pass

    class ModelSamplingAdvanced(
        ModelSamplingDiscrete, V_PREDICTION
    ):  # the ModelSamplingDiscrete node
        pass

    p = comfy_of(tiny_ldm)
    patched = ModelSamplingAdvanced(tiny_ldm.alphas_cumprod)
    p.get_model_object = lambda name: patched if name == "model_sampling" else None
    with pytest.raises(LayoutRetouchError, match="V_PREDICTION.*'vanilla_model'"):
        check_supported(p, "vanilla_model")
    check_supported(comfy_of(tiny_ldm))  # SD15 ε passes


def test_vanilla_model_of_another_architecture_is_refused(tiny_ldm):
    p = comfy_of(tiny_ldm)
    other = comfy_of(tiny_ldm)
    check_same_architecture(p, other)
    other.model.model_config.unet_config["context_dim"] = 1024
    with pytest.raises(LayoutRetouchError, match="'vanilla_model'") as e:
        check_same_architecture(p, other)
    assert e.value.parameter == "vanilla_model"


def test_another_nodes_attention_replacement_is_named(tiny_ldm):
    def my_attention_patch(q, k, v, extra_options):
        return q

    p = comfy_of(tiny_ldm)
    check_attention_free(p)
    p.model_options["transformer_options"]["patches_replace"] = {
        "attn1": {("output", 1): my_attention_patch}
    }
    with pytest.raises(LayoutRetouchError) as e:
        check_attention_free(p)
    assert "my_attention_patch" in str(e.value) and "attn1" in str(e.value)
    assert e.value.parameter == "model"
