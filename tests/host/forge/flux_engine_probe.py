"""Run with Forge's Python (tests/host/forge/test_forge_flux_engine.py does): load the tier's tiny Flux
through Forge's own loader (`backend.loader.forge_loader`, the tier's registration installed), wrap the
engine with the Forge host's Flux adapter (`lib_layout_retouch.adapters.forge.engine_family` must choose
`FORGE_FLUX`), and check it against Forge itself:

- velocity(x, σ) == (x − KModel.apply_model(x, σ))/σ (Forge's PredictionFlux);
- simple_sigmas == Forge's own "Simple" scheduler (modules/sd_schedulers.simple_scheduler);
- the conditioning equals the engine's get_learned_conditioning (T5 states, pooled CLIP-L, guidance);
- a full retouch (retouch.retouch: inversion of a photo encoded by Forge's VAE, the batched
  reference/layout/target transformer calls, the DiT editor) runs on Forge's transformer, the target
  differs from the layout, and afterwards no block is left patched and the transformer's output is
  bit-identical to before.

Prints one JSON object (the numbers) on the last line; exits non-zero on a failed check.
Usage: <forge-python> flux_engine_probe.py <forge dir> <tiny models root> <repo root>
"""

from __future__ import annotations

import json
import os
import sys


def main(forge_dir: str, models_root: str, repo_root: str) -> dict:
    sys.path.insert(0, repo_root)
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_models_extension")
    )
    os.chdir(forge_dir)
    sys.path.insert(0, forge_dir)
    sys.argv = [sys.argv[0], "--always-cpu", "--skip-python-version-check"]
    from modules import (
        paths,  # noqa: F401  (puts repositories/ on sys.path, as Forge does)
        shared_init,
    )

    shared_init.initialize()  # shared.opts (the text engines read the emphasis option)
    import tiny_registration
    import torch

    tiny_registration.install(os.path.join(models_root, "huggingface"))
    import k_diffusion.sampling  # noqa: F401  (sd_schedulers patches it)
    from backend import memory_management
    from backend.loader import forge_loader
    from modules.sd_schedulers import simple_scheduler

    from lib_layout_retouch import retouch as pl
    from lib_layout_retouch.adapters.forge import FORGE_FLUX, engine_family
    from lib_layout_retouch.dit.flux.blocks import dit_blocks
    from lib_layout_retouch.prompts import derive_prompts
    from lib_layout_retouch.retouch.editor import LAYOUT, TARGET
    from lib_layout_retouch.schedule import Schedule

    out = {}
    engine = forge_loader(
        os.path.join(models_root, "Stable-diffusion", "flux-personal.safetensors")
    )
    # the adapter the Forge host asks (hosts/forge.py), chosen from Forge's own engine
    assert engine_family(engine) is FORGE_FLUX, type(engine).__name__
    model = FORGE_FLUX.model(engine, load_model=memory_management.load_model_gpu)
    kmodel = engine.forge_objects.unet.model
    torch.set_grad_enabled(False)

    # 1. velocity vs Forge's denoised
    prompt = "a photo of sks dog on the beach"

    class Prompts(list):
        distilled_cfg_scale = 3.5

    forge_cond = engine.get_learned_conditioning(Prompts([prompt]))
    cond = model.conditioning([prompt], 3.5)
    for k in ("crossattn", "vector", "guidance"):
        assert torch.equal(cond[k].float(), forge_cond[k].float()), k
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 8, 8, generator=g)
    sigma = torch.tensor([0.7])
    v = model.velocity(x, sigma, cond)
    denoised = kmodel.apply_model(
        x,
        sigma,
        c_crossattn=forge_cond["crossattn"],
        y=forge_cond["vector"],
        guidance=forge_cond["guidance"],
        transformer_options={},
    )
    err = float(((x - denoised) / sigma - v).abs().max())
    out["velocity_max_err"] = err
    out["velocity_scale"] = float(v.abs().max())
    assert err <= 1e-5 * out["velocity_scale"], out

    # 2. σ schedule
    ours = model.schedule(8, (8, 8))
    forge = simple_scheduler(8, None, None, kmodel.predictor, "cpu").tolist()
    out["sigmas"] = [round(s, 6) for s in forge]
    got = [float(s) for s in ours.sigmas][::-1]  # FlowSchedule holds them ascending
    assert got == forge, (got, forge)

    # 3. a full retouch on Forge's transformer
    sys.path.insert(0, os.path.join(repo_root, "tests"))
    from paths import photo_tensor

    img = photo_tensor()
    ref = model.encode(img)
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    conds = pl.encode_prompts(model, prompts, "")
    subject = model.subject_tokens(prompts.personalized, ["sks", "dog"])
    layouts = 0.6 * torch.randn(1, 16, 8, 8, generator=g)
    before = model.velocity(layouts, torch.tensor([0.5]), conds.layout)
    settings = pl.RetouchSettings(
        schedule=Schedule.for_steps(8, lambda1=1, lambda2=2, mask_start=5, scale=False),
        guidance_scale=1.0,
        keep_trajectories=True,
    )
    res = pl.retouch(
        model,
        reference_latent=ref,
        layout_latents=layouts,
        conds=conds,
        subject_tokens=subject,
        settings=settings,
    )
    lay, tgt = res.trajectories[LAYOUT], res.trajectories[TARGET]
    out["subject_t5_rows"] = list(subject)
    out["transformer_calls"] = res.unet_calls
    out["target_vs_layout_final"] = float((tgt[-1] - lay[-1]).abs().max())
    out["copy_phase_diff"] = float((tgt[0] - lay[0]).abs().max())
    assert out["target_vs_layout_final"] > 1e-2 * float(lay[-1].abs().max()), out
    assert all("forward" not in b.__dict__ for b in dit_blocks(model.transformer).values())
    after = model.velocity(layouts, torch.tensor([0.5]), conds.layout)
    assert torch.equal(before, after), "the transformer is not restored after the retouch"
    image = model.decode(res.latents)
    out["decoded"] = list(image.shape)

    # 4. the glue's library entry: RetouchJob.retouch (what layout_retouch_webui/stage2.py calls)
    from PIL import Image

    from lib_layout_retouch import job as lr_job
    from lib_layout_retouch.params import LayoutRetouchParams

    photo = Image.fromarray(((img[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy())
    params = LayoutRetouchParams(
        enabled=True,
        reference_image=photo,
        personalization="lora",
        concept_token="sks",
        class_phrase="dog",
        lambda1=2,
        lambda2=3,
        mask_start=6,
        scale_with_steps=False,
    )
    job = lr_job.RetouchJob(
        params,
        prompt="a sks dog on the beach",
        negative_prompt="",
        steps=8,
        width=64,
        height=64,
        guidance_scale=1.0,
    )
    subject = model.subject_tokens(job.prompts.personalized, ["sks", "dog"])
    r1 = job.retouch(model, layouts, subject_tokens=subject, model_key="probe", cache=None)
    r2 = job.retouch(model, layouts, subject_tokens=subject, model_key="probe", cache=None)
    assert torch.equal(r1.latents, r2.latents), "two equal job runs differ"
    out["job_calls"] = r1.unet_calls
    out["job_mask"] = r1.mask_kind
    out["job_vs_layout"] = float((r1.latents - layouts).abs().max())
    out["infotext"] = job.infotext()
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
