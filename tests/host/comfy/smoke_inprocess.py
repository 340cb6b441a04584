"""A light in-process check of the nodes with ComfyUI's own model patcher, sampler, CLIP and VAE on a
tiny SD1-config UNet (≈ 1.8 GB, no server, no lock needed): the Sampler node runs and differs from a
plain KSampler whose latent is bit-identical before and after, and says what it used (its `ui` text =
its `info` output); bad inputs raise the library's message naming the input; batch 2 with two
photos; inpaint keeps the outside; a tiny random SAM (tests/fixtures/sam.py) makes the mask SAM+CA;
a subject mask bounds the retouch and not stage 1; the split nodes run; no attention module is left
patched. Run with ComfyUI's Python:

    <comfy-venv>/bin/python tests/host/comfy/smoke_inprocess.py [--comfy-dir /work/host/comfy]
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
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import nodes
import torch

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(HERE))
import comfy_checkpoints as CC
import forge_checkpoints as FC
from comfy.ldm.models.autoencoder import AutoencoderKL

from layout_retouch_comfy.nodes import (
    LayoutRetouchLayout,
    LayoutRetouchRetouch,
    LayoutRetouchSampler,
)
from lib_layout_retouch.segmentation import SubjectSegmenter
from tests.fixtures.sam import build_tiny_sam

UC = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=768,
    use_linear_in_transformer=False,
    adm_in_channels=None,
    use_temporal_attention=False,
    use_spatial_transformer=True,
)


def make_model(seed):
    cfg = comfy.supported_models.SD15(dict(UC))
    cfg.set_inference_dtype(torch.float32, None)
    m = cfg.get_model({}, "")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    CC._init(m.diffusion_model, torch)
    FC._randomise(m.diffusion_model, torch, g)
    with torch.no_grad():
        m.diffusion_model.out[-1].weight.mul_(0.1)
    m.float()
    return comfy.model_patcher.ModelPatcher(
        m, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    ), cfg


model, cfg = make_model(1)
vanilla, _ = make_model(2)
clip = comfy.sd.CLIP(target=cfg.clip_target({}), embedding_directory=None)
g = torch.Generator().manual_seed(5)
CC._init(clip.cond_stage_model, torch)
FC._randomise(clip.cond_stage_model, torch, g)
vae_m = AutoencoderKL(ddconfig=CC.VAE_CONFIG, embed_dim=4)
CC._init(vae_m, torch)
FC._randomise(vae_m, torch, g)
vae = comfy.sd.VAE(sd=vae_m.state_dict())
print("built", flush=True)


def plain(seed=7):
    pos = [
        [clip.encode_from_tokens(clip.tokenize("a photo of sks dog"), return_pooled=True)[0], {}]
    ]
    neg = [[clip.encode_from_tokens(clip.tokenize("blurry"), return_pooled=True)[0], {}]]
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    return nodes.common_ksampler(model, seed, 4, 7.5, "euler", "normal", pos, neg, lat)[0][
        "samples"
    ]


ref = torch.rand(2, 80, 96, 3)
kw = dict(
    model=model,
    clip=clip,
    vae=vae,
    prompt="a photo of sks dog on a beach",
    negative_prompt="blurry",
    concept_token="sks",
    class_phrase="dog",
    seed=7,
    steps=4,
    cfg=7.5,
    sampler_name="euler",
    scheduler="normal",
    lambda1=1,
    lambda2=1,
    mask_start=3,
    width=64,
    height=64,
    batch_size=1,
    scale_with_steps=False,
)
with torch.inference_mode():
    a = plain()
    t0 = time.time()
    result = LayoutRetouchSampler().sample(reference=ref[:1], vanilla_model=vanilla, **kw)
    out = result["result"]
    (info,) = result["ui"]["text"]
    print("the node says:", info.replace("\n", " | "))
    assert info == out[4] and info.split("\n") == [
        "At 4 steps: λ1=1, λ2=1, mask from step 3 of 4",
        "Mask: CA only",
        "Notes: reference was 96×80: centre-cropped to 1:1 and resized to 64×64",
    ], info
    print(
        "sampler ok",
        time.time() - t0,
        [tuple(o["samples"].shape) if isinstance(o, dict) else tuple(o.shape) for o in out[:4]],
        flush=True,
    )
    assert not torch.equal(out[0]["samples"], a)
    assert not torch.allclose(out[0]["samples"], out[1]["samples"], atol=1e-3), (
        "retouch changed nothing"
    )
    b = plain()
    assert torch.equal(a, b), "plain changed"
    for bad, words in (
        (dict(reference=None), "reference"),
        (dict(prompt="a dog"), "concept_token"),
        (dict(lambda1=4), "lambda1"),
    ):
        k = dict(kw, reference=ref[:1], vanilla_model=vanilla)
        k.update(bad)
        try:
            LayoutRetouchSampler().sample(**k)
            print("NO ERROR", bad)
        except Exception as e:
            print(type(e).__name__, str(e)[:200])
            assert f"'{words}'" in str(e)
    assert torch.equal(a, plain()), "plain changed after errors"
    # batch 2, two photos, img2img+mask
    out2 = LayoutRetouchSampler().sample(
        reference=ref, vanilla_model=vanilla, **dict(kw, batch_size=2)
    )["result"]
    print("batch", tuple(out2[0]["samples"].shape), tuple(out2[2].shape), tuple(out2[3].shape))
    src = {"samples": torch.randn(1, 4, 8, 8)}
    mask = torch.zeros(64, 64)
    mask[:, :32] = 1
    out3 = LayoutRetouchSampler().sample(
        reference=ref[:1], latent=src, mask=mask, denoise=1.0, **kw
    )["result"]
    d = (out3[0]["samples"] - src["samples"]).abs()
    print("inpaint: outside max diff", d[..., 5:].max().item(), "inside", d[..., :3].max().item())
    assert d[..., 5:].max() <= 1e-6 * src["samples"].abs().max() and d[..., :3].max() > 1e-2
    # SAM: the tiny random SAM segments the decoded layout
    sam = SubjectSegmenter(build_tiny_sam(seed=0))
    with_sam = LayoutRetouchSampler().sample(
        reference=ref[:1], vanilla_model=vanilla, sam=sam, **kw
    )
    assert "Mask: SAM+CA" in with_sam["ui"]["text"][0].split("\n"), with_sam["ui"]["text"]
    assert torch.equal(with_sam["result"][1]["samples"], out[1]["samples"]), "stage 1 changed"
    print("SAM:", with_sam["ui"]["text"][0].split("\n")[1])
    # a subject mask bounds the retouch, not stage 1 (the layout is the one without it)
    subject = torch.zeros(64, 64)
    subject[:, 32:] = 1
    bounded = LayoutRetouchSampler().sample(
        reference=ref[:1], vanilla_model=vanilla, subject_mask=subject, **kw
    )["result"]
    assert torch.equal(bounded[1]["samples"], out[1]["samples"]), "stage 1 changed"
    d = (bounded[0]["samples"] - bounded[1]["samples"]).abs()
    print(
        "subject mask: outside max diff", d[..., :3].max().item(), "inside", d[..., 5:].max().item()
    )
    assert d[..., :3].max() <= 1e-6 * bounded[1]["samples"].abs().max() and d[..., 5:].max() > 1e-3
    lay = LayoutRetouchLayout().layout(
        model=model,
        clip=clip,
        prompt=kw["prompt"],
        negative_prompt="",
        concept_token="sks",
        class_phrase="dog",
        seed=1,
        steps=4,
        cfg=7.5,
        sampler_name="euler",
        scheduler="normal",
        lambda1=1,
        width=64,
        height=64,
        batch_size=1,
        vanilla_model=vanilla,
        scale_with_steps=False,
    )["result"][0]
    r = LayoutRetouchRetouch().retouch(
        layout=lay,
        reference=ref[:1],
        model=model,
        clip=clip,
        vae=vae,
        prompt=kw["prompt"],
        negative_prompt="",
        concept_token="sks",
        class_phrase="dog",
        steps=4,
        cfg=7.5,
        lambda2=1,
        mask_start=3,
        scale_with_steps=False,
    )["result"]
    print("split ok", tuple(r[0]["samples"].shape), r[3].replace("\n", " | "))
    assert torch.equal(a, plain()), "plain changed at the end"
    from lib_layout_retouch.unet.layers import attention_modules

    assert all(
        "forward" not in m.__dict__ for m in attention_modules(model.model.diffusion_model).values()
    )
print("SMOKE OK")
