"""Fingerprints of the retouch on the tiny SD1, SDXL and Flux models, for restructurings that must
change no result: every configuration's latents, masks, maps, notes and call counts hashed to JSON.

    .venv/bin/python tools/retouch_fingerprints.py OUT.json          # before
    .venv/bin/python tools/retouch_fingerprints.py OUT2.json --compare OUT.json   # after

Exit status 1 (and the differing entries printed) when --compare finds a difference. Bit for bit:
both runs are on this machine, the same batch shapes and the same code paths."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from lib_layout_retouch import conditioning as C
from lib_layout_retouch import retouch as pl
from lib_layout_retouch.dit import flow
from lib_layout_retouch.dit.flux.family import FluxFamily
from lib_layout_retouch.dit.joint import SHARED, SHIFTED
from lib_layout_retouch.job import RetouchJob
from lib_layout_retouch.params import LayoutRetouchParams
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.unet.model import LdmModel
from tests.fixtures import sdxl as TS
from tests.fixtures.flux import build_tiny_flux_model, make_tiny_t5_folder
from tests.fixtures.sd1 import build_tiny_ldm, make_tiny_clip_folder
from tests.paths import DOG_PHOTO, VICO, photo_tensor


def digest(x) -> str:
    if x is None:
        return "None"
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        return f"{tuple(t.shape)}:{t.dtype}:" + hashlib.sha1(t.numpy().tobytes()).hexdigest()[:16]
    if isinstance(x, np.ndarray):
        return f"{x.shape}:" + hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]
    return repr(x)


def record(res) -> dict:
    out = {
        "latents": digest(res.latents),
        "masks": digest(res.masks),
        "ca_maps": digest(res.ca_maps),
        "mask_kind": res.mask_kind,
        "notes": list(res.notes),
        "calls": res.unet_calls,
        "rows": res.unet_rows,
        "cached": res.reference_cached,
    }
    if res.trajectories:
        out["trajectories"] = {k: [digest(z) for z in v] for k, v in res.trajectories.items()}
    return out


def sd1_cases(tmp: str) -> dict:
    clip = make_tiny_clip_folder(os.path.join(tmp, "clip"))
    ldm = build_tiny_ldm(clip, seed=0)
    vanilla = build_tiny_ldm(clip, seed=1).model.diffusion_model
    model = LdmModel(ldm)
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    conds = pl.encode_prompts(model, prompts, "")
    from lib_layout_retouch.prompts import subject_token_positions

    subject = subject_token_positions(model.tokenize, prompts.personalized, ["sks", "dog"])
    ref = model.encode(photo_tensor())
    layouts = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    sched = Schedule.for_steps(6, lambda1=2, lambda2=2, mask_start=4, scale=False)

    def run(**kw):
        fields = pl.RetouchSettings.__dataclass_fields__
        settings = pl.RetouchSettings(
            schedule=kw.pop("schedule", sched), **{k: kw.pop(k) for k in list(kw) if k in fields}
        )
        return record(
            pl.retouch(
                model,
                reference_latent=kw.pop("ref", ref),
                layout_latents=kw.pop("layouts", layouts),
                conds=conds,
                subject_tokens=subject,
                settings=settings,
                **kw,
            )
        )

    cases = {
        "sd1 retouch": run(keep_trajectories=True),
        "sd1 retouch no fast path": run(skip_equal_target=False),
        "sd1 retouch sequential": run(sequential=True),
        "sd1 retouch light, no reset": run(layer_preset="light", reset_reference=False),
        "sd1 retouch cfg 1": run(guidance_scale=1.0),
        "sd1 two references": run(ref=torch.cat([ref, ref.flip(-1)]), reference_keys=[None, None]),
    }
    u = torch.zeros(1, 1, 8, 8)
    u[..., 2:6, 1:7] = 1
    cases["sd1 inpaint"] = run(user_mask=u)
    kv = pl.ReferenceAttentionCache(max_bytes=1 << 30)
    inv = pl.InversionCache()
    first = run(reference_key=("dog", "m"), cache=inv, kv_cache=kv)
    second = run(reference_key=("dog", "m"), cache=inv, kv_cache=kv)
    cases["sd1 kv cache first"], cases["sd1 kv cache hit"] = first, second
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    settings = pl.RetouchSettings(schedule=sched)
    for name, kw in (
        ("sd1 generate TI", {}),
        ("sd1 generate dreambooth", {"vanilla_unet": vanilla}),
        ("sd1 generate dreambooth stage1", {"vanilla_unet": vanilla, "layout_source": "stage1"}),
    ):
        out = pl.generate(
            model,
            prompts=prompts,
            reference_image=photo_tensor(),
            noise=noise,
            settings=settings,
            **kw,
        )
        cases[name] = {
            **record(out.retouch),
            "images": digest(out.images),
            "layout": digest(out.layout_latents),
        }
    # the job: parameters → prompts, references (two photos), conditioning, retouch
    photos = [Image.open(DOG_PHOTO), Image.open(VICO / "brown_dog" / "01.jpg")]
    params = LayoutRetouchParams(
        enabled=True,
        reference_image=photos,
        personalization="lora",
        concept_token="sks",
        class_phrase="dog",
        lambda1=2,
        lambda2=2,
        mask_start=4,
        scale_with_steps=False,
    )
    job = RetouchJob(
        params,
        prompt="a sks dog on the beach",
        negative_prompt="blurry",
        steps=6,
        width=64,
        height=64,
        guidance_scale=5.0,
    )
    res = job.retouch(
        model, layouts, subject_tokens=subject, model_key="tiny", cache=None, kv_cache=None
    )
    cases["sd1 job two photos"] = record(res)
    return cases


def sdxl_cases(tmp: str) -> dict:
    xl = TS.build("ldm", os.path.join(tmp, "xl-clip"), seed=0)
    vanilla = TS.build("ldm", os.path.join(tmp, "xl-clip2"), seed=1)
    adapter = LdmModel(xl)
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    from lib_layout_retouch.prompts import subject_token_positions

    sizes = [C.SizeTerms((96, 64), (16, 0), (64, 64)), C.SizeTerms((64, 80), (0, 8), (64, 64))]
    subject = subject_token_positions(adapter.tokenize, prompts.personalized, ["sks", "dog"])
    ref = adapter.encode(photo_tensor())
    layouts = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    sched = Schedule.for_steps(4, lambda1=1, lambda2=2, mask_start=3, scale=False)
    cases = {}
    for name, rs, r in (
        ("sdxl retouch", sizes[0], ref),
        ("sdxl two references", sizes, torch.cat([ref, ref.flip(-1)])),
    ):
        conds = pl.encode_prompts(adapter, prompts, "", image_size=(64, 64), reference_size=rs)
        res = pl.retouch(
            adapter,
            reference_latent=r,
            layout_latents=layouts,
            conds=conds,
            subject_tokens=subject,
            settings=pl.RetouchSettings(schedule=sched),
            reference_keys=[None] * r.shape[0],
        )
        cases[name] = record(res)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = pl.generate(
        adapter,
        prompts=prompts,
        reference_image=photo_tensor(),
        noise=noise,
        settings=pl.RetouchSettings(schedule=sched),
        vanilla_unet=vanilla.model.diffusion_model,
        reference_size=sizes[0],
    )
    cases["sdxl generate dreambooth"] = {
        **record(out.retouch),
        "images": digest(out.images),
        "layout": digest(out.layout_latents),
    }
    return cases


def flux_cases(tmp: str) -> dict:
    t5 = make_tiny_t5_folder(os.path.join(tmp, "t5"))
    clip = make_tiny_clip_folder(os.path.join(tmp, "fclip"))
    model = build_tiny_flux_model(t5, clip)
    prompts = derive_prompts("a sks dog on the beach", "sks", "dog")
    conds = pl.encode_prompts(model, prompts, "")
    subject = model.subject_tokens(prompts.personalized, ["sks", "dog"])
    ref = model.encode(photo_tensor())
    layouts = 0.6 * torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    sched = Schedule.for_steps(6, lambda1=1, lambda2=2, mask_start=4, scale=False)
    cases = {}

    @contextlib.contextmanager
    def family(**kw):
        old = model.family
        model.family = FluxFamily(
            kw.get("solver", flow.MIDPOINT),
            kw.get("reference_rope", SHIFTED),
            kw.get("with_target_tokens", False),
        )
        try:
            yield
        finally:
            model.family = old

    def run(fam=None, **kw):
        fields = pl.RetouchSettings.__dataclass_fields__
        settings = pl.RetouchSettings(
            schedule=sched,
            guidance_scale=kw.pop("guidance_scale", 1.0),
            **{k: kw.pop(k) for k in list(kw) if k in fields},
        )
        with family(**(fam or {})):
            return record(
                pl.retouch(
                    model,
                    reference_latent=kw.pop("ref", ref),
                    layout_latents=kw.pop("layouts", layouts),
                    conds=conds,
                    subject_tokens=subject,
                    settings=settings,
                    **kw,
                )
            )

    cases["flux midpoint shifted"] = run(keep_trajectories=True)
    cases["flux euler shared target tokens"] = run(
        {"solver": flow.EULER, "reference_rope": SHARED, "with_target_tokens": True}
    )
    cases["flux cfg 3"] = run(guidance_scale=3.0)
    cases["flux sequential"] = run({"solver": flow.EULER}, sequential=True)
    u = torch.zeros(1, 1, 8, 8)
    u[..., 2:6, 2:8] = 1
    cases["flux two references inpaint"] = run(
        ref=torch.cat([ref, ref.flip(-1)]), reference_keys=[None, None], user_mask=u
    )
    kv = pl.ReferenceAttentionCache(max_bytes=1 << 30)
    inv = pl.InversionCache()
    cases["flux euler kv first"] = run(
        {"solver": flow.EULER}, reference_key=("dog", "f"), cache=inv, kv_cache=kv
    )
    cases["flux euler kv hit"] = run(
        {"solver": flow.EULER}, reference_key=("dog", "f"), cache=inv, kv_cache=kv
    )
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    out = pl.generate(
        model,
        prompts=prompts,
        reference_image=photo_tensor(),
        noise=noise,
        settings=pl.RetouchSettings(schedule=sched, guidance_scale=1.0),
    )
    cases["flux generate"] = {
        **record(out.retouch),
        "images": digest(out.images),
        "layout": digest(out.layout_latents),
    }
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--compare")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one reduction order, whatever the machine's core count
    with tempfile.TemporaryDirectory() as tmp:
        cases = {**sd1_cases(tmp), **sdxl_cases(tmp), **flux_cases(tmp)}
    with open(args.out, "w") as f:
        json.dump(cases, f, indent=1, sort_keys=True)
    print(f"{len(cases)} configurations → {args.out}")
    if not args.compare:
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    bad = [k for k in sorted(set(before) | set(cases)) if before.get(k) != cases.get(k)]
    for k in bad:
        print(f"DIFFERS: {k}\n  before {before.get(k)}\n  after  {cases.get(k)}")
    print("bit-identical" if not bad else f"{len(bad)} of {len(cases)} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
