"""The Flux.1 path of the nodes in-process with ComfyUI's own Flux classes, patcher and sampler (no
server, no lock needed). Run with ComfyUI's Python:

    OMP_NUM_THREADS=1 <comfy-venv>/bin/python tests/host/comfy/smoke_inprocess_flux.py [--comfy-dir …]

What is ComfyUI's own here: the Flux config (`comfy.supported_models.Flux`), its BaseModel
(`comfy.model_base.Flux`: `_apply_model`, `extra_conds` with the guidance, CONST +
ModelSamplingFlux), the transformer class (`comfy.ldm.flux.model.Flux`, built with tiny dims and
loaded with the tests' tiny-Flux weights, BFL keys), the ModelPatcher, `comfy.sample` /
KSampler (euler, simple), the FluxTokenizer (real CLIP-L BPE + real T5 SentencePiece, so the
subject rows are the pieces ComfyUI's tokenizer gives), the CLIP object, the text-encoder classes
(`sd1_clip.SDClipModel` around ComfyUI's CLIPTextModel and T5) and the VAE class. What is a
stand-in: every weight is random, the text encoders are built with tiny configs (CLIP-L width 32, T5
d_model 32: ComfyUI's `FluxClipModel` builds full-size T5-XXL from a fixed config, so a subclass
swaps in the tiny configs), and the VAE is ComfyUI's SD-layout AutoencoderKL with 16 latent channels
(Flux's VAE has no quant convs). Refusals of other DiTs use ComfyUI's config classes on a BaseModel
built without its network (`disable_unet_model_creation`).

Checks: the adapter's velocity is what ComfyUI's apply_model's denoised implies; its σ list is
KSampler's; the Sampler node differs from a plain KSampler whose result is bit-identical before and
after; real CFG runs; the copy phase makes the target the layout (rounding aside); stage 1 split
at λ1 continues the one-pass sampler; the split nodes run; inpaint keeps the outside; the
refusals name the model kind and the fix; no block is left patched.
"""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
COMFY = (
    sys.argv[sys.argv.index("--comfy-dir") + 1] if "--comfy-dir" in sys.argv else "/work/host/comfy"
)
sys.argv = [sys.argv[0], "--cpu", "--force-fp32"]
sys.path.insert(0, COMFY)
import comfy.options

comfy.options.enable_args_parsing()
import comfy.model_base
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.flux
import comfy.text_encoders.t5
import nodes
import torch
from comfy import sd1_clip

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(HERE))
import comfy_checkpoints as CC
import forge_checkpoints as FC
from comfy.ldm.models.autoencoder import AutoencoderKL

from layout_retouch_comfy import run
from layout_retouch_comfy.glue import ComfyCalls
from layout_retouch_comfy.nodes import (
    LayoutRetouchLayout,
    LayoutRetouchRetouch,
    LayoutRetouchSampler,
)
from lib_layout_retouch import retouch as pl
from lib_layout_retouch.adapters.comfy.flux import comfy_flux_model
from lib_layout_retouch.dit.flux.blocks import dit_blocks
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.retouch.editor import LAYOUT, TARGET
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.segmentation import SubjectSegmenter
from tests.fixtures.flux import build_tiny_flux, tiny_flux_config_dict
from tests.fixtures.sam import build_tiny_sam
from tests.tolerance import network_roundings, rounding_atol

TINY = tiny_flux_config_dict()
UNET = dict(
    image_model="flux",
    in_channels=16,
    out_channels=16,
    vec_in_dim=TINY["vec_in_dim"],
    context_in_dim=TINY["context_in_dim"],
    hidden_size=TINY["hidden_size"],
    mlp_ratio=TINY["mlp_ratio"],
    num_heads=TINY["num_heads"],
    depth=TINY["depth"],
    depth_single_blocks=TINY["depth_single_blocks"],
    axes_dim=TINY["axes_dim"],
    theta=TINY["theta"],
    patch_size=2,
    qkv_bias=TINY["qkv_bias"],
    guidance_embed=True,
)


def make_flux(seed):
    cfg = comfy.supported_models.Flux(dict(UNET))
    cfg.set_inference_dtype(torch.float32, None)
    m = cfg.get_model({}, "")
    missing, unexpected = m.diffusion_model.load_state_dict(build_tiny_flux(seed)[1], strict=True)
    m.float()
    return comfy.model_patcher.ModelPatcher(
        m, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    ), cfg


CLIP_L = dict(
    hidden_act="quick_gelu",
    hidden_size=TINY["vec_in_dim"],
    intermediate_size=64,
    num_attention_heads=2,
    num_hidden_layers=2,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=TINY["vec_in_dim"],
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=49407,
    pad_token_id=1,
    model_type="clip_text_model",
)
T5 = dict(
    d_ff=64,
    d_kv=16,
    d_model=TINY["context_in_dim"],
    num_heads=2,
    num_layers=2,
    vocab_size=32128,
    dense_act_fn="gelu_pytorch_tanh",
    is_gated_act=True,
    model_type="t5",
    relative_attention_num_buckets=32,
    layer_norm_epsilon=1e-6,
)


