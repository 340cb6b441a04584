"""The SDXL path of the nodes in-process with ComfyUI's own SDXL BaseModel (`encode_adm`: pooled
text + size terms as `y`), SDXL CLIP (CLIP-L + CLIP-G, full size, random, fp16) and sampler, around a
tiny SDXL-config UNet (≈ 3.2 GB, no server): the conditioning has SDXL's shapes and the Sampler
node runs to a finite retouched latent that differs from the layout. Full-size SDXL weights do not
fit the test machine; this is how far SDXL is covered inside ComfyUI. Run with ComfyUI's Python:

    <comfy-venv>/bin/python tests/host/comfy/smoke_inprocess_sdxl.py [--comfy-dir /work/host/comfy]
"""

import os
import sys

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
import torch

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(HERE))
import comfy_checkpoints as CC
import forge_checkpoints as FC
from comfy.ldm.models.autoencoder import AutoencoderKL

from layout_retouch_comfy.nodes import LayoutRetouchSampler

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
    context_dim=2048,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
    num_classes="sequential",
    use_temporal_attention=False,
    use_spatial_transformer=True,
    num_head_channels=-1,
    num_heads=2,
)
cfg = comfy.supported_models.SDXL(dict(UC))
cfg.unet_config.update(num_heads=2, num_head_channels=-1)
cfg.set_inference_dtype(torch.float32, None)
m = cfg.get_model({}, "")
torch.manual_seed(1)
g = torch.Generator().manual_seed(1)
CC._init(m.diffusion_model, torch)
FC._randomise(m.diffusion_model, torch, g)
with torch.no_grad():
    m.diffusion_model.out[-1].weight.mul_(0.1)
m.float()
model = comfy.model_patcher.ModelPatcher(
    m, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
)
clip = comfy.sd.CLIP(
    target=cfg.clip_target({}), embedding_directory=None, model_options={"dtype": torch.float16}
)
CC._init(clip.cond_stage_model, torch)
FC._randomise(clip.cond_stage_model, torch, g)
vae_m = AutoencoderKL(ddconfig=CC.VAE_CONFIG, embed_dim=4)
CC._init(vae_m, torch)
FC._randomise(vae_m, torch, g)
vae = comfy.sd.VAE(sd=vae_m.state_dict())
print("built SDXL-config", type(m).__name__, flush=True)
from lib_layout_retouch.adapters.comfy.sd import ComfyModel

cm = ComfyModel(model, clip, vae)
print("family", cm.family)
ref = torch.rand(1, 80, 96, 3)
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
    c = cm.conditioning(["a photo of sks dog"], cm.generation_size(64, 64))
    print(
        "cond",
        tuple(c["crossattn"].shape),
        tuple(c["vector"].shape),
        bool(torch.isfinite(c["crossattn"]).all()),
    )
    out = LayoutRetouchSampler().sample(reference=ref, **kw)["result"]
    assert c["crossattn"].shape == (1, 77, 2048) and c["vector"].shape == (1, 2816)
    assert torch.isfinite(c["crossattn"]).all() and torch.isfinite(c["vector"]).all()
    samples = out[0]["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()
    assert not torch.allclose(samples, out[1]["samples"], atol=1e-3), "the retouch changed nothing"
    print("SDXL sampler ok", (samples - out[1]["samples"]).abs().max().item())
print("SDXL SMOKE OK")
