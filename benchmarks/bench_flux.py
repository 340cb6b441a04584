"""Layout-and-Retouch on Flux.1 vs a plain Flux generation: time, transformer calls/rows, peak memory.

    python benchmarks/bench_retouch.py --config tiny-flux --device cpu --steps 6     # CPU / CI
    python benchmarks/bench_retouch.py --config flux --device cuda --dtype bf16     # GPU, 1024²

`tiny-flux`: tests/fixtures/flux.py's transformer with the tiny T5 and CLIP. `flux`: the full-size
Flux.1-dev architecture (19 + 38 blocks, width 3072, 24 heads; 11.9 B parameters) with random
weights, random fixed text states (T5: 512 × 4096, pooled CLIP: 768 — the encoders run once per
prompt and are not what is compared) and an 8× pooling stand-in VAE, at 1024² (4096 image tokens).

Runs (same steps T, distilled guidance 3.5, no real CFG, as Flux-dev is used):
- plain: T Euler steps, one row per call (Forge's Euler on Flux);
- LR paper: stage 1 (T Euler steps, λ1 of them with y_p⁻), the reference's and the layout's
  inversion and the retouch with the midpoint solver (2 calls per step, 3 rows);
- LR fast: Euler retouch (1 call per step), reference inversion cached (a second generation with
  the same photo), the layout path on stage 1's own trajectory (no layout inversion).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib_layout_retouch import retouch as pl
from lib_layout_retouch.dit import flow
from lib_layout_retouch.dit.flux.family import FluxFamily
from lib_layout_retouch.dit.flux.model import FluxModel
from lib_layout_retouch.prompts import derive_prompts
from lib_layout_retouch.schedule import Schedule
from tests.fixtures.flux import FLUX1_DEV, TinyFlux, TinyFluxVAE

PROMPT = "a sks dog surfing on the beach"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 1024**3


def build(config: str, device: torch.device, dtype: torch.dtype) -> tuple[FluxModel, tuple]:
    """(model, latent hw)."""
    if config == "tiny-flux":
        from tests.fixtures.flux import build_tiny_flux_model, make_tiny_t5_folder
        from tests.fixtures.sd1 import make_tiny_clip_folder

        tmp = tempfile.mkdtemp()
        model = build_tiny_flux_model(
            make_tiny_t5_folder(os.path.join(tmp, "t5")),
            make_tiny_clip_folder(os.path.join(tmp, "clip")),
        )
        model.transformer.to(device, dtype)
        return model, (8, 8)
    with torch.device(device):  # 11.9 B parameters: made on the device, never on the CPU
        transformer = TinyFlux(FLUX1_DEV).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0, 0.02)
    words: dict[str, int] = {}

    def tokenize(text):
        return [words.setdefault(w, len(words) + 1) for w in text.split()]

    def states(prompts, shape):
        out = []
        for p in prompts:
            g = torch.Generator(device="cpu").manual_seed(hash(p) % 2**31)
            out.append(torch.randn(shape, generator=g))
        return torch.stack(out).to(device, dtype)

    vae = TinyFluxVAE()
    model = FluxModel(
        transformer,
        encode_t5=lambda prompts: states(prompts, (512, 4096)),
        encode_clip=lambda prompts: states(prompts, (768,)),
        tokenize_t5=tokenize,
        vae_encode=lambda x: vae.encode(x.cpu()).to(device, dtype),
        vae_decode=lambda z: vae.decode(z.float().cpu()),
    )
    return model, (128, 128)


def cast(cond: dict, dtype) -> dict:
    return {k: (v.to(dtype) if k != "guidance" else v) for k, v in cond.items()}


def plain(model, noise, steps, cond):
    sampler = flow.FlowSampler(model.schedule(steps, noise.shape[-2:]))
    z = noise
    for s in range(1, steps + 1):
        z = sampler.step(z, model.velocity(z, sampler.time_of_step(s), cond), s)
    return z


def stage1(model, noise, schedule, cond_layout, cond):
    """Euler stage 1 (λ1 steps with y_p⁻, then y_p); returns the trajectory [z_T … z_0]."""
    sampler = flow.FlowSampler(model.schedule(schedule.steps, noise.shape[-2:]))
    traj, z = [noise], noise
    for s in range(1, schedule.steps + 1):
        c = cond_layout if s <= schedule.lambda1 else cond
        z = sampler.step(z, model.velocity(z, sampler.time_of_step(s), c), s)
        traj.append(z)
    return traj


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, hw = build(args.config, device, dtype)
    build_s = time.perf_counter() - t0
    prompts = derive_prompts(PROMPT, "sks", "dog")
    conds = pl.encode_prompts(model, prompts, "")
    for name in ("reference", "layout", "uncond", "target", "reference_empty", "layout_empty"):
        setattr(conds, name, cast(getattr(conds, name), dtype))
    cond_layout = cast(model.conditioning([prompts.layout]), dtype)
    subject = model.subject_tokens(prompts.personalized, ["sks", "dog"])
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = torch.randn(1, 16, *hw, generator=g).to(device, dtype)
    ref = (0.6 * torch.randn(1, 16, *hw, generator=g)).to(device, dtype)
    T = args.steps
    sched = Schedule.for_steps(T)
    calls = {"n": 0, "rows": 0}
    real_velocity = model.velocity

    def counted(x, sigma, cond):
        calls["n"] += 1
        calls["rows"] += x.shape[0]
        return real_velocity(x, sigma, cond)

    model.velocity = counted

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def lr(solver, cache, layout_source):
        model.family = FluxFamily(solver)
        traj = stage1(model, noise, sched, cond_layout, conds.layout)
        return pl.retouch(
            model,
            reference_latent=ref,
            layout_latents=traj[-1],
            conds=conds,
            subject_tokens=subject,
            settings=pl.RetouchSettings(schedule=sched, guidance_scale=1.0),
            layout_trajectory=traj if layout_source == "stage1" else None,
            cache=cache,
            reference_key=("bench-reference",),
        ).latents

    fast_cache = pl.InversionCache()
    runs = {
        "plain": lambda: plain(model, noise, T, conds.layout),
        "lr_paper": lambda: lr(flow.MIDPOINT, None, "inversion"),
        "lr_fast": lambda: lr(flow.EULER, fast_cache, "stage1"),
    }
    res = dict(config=args.config, device=str(device), dtype=args.dtype, steps=T, latent_hw=hw)
    res["build_s"] = build_s
    res["params_m"] = round(sum(p.numel() for p in model.transformer.parameters()) / 1e6, 1)
    with torch.no_grad():
        for name, fn in runs.items():
            for _ in range(args.warmup):
                fn()
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                calls.update(n=0, rows=0)
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t)
            res[f"{name}_s"] = statistics.median(times)
            res[f"{name}_calls"], res[f"{name}_rows"] = calls["n"], calls["rows"]
            res[f"{name}_peak_gib"] = (
                torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
            )
    res["ratio_paper"] = res["lr_paper_s"] / res["plain_s"]
    res["ratio_fast"] = res["lr_fast_s"] / res["plain_s"]
    return res


def format_table(res: dict) -> str:
    lines = [
        f"{res['config']} ({res['params_m']} M params) on {res['device']} {res['dtype']}, "
        f"T={res['steps']}, latent {res['latent_hw'][0]}×{res['latent_hw'][1]}"
    ]
    for name in ("plain", "lr_paper", "lr_fast"):
        peak = res[f"{name}_peak_gib"]
        lines.append(
            f"  {name:<9} {res[f'{name}_s']:8.3f} s  {res[f'{name}_calls']:4d} calls "
            f"{res[f'{name}_rows']:4d} rows" + (f"  peak {peak:.1f} GiB" if peak else "")
        )
    lines.append(f"  LR/plain: paper {res['ratio_paper']:.2f}×, fast {res['ratio_fast']:.2f}×")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=("tiny-flux", "flux"), default="tiny-flux")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args, _unknown = p.parse_known_args(argv)  # bench_retouch.py's other options do not apply
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = run(args)
    print(format_table(res))
    out = args.out or os.path.join(
        ROOT, "benchmarks", "results", f"{args.config}-{args.device}.json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(f"JSON: {out}")
    return res


if __name__ == "__main__":
    main()