class TinyFluxClip(comfy.text_encoders.flux.FluxClipModel):
    """ComfyUI's FluxClipModel with its two encoders built from tiny configs (its own __init__ reads
    the full-size T5-XXL config): the same classes, the same encode_token_weights."""

    def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's)
        torch.nn.Module.__init__(self)
        self.clip_l = sd1_clip.SDClipModel(
            device=device,
            dtype=dtype,
            textmodel_json_config=dict(CLIP_L),
            return_projected_pooled=False,
            model_options={**model_options, "model_name": "clip_l"},
        )
        self.t5xxl = sd1_clip.SDClipModel(
            device=device,
            layer="last",
            textmodel_json_config=dict(T5),
            dtype=dtype,
            special_tokens={"end": 1, "pad": 0},
            model_class=comfy.text_encoders.t5.T5,
            model_options={**model_options, "model_name": "t5xxl"},
        )
        self.dtypes = {dtype}


def randomise(module, g):
    CC._init(module, torch)
    FC._randomise(module, torch, g)
    with torch.no_grad():
        for m in module.modules():  # ComfyUI's T5 LayerNorm (a weight, no torch init)
            if type(m).__name__ == "T5LayerNorm":
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))


t_start = time.time()
model, cfg = make_flux(1)
vanilla, _ = make_flux(2)
g = torch.Generator().manual_seed(5)
target = comfy.supported_models_base.ClipTarget(
    comfy.text_encoders.flux.FluxTokenizer, TinyFluxClip
)
clip = comfy.sd.CLIP(target=target, embedding_directory=None)
randomise(clip.cond_stage_model, g)
vae_m = AutoencoderKL(ddconfig=dict(CC.VAE_CONFIG, z_channels=16), embed_dim=16)
randomise(vae_m, g)
vae = comfy.sd.VAE(sd=vae_m.state_dict())
assert vae.latent_channels == 16
print(f"built in {time.time() - t_start:.1f}s", flush=True)

STEPS, GUIDANCE = 4, 3.5
PROMPT = "a photo of sks dog on a beach"


def conditioning(text, guidance=GUIDANCE):
    """CLIPTextEncode + FluxGuidance, as ComfyUI's nodes build them."""
    c = nodes.CLIPTextEncode().encode(clip, text)[0]
    return [[t, {**d, "guidance": guidance}] for t, d in c]


def plain(seed=7, cfg_scale=1.0):
    lat = {"samples": torch.zeros(1, 16, 8, 8)}
    pos, neg = conditioning(PROMPT), conditioning("")
    return nodes.common_ksampler(model, seed, STEPS, cfg_scale, "euler", "simple", pos, neg, lat)[
        0
    ]["samples"]


def blocks_clean():
    return all(
        "forward" not in b.__dict__ for b in dit_blocks(model.model.diffusion_model).values()
    )


ref = torch.rand(2, 80, 96, 3, generator=torch.Generator().manual_seed(3))
kw = dict(
    model=model,
    clip=clip,
    vae=vae,
    prompt=PROMPT,
    negative_prompt="",
    concept_token="sks",
    class_phrase="dog",
    seed=7,
    steps=STEPS,
    cfg=1.0,
    sampler_name="euler",
    scheduler="simple",
    lambda1=1,
    lambda2=1,
    mask_start=3,
    width=64,
    height=64,
    batch_size=1,
    scale_with_steps=False,
    guidance=GUIDANCE,
)
calls = ComfyCalls()
summary = []

with torch.inference_mode():
    # -- the adapter against ComfyUI's own model --------------------------------------------------
    m = comfy_flux_model(model, clip, vae, load_model=calls.load, guidance=GUIDANCE)
    cond = m.conditioning([PROMPT, ""])
    t5, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
    assert torch.equal(cond["crossattn"][:1], t5.float()) and cond["crossattn"].shape[1] == 256
    assert torch.equal(cond["vector"][:1], pooled.float())
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for s in (0.9, 0.4):
        sigma = torch.full((2,), s)
        v = m.velocity(x, sigma, cond)
        denoised = model.model.apply_model(
            x,
            sigma,
            c_crossattn=cond["crossattn"],
            y=cond["vector"],
            guidance=cond["guidance"],
            transformer_options={},
        )
        diff = float(((x - denoised) / s - v).abs().max())
        tol = rounding_atol(x, roundings=2, gain=1 / s)  # (x − (x − v·σ))/σ: ~|x|·eps/σ
        assert diff <= tol, (s, diff, tol)
        worst = max(worst, diff / tol)
    summary.append(f"velocity = (x - apply_model)/sigma within {worst:.2f} of the rounding bound")
    ks = ComfyCalls.sigmas(model, STEPS, "euler", "simple", 1.0)
    got = [float(s) for s in m.schedule(STEPS, (8, 8)).sigmas][::-1]
    assert got == [float(s) for s in ks], (got, ks)
    summary.append(f"sigma list = KSampler's simple schedule {[round(s, 4) for s in got]}")
    rows = m.subject_tokens(PROMPT, ["sks", "dog"])
    pieces = [t[0] for t in clip.tokenize(PROMPT)["t5xxl"][0]]
    words = clip.tokenizer.t5xxl.tokenizer.convert_ids_to_tokens([pieces[r] for r in rows])
    summary.append(f"subject T5 rows {rows} = pieces {words}")

    # -- the Sampler node ---------------------------------------------------------------------------
    a = plain()
    t0 = time.time()
    result = LayoutRetouchSampler().sample(reference=ref[:1], vanilla_model=vanilla, **kw)
    out = result["result"]
    took = time.time() - t0
    assert all(torch.isfinite(o["samples"]).all() for o in out[:2])
    assert out[0]["samples"].shape == (1, 16, 8, 8)
    assert not torch.equal(out[0]["samples"], a), "the retouch is the plain KSampler's"
    d_layout = float((out[0]["samples"] - out[1]["samples"]).abs().max())
    assert d_layout > 1e-3, "retouch changed nothing"
    assert torch.equal(a, plain()), "plain KSampler changed"
    assert blocks_clean()
    summary.append(
        f"sampler node ok in {took:.1f}s; retouched vs layout max diff {d_layout:.3g}; "
        "plain KSampler bit-identical before/after"
    )
    (info,) = result["ui"]["text"]
    assert info == out[4] and info.startswith(f"At {STEPS} steps: λ1=") and "Mask: " in info
    summary.append("the node says: " + info.replace("\n", " | "))
    cfg2 = LayoutRetouchSampler().sample(
        reference=ref[:1], vanilla_model=vanilla, **dict(kw, cfg=2.0)
    )["result"]
    assert not torch.allclose(cfg2[0]["samples"], out[0]["samples"], atol=1e-4)
    summary.append("real CFG (cfg 2) runs and differs")
    out2 = LayoutRetouchSampler().sample(
        reference=ref, vanilla_model=vanilla, **dict(kw, batch_size=2)
    )["result"]
    assert out2[0]["samples"].shape == (2, 16, 8, 8) and out2[2].shape == (2, 64, 64)
    summary.append("batch 2 with two photos ok")
    sam = SubjectSegmenter(build_tiny_sam(seed=0))  # segments the decoded Flux layout
    with_sam = LayoutRetouchSampler().sample(
        reference=ref[:1], vanilla_model=vanilla, sam=sam, **kw
    )
    assert "Mask: SAM+CA" in with_sam["ui"]["text"][0].split("\n"), with_sam["ui"]["text"]
    assert torch.equal(with_sam["result"][1]["samples"], out[1]["samples"]), "stage 1 changed"
    summary.append("the tiny SAM: Mask: SAM+CA, the same layout")

    # -- the copy phase: the target is the layout (rounding aside) ---------------------------------
    prompts = derive_prompts(PROMPT, "sks", "dog")
    conds = pl.encode_prompts(m, prompts, "")
    layout = m.model_latents(out[1]["samples"])
    res = pl.retouch(
        m,
        reference_latent=m.encode(torch.rand(1, 3, 64, 64) * 2 - 1),
        layout_latents=layout,
        conds=conds,
        subject_tokens=rows,
        settings=pl.RetouchSettings(
            schedule=Schedule.for_steps(STEPS, lambda1=1, lambda2=2, mask_start=3, scale=False),
            guidance_scale=1.0,
            skip_equal_target=False,
            keep_trajectories=True,
        ),
    )
    lay, tgt = res.trajectories[LAYOUT], res.trajectories[TARGET]
    roundings = network_roundings(model.model.diffusion_model)
    copy_tol = rounding_atol(lay[1], roundings)
    copy_diff = max(float((tgt[i] - lay[i]).abs().max()) for i in (0, 1))
    end_diff = float((tgt[-1] - lay[-1]).abs().max())
    assert copy_diff <= copy_tol and end_diff > 10 * copy_tol, (copy_diff, copy_tol, end_diff)
    assert blocks_clean()
    summary.append(
        f"copy phase (s <= lambda2): target - layout {copy_diff:.2g} <= {copy_tol:.2g}; "
        f"at the end {end_diff:.3g}"
    )

    # -- stage 1 split at lambda1 continues the one-pass sampler -----------------------------------
    from types import SimpleNamespace

    job = SimpleNamespace(
        schedule=SimpleNamespace(lambda1=2),
        prompts=SimpleNamespace(personalized=PROMPT, layout=PROMPT),
        negative_prompt="",
    )
    progress = run.Progress(SimpleNamespace(update_absolute=lambda *a: None), STEPS)
    lat = {"samples": torch.zeros(1, 16, 8, 8)}
    split = run.stage1(
        calls,
        job,
        model=model,
        vanilla_model=None,
        clip=clip,
        vanilla_clip=None,
        latent=lat,
        seed=7,
        steps=STEPS,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        denoise=1.0,
        noise_mask=None,
        progress=progress,
        guidance=GUIDANCE,
    )
    split_diff = float((split - a).abs().max())
    # x1/(1−σ)·(1−σ) and the LATENT scale round at σ_λ1; the last steps carry it through the net
    sigma_l1 = float(ComfyCalls.sigmas(model, STEPS, "euler", "simple", 1.0)[2])
    split_tol = rounding_atol(a, network_roundings(model.model.diffusion_model), gain=1 / sigma_l1)
    assert split_diff <= split_tol, (split_diff, split_tol)
    summary.append(
        f"stage 1 split at step 2 = one KSampler pass: {split_diff:.2g} <= {split_tol:.2g}"
    )

    # -- the split nodes, inpaint ------------------------------------------------------------------
    def only(*names, **over):
        return {**{k: kw[k] for k in names}, **over}

    shared = ("model", "clip", "prompt", "negative_prompt", "concept_token", "class_phrase")
    shared += ("steps", "cfg", "scale_with_steps", "guidance")
    lay_node = LayoutRetouchLayout().layout(
        **only(*shared, "sampler_name", "scheduler", "lambda1", "width", "height", "batch_size"),
        seed=1,
        vanilla_model=vanilla,
    )["result"][0]
    r = LayoutRetouchRetouch().retouch(
        **only(*shared, "vae", "lambda2", "mask_start"), layout=lay_node, reference=ref[:1]
    )["result"]
    assert r[0]["samples"].shape == (1, 16, 8, 8) and torch.isfinite(r[0]["samples"]).all()
    summary.append("Layout node -> Retouch node ok")
    src = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(9))}
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    out3 = LayoutRetouchSampler().sample(reference=ref[:1], latent=src, mask=mask, **kw)["result"]
    d = (out3[0]["samples"] - src["samples"]).abs()
    outside, inside = float(d[..., 5:].max()), float(d[..., :3].max())
    assert outside <= 1e-6 * float(src["samples"].abs().max()) and inside > 1e-2, (outside, inside)
    summary.append(f"inpaint: outside max diff {outside:.2g}, inside {inside:.3g}")

    # -- refusals ------------------------------------------------------------------------------------
    def refused(words, **over):
        try:
            LayoutRetouchSampler().sample(**dict(kw, reference=ref[:1], **over))
        except Exception as e:  # noqa: BLE001 (printed, then checked)
            msg = str(e)
            assert all(w in msg for w in words), (words, msg)
            summary.append(f"refused: {msg[:150]}")
            return
        raise AssertionError(f"not refused: {words}")

    def base_of(config_cls, model_type, **unet):
        c = config_cls(dict(config_cls.unet_config, disable_unet_model_creation=True, **unet))
        b = comfy.model_base.BaseModel(c, model_type)
        b.diffusion_model = torch.nn.Identity()
        return comfy.model_patcher.ModelPatcher(b, torch.device("cpu"), torch.device("cpu"))

    refused(
        ["layout source 'stage1'", "'layout_source'"], layout_source="stage1", vanilla_model=vanilla
    )
    for cls, words in (
        (comfy.supported_models.Chroma, "Chroma"),
        (comfy.supported_models.SD3, "SD3"),
        (comfy.supported_models.HunyuanDiT, "HunyuanDiT"),
    ):
        p = base_of(cls, comfy.model_base.ModelType.FLOW)
        refused([words, "connect an SD1.x, SDXL or Flux.1 model to 'model'"], model=p)
    sd15 = base_of(
        comfy.supported_models.SD15,
        comfy.model_base.ModelType.EPS,
        model_channels=32,
        in_channels=4,
    )
    refused(
        ["'vanilla_model' is SD1.x but 'model' is Flux", "another model family"], vanilla_model=sd15
    )
    refused(["'vanilla_model' is Flux but 'model' is SD1.x"], model=sd15, vanilla_model=model)
    assert torch.equal(a, plain()), "plain KSampler changed at the end"
    assert blocks_clean()

print("\n".join(summary))
print(f"SMOKE FLUX OK ({time.time() - t_start:.0f}s)")
