"""Speed and memory of Layout-and-Retouch against a plain generation, on one device, in one run.

    python benchmarks/bench_retouch.py --config sd15 --device cuda --dtype fp16      # GPU
    python benchmarks/bench_retouch.py --config sdxl --device cuda --dtype fp16      # GPU, SDXL 1024² (needs sgm)
    python benchmarks/bench_retouch.py --config tiny --device cpu --dtype fp32 --steps 8   # CPU / CI

Models are built from ldm configs with random weights (nothing is downloaded): the SD1.5
v1-inference UNet and VAE ("sd15", 512²) or a narrow model of the same classes ("tiny", 64²).
There is no text encoder: the LatentDiffusion gets ldm's "__is_unconditional__" cond stage (with
`force_null_conditioning`, so the UNet still cross-attends), and `BenchModel.conditioning` hands the
pipeline a fixed random (1, 77, context_dim) tensor per prompt, as CLIP would. A second UNet with
other random weights is DreamBooth's vanilla UNet (it shares the VAE; no text encoder to share).

Measured, for batch 1 and batch 4 (one reference), each as warm-up run(s) then timed runs (median):
  plain     the personalized model alone, T-step DDIM with CFG + VAE decode (stage-1 code, λ1 = 0),
            with the vanilla UNet off the device (what a user without the extension has loaded);
  lr_paper  `pipeline.generate` with the paper's settings (λ1 = 5, λ2 = 10, mask from 31 at T = 50,
            scaled for other T), layout inverted, the reference inversion cached (warm cache);
  lr_fast   the same with layout_source="stage1" (layout path = the stage-1 trajectory);
  hook      one UNet forward at the retouch batch 2·(1+2N) rows, inside `patched_attention` with
            the retouch editor in the identity phase (reference K/V in the decoder layers), against
            the same forward without the hooks (median of interleaved runs).
Peak memory is torch.cuda.max_memory_allocated, reset before each timed run (null on the CPU).
On CUDA, one more plain and one L&R run go under torch.cuda.set_sync_debug_mode("warn") to list
the lines that make the host wait for the GPU (`sync_points`); --profile adds a torch.profiler run.
A table goes to stdout; JSON to benchmarks/results/<card-slug>-<config>.json (CPU runs:
<...>.tmp.json, git-ignored) or --out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import re
import statistics
import sys
import time
import zlib
from collections import defaultdict
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

from lib_layout_retouch import conditioning as lr_cond
from lib_layout_retouch import masks as lr_masks
from lib_layout_retouch import retouch as pl
from lib_layout_retouch import stage1
from lib_layout_retouch.errors import Interrupted
from lib_layout_retouch.prompts import SubjectWords, derive_prompts
from lib_layout_retouch.retouch.editor import LAYOUT, REFERENCE, TARGET, RowPlan, StepState
from lib_layout_retouch.schedule import Schedule
from lib_layout_retouch.subjects import MAX_SUBJECTS, derive_subject_prompts, subject_rows
from lib_layout_retouch.unet.attention import RetouchAttention, patched_attention
from lib_layout_retouch.unet.layers import layer_table_for
from lib_layout_retouch.unet.model import LdmModel
from tests.fixtures.nets import (  # (ldm zero-inits; random ε is rough)
    LDM_ADM,
    LDM_CONTEXT,
    TinySdxlLike,
    ldm_sdxl_unet,
    reinit_zero_weights,
    sgm_status,
    tame_output,
)
from tests.fixtures.sd1 import (
    latent_diffusion_config,
    tiny_ldm_config,
    tiny_vae_ddconfig,
)
from tests.fixtures.sdxl import sdxl_base_unet_config

GIB = float(1 << 30)
# The goals it checks (same run, same card, SD1.5, 512², T=50, cached reference): L&R fast ≤ 2.5×
# and paper ≤ 3.5× a plain generation, ≤ 2.5 GiB extra peak memory, hooks ≤ 5% over a plain UNet forward.
GOALS = {"ratio_fast": 2.5, "ratio_paper": 3.5, "lr_extra_peak_gib": 2.5, "hook_overhead": 1.05}


def sdxl_goals(second_unet_gib: float) -> dict:
    """SDXL's goals: fast ≤ 2.5× plain; extra peak ≤ DreamBooth's second UNet + 1 GiB."""
    return {
        "ratio_fast": 2.5,
        "lr_extra_peak_gib": round(second_unet_gib + 1.0, 3),
        "hook_overhead": 1.05,
    }


REQUIRED_KEYS = (
    "plain_s",
    "lr_paper_s",
    "lr_fast_s",
    "ratio_paper",
    "ratio_fast",
    "plain_peak_gib",
    "lr_peak_gib",
    "hook_overhead",
    "unet_calls",
)

PROMPT, CONCEPT, CLASS = "a photo of sks dog jumping over the fence", "sks", "dog"
NEGATIVE = ""
# Several subjects (--subjects 1 2): K subjects in one prompt, each with its own concept token and
# reference photo (one multi-concept DreamBooth checkpoint: no per-subject weights). Subject 1 is
# the one-subject run's dog.
SUBJECT_WORDS = (("sks", "dog"), ("zwx", "cat"), ("pqv", "teddy bear"))
SUBJECT_PROMPTS = {
    2: "a photo of sks dog and zwx cat jumping over the fence",
    3: "a photo of sks dog, zwx cat and pqv teddy bear jumping over the fence",
}
# Goal (several subjects): a two-subject L&R image ≤ 1.3× the one-subject one, same run and card.
SUBJECTS_GOAL = 1.3

# ---------------------------------------------------------------------------------------------------
# Model configs (ldm's own classes; random weights)


# The SD VAE's architecture (SD1.x and SDXL alike; only the weights differ).
SD_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def sd15_config() -> dict:
    """configs/stable-diffusion/v1-inference.yaml (SD1.4/1.5) at 512², use_checkpoint off
    (inference), no text encoder."""
    unet = {
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "attention_resolutions": [4, 2, 1],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4],
        "num_heads": 8,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 768,
        "use_checkpoint": False,
        "legacy": False,
    }
    return latent_diffusion_config(unet, dict(SD_VAE_DDCONFIG), 512, clip_folder=None)


def tiny_config() -> dict:
    """The tests' tiny SD1-architecture model (tests/fixtures/sd1.py: two UNet levels, 2 heads,
    64²), without its text encoder."""
    return tiny_ldm_config(clip_folder=None)


def sdxl_config() -> dict:
    """sd_xl_base.yaml's UNet (sgm's UNetModel: depth 0/2/10, 2048-wide context, 2816-wide vector)
    at 1024². sgm is not on PyPI: set LR_SGM_DIR to a generative-models checkout."""
    return {
        "family": "sdxl",
        "image_size": 1024,
        "context_dim": 2048,
        "adm": 2816,
        "unet": "sgm-base",
        "ddconfig": dict(SD_VAE_DDCONFIG),
    }


def tiny_sdxl_config() -> dict:
    """The tiny SDXL's "ldm" build (tests/fixtures/nets.py, as the tests build it): ldm's UNet in
    SDXL configuration (label_emb, depth 2), 64²."""
    return {
        "family": "sdxl",
        "image_size": 64,
        "context_dim": LDM_CONTEXT,
        "adm": LDM_ADM,
        "unet": "ldm-tiny",
        "ddconfig": tiny_vae_ddconfig(),
    }


CONFIGS: dict[str, Callable[[], dict]] = {
    "sd15": sd15_config,
    "tiny": tiny_config,
    "sdxl": sdxl_config,
    "tiny-sdxl": tiny_sdxl_config,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def image_size_of(cfg: dict) -> int:
    return (
        int(cfg["image_size"])
        if cfg.get("family") == "sdxl"
        else int(cfg["params"]["image_size"]) * 8
    )


def context_dim_of(cfg: dict) -> int:
    return (
        int(cfg["context_dim"])
        if cfg.get("family") == "sdxl"
        else int(cfg["params"]["unet_config"]["params"]["context_dim"])
    )


def _sdxl_unet(cfg: dict) -> torch.nn.Module:
    if cfg["unet"] == "sgm-base":
        ok, why = sgm_status()
        if not ok:
            raise SystemExit(f"--config sdxl needs sgm: {why}")
        from sgm.modules.diffusionmodules.openaimodel import UNetModel

        return UNetModel(**sdxl_base_unet_config())
    return ldm_sdxl_unet()


def _build_sdxl(cfg: dict, seed: int, vanilla: bool):
    """An SDXL-family model object as the library sees A1111's (no text encoders: BenchModel gives
    the conditioning), and a second UNet for DreamBooth mode."""
    from ldm.models.autoencoder import AutoencoderKL

    torch.manual_seed(seed)
    unet = _sdxl_unet(cfg)
    vae = AutoencoderKL(
        ddconfig=cfg["ddconfig"], lossconfig={"target": "torch.nn.Identity"}, embed_dim=4
    )
    model = TinySdxlLike(unet, vae, conditioner=torch.nn.Module())
    if cfg["unet"] == "sgm-base":
        model.model.depth = None  # sgm's SpatialTransformer takes one context tensor
    _randomized(model, model.model.diffusion_model, seed)
    vanilla_unet = None
    if vanilla:
        torch.manual_seed(seed + 1)
        vanilla_unet = _sdxl_unet(cfg)
        _randomized(vanilla_unet, vanilla_unet, seed + 1)
    return model, vanilla_unet


def _randomized(module: torch.nn.Module, unet: torch.nn.Module, seed: int) -> None:
    """Re-draw ldm's zero-initialised weights, tame the UNet's output conv, eval mode, no grad."""
    reinit_zero_weights(module, torch.Generator().manual_seed(seed))
    tame_output(unet)
    module.eval().requires_grad_(False)


def build_models(config: str, seed: int = 0, vanilla: bool = True, quiet: bool = True):
    """(LatentDiffusion, vanilla UNet or None), float32, on the CPU, eval mode, no grad."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    cfg = CONFIGS[config]()
    sink = io.StringIO()
    if cfg.get("family") == "sdxl":
        with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
            return _build_sdxl(cfg, seed, vanilla)
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        torch.manual_seed(seed)
        ldm = instantiate_from_config(OmegaConf.create(cfg))
        _randomized(ldm, ldm.model.diffusion_model, seed)
        vanilla_unet = None
        if vanilla:
            torch.manual_seed(seed + 1)
            vanilla_unet = instantiate_from_config(OmegaConf.create(cfg["params"]["unet_config"]))
            _randomized(vanilla_unet, vanilla_unet, seed + 1)
    return ldm, vanilla_unet


# ---------------------------------------------------------------------------------------------------
# Attention baseline


def _sdpa_cross_attention_forward(self, x, context=None, mask=None, **kwargs):
    """ldm CrossAttention through F.scaled_dot_product_attention (as A1111's "sdp" optimisation)."""
    h = self.heads
    ctx = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.reshape(b, 1, 1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _sdpa_attnblock_forward(self, x):
    """ldm's VAE AttnBlock through SDPA (A1111's sdp_attnblock_forward)."""
    h_ = self.norm(x)
    q, k, v = self.q(h_), self.k(h_), self.v(h_)
    b, c, hh, ww = q.shape
    q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return x + self.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


@contextlib.contextmanager
def attention_mode(mode: str):
    """Which attention the UNet/VAE's *unhooked* layers use, patched at class level and restored.

    ldm's CrossAttention computes softmax(QKᵀ) with explicit einsums, in float32 (ATTN_PRECISION):
    at 512² with the retouch batch its 64×64 self-attention alone materialises 18·8·4096² floats
    (~10 GiB) and runs several times slower than SDPA. Nobody runs SD1.5 like that on a GPU — A1111
    replaces these forwards by SDPA ("sdp", the automatic choice without xformers) — and the
    retouch editor's own layers use SDPA, so comparing against einsum attention would make both the
    plain baseline and the unedited layers of the L&R run slow and the ratios meaningless. "sdpa"
    (default) therefore patches CrossAttention (and MemoryEfficientCrossAttention, used when
    xformers is importable) and the VAE's AttnBlock the way A1111 does; the hooked wrapper falls
    back to the same class forward (`type(module).forward`), so hooked and plain differ only by the
    editor's work. "ldm" leaves ldm's code as it is.
    """
    if mode == "ldm":
        yield
        return
    if mode != "sdpa":
        raise ValueError(f"unknown attention mode {mode!r}")
    from ldm.modules import attention as la
    from ldm.modules.diffusionmodules import model as lm

    saved = []
    for cls, fwd in (
        (getattr(la, "CrossAttention", None), _sdpa_cross_attention_forward),
        (getattr(la, "MemoryEfficientCrossAttention", None), _sdpa_cross_attention_forward),
        (getattr(lm, "AttnBlock", None), _sdpa_attnblock_forward),
        (getattr(lm, "MemoryEfficientAttnBlock", None), _sdpa_attnblock_forward),
    ):
        if cls is not None:
            saved.append((cls, cls.__dict__["forward"]))
            cls.forward = fwd
    try:
        yield
    finally:
        for cls, fwd in saved:
            cls.forward = fwd


# ---------------------------------------------------------------------------------------------------
# The model the pipeline sees


class PhaseClock:
    """Wall time split into named phases. `close(name)` synchronises the device and adds the time
    since the previous mark to `name` — and, with a `counter` (UNetCounter), the UNet calls and
    rows since then; marks are placed only at phase ends (a handful per run), so the step loops
    keep running asynchronously."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.rows: dict[str, int] = defaultdict(int)
        self.counter = None
        self.last = 0.0
        self._counted = (0, 0)
        # This process's CPU seconds per phase: on a CPU shared with other work, wall time follows
        # the others' load and CPU time does not (with one torch thread it is the compute itself).
        self.cpu: dict[str, float] = defaultdict(float)
        self.cpu_last = 0.0

    def _counts(self) -> tuple[int, int]:
        return (self.counter.calls, self.counter.rows) if self.counter is not None else (0, 0)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self.totals = defaultdict(float)
        self.calls, self.rows = defaultdict(int), defaultdict(int)
        self._counted = self._counts()
        self.cpu = defaultdict(float)
        self.cpu_last = time.process_time()
        self.last = time.perf_counter()

    def close(self, name: str) -> float:
        self.sync()
        now = time.perf_counter()
        self.totals[name] += now - self.last
        self.last = now
        cpu = time.process_time()
        self.cpu[name] += cpu - self.cpu_last
        self.cpu_last = cpu
        counted = self._counts()
        if counted[0] != self._counted[0]:
            self.calls[name] += counted[0] - self._counted[0]
            self.rows[name] += counted[1] - self._counted[1]
        self._counted = counted
        return now

    def progress(self, phase: str, s: int, total: int) -> None:
        """The pipeline's progress callback: a phase ends at its last step."""
        if s == total:
            self.close(PHASE_NAMES.get(phase, phase))


PHASE_NAMES = {
    "layout": "stage1",
    "reference inversion": "reference_inversion",
    "layout inversion": "layout_inversion",
    "retouch": "retouch",
}
PHASE_ORDER = ("stage1", "reference_inversion", "layout_inversion", "retouch", "vae", "other")


class BenchModel(LdmModel):
    """LdmModel without a text encoder: a fixed random conditioning per prompt (made once and kept,
    so the benchmark does not time a text encoder; A1111's CLIP costs ~5 ms per call), and a
    whitespace tokenizer for the subject token rows. VAE calls are timed as their own phase."""

    def __init__(
        self,
        ldm,
        autocast,
        context_dim: int,
        tokens: int = 77,
        clock: Optional[PhaseClock] = None,
        vector_dim: Optional[int] = None,
    ):
        super().__init__(ldm, autocast)
        self.context_dim = context_dim
        self.vector_dim = vector_dim  # SDXL: the pooled-text/size vector's width
        self.tokens = tokens
        self.clock = clock
        self._conds: dict[str, torch.Tensor] = {}

    def _cond(self, prompt: str) -> torch.Tensor:
        c = self._conds.get(prompt)
        if c is None:
            g = torch.Generator().manual_seed(zlib.crc32(prompt.encode("utf-8")))
            c = torch.randn(1, self.tokens, self.context_dim, generator=g).to(self.device)
            self._conds[prompt] = c
        return c

    def conditioning(self, prompts, size=None, *, negative=False):
        tokens = torch.cat([self._cond(p) for p in prompts])
        if not self.vector_dim:
            return tokens
        g = torch.Generator().manual_seed(zlib.crc32(repr((list(prompts), size)).encode("utf-8")))
        return {
            "crossattn": tokens,
            "vector": torch.randn(len(prompts), self.vector_dim, generator=g).to(self.device),
        }

    def tokenize(self, text: str) -> list[int]:
        return [zlib.crc32(w.encode("utf-8")) % 49406 for w in text.split()]

    def _timed(self, fn, *args):
        if self.clock is None:
            return fn(*args)
        self.clock.close("other")
        out = fn(*args)
        self.clock.close("vae")
        return out

    def encode(self, images):
        return self._timed(super().encode, images)

    def decode(self, latents):
        return self._timed(super().decode, latents)


class UNetCounter:
    """Counts UNet calls and batch rows (a forward pre-hook on each UNet; ~µs per call)."""

    def __init__(self, unets):
        self.calls = 0
        self.rows = 0
        self._handles = [u.register_forward_pre_hook(self._hook) for u in unets if u is not None]

    def _hook(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])

    def reset(self) -> None:
        self.calls = self.rows = 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------
# The measured runs


def plain_generate(
    model: BenchModel, noise: torch.Tensor, steps: int, guidance: float, progress
) -> torch.Tensor:
    """A plain T-step DDIM CFG image: the stage-1 code with λ1 = 0 (personalized model throughout)."""
    schedule = Schedule.for_steps(steps, lambda1=0, lambda2=0, mask_start=steps + 1, scale=False)
    sampler = model.family.sampler(model, steps, tuple(noise.shape[-2:]))
    c = model.conditioning([PROMPT, NEGATIVE])
    cond, uncond = lr_cond.rows(c, slice(0, 1)), lr_cond.rows(c, slice(1, 2))
    traj = stage1.sample_step_blended(
        sampler, model, schedule, cond, cond, uncond, noise, guidance, progress=progress
    )
    return model.decode(traj[-1])


def measure(
    fn: Callable[[], object], clock: PhaseClock, counter: UNetCounter, warmup: int, repeats: int
) -> dict:
    """Warm-up runs, then timed runs: median seconds, peak memory over the timed runs, the phases
    of the median run, UNet calls/rows of one run, and what the last run returned."""
    return measure_interleaved({"run": fn}, clock, counter, warmup, repeats)["run"]


def measure_interleaved(
    fns: dict, clock: PhaseClock, counter: UNetCounter, warmup: int, repeats: int
) -> dict:
    """`measure` for several runs at once, their timed runs interleaved (a, b, a, b, …) after
    every warm-up, so that a load that changes over the minutes (a shared CPU) hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    timed: dict = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            timed[key].append(_timed_run(fn, clock, counter))
    return {key: _median_run(runs) for key, runs in timed.items()}


def _timed_run(fn, clock: PhaseClock, counter: UNetCounter) -> dict:
    """One timed run: seconds, phases (time, calls, rows), peak memory, UNet calls and rows."""
    counter.reset()
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock.start()
    t0 = clock.last
    out = fn()
    t1 = clock.close("other")
    return {
        "s": t1 - t0,
        "phases": dict(clock.totals),
        "cpu": dict(clock.cpu),
        "calls": dict(clock.calls),
        "rows": dict(clock.rows),
        "peak": torch.cuda.max_memory_allocated() / GIB if clock.cuda else None,
        "unet_calls": counter.calls,
        "unet_rows": counter.rows,
        "out": out,
    }


def _median_run(runs: list) -> dict:
    """The figures of a run's timed repeats: the median time, the median run's phases."""
    mid = sorted(range(len(runs)), key=lambda i: runs[i]["s"])[(len(runs) - 1) // 2]
    m, peaks = runs[mid], [r["peak"] for r in runs if r["peak"] is not None]
    return {
        "s": statistics.median(r["s"] for r in runs),
        "runs_s": [r["s"] for r in runs],
        "cpu_s": statistics.median(sum(r["cpu"].values()) for r in runs),
        "phases_s": {k: m["phases"].get(k, 0.0) for k in PHASE_ORDER if k in m["phases"]},
        "phases_cpu_s": {k: m["cpu"].get(k, 0.0) for k in PHASE_ORDER if k in m["cpu"]},
        "phase_calls": {k: m["calls"][k] for k in PHASE_ORDER if k in m["calls"]},
        "phase_rows": {k: m["rows"][k] for k in PHASE_ORDER if k in m["rows"]},
        "peak_gib": max(peaks) if peaks else None,
        "unet_calls": runs[-1]["unet_calls"],
        "unet_rows": runs[-1]["unet_rows"],
        "out": runs[-1]["out"],
    }


def hook_overhead(
    model: BenchModel,
    n: int,
    latent_hw: tuple[int, int],
    clock: PhaseClock,
    repeats: int,
    blend: bool,
    seed: int = 0,
) -> dict:
    """One UNet forward at the three-path batch 2·(1+2n), hooked (retouch editor, identity phase,
    reference layers active; with `blend`, also the mask blend of steps ≥ mask start) vs plain.
    Interleaved, median of `repeats` each after 3 warm-ups."""
    device = model.device
    g = torch.Generator().manual_seed(seed)
    plan = RowPlan.build([(REFERENCE, 1), (LAYOUT, n), (TARGET, n)])
    rows = plan.batch
    x = torch.randn(rows, 4, *latent_hw, generator=g).to(device)
    c = torch.randn(rows, 77, model.context_dim, generator=g).to(device)
    if model.vector_dim:
        c = {"crossattn": c, "vector": torch.randn(rows, model.vector_dim, generator=g).to(device)}
    t = torch.full((rows,), 501, device=device, dtype=torch.long)
    table = layer_table_for(model.unet)
    editor = RetouchAttention(table, subject_tokens=[2, 3], latent_hw=latent_hw)
    layer_masks = None
    if blend:
        m = torch.rand(n, *latent_hw, generator=g).to(device)
        layer_masks = lr_masks.LayerMasks(m, latent_hw)
    editor.begin_step(StepState(plan, paint_identity=True, blend=blend, masks=layer_masks))

    def timed(fn) -> float:
        clock.sync()
        t0 = time.perf_counter()
        fn()
        clock.sync()
        return time.perf_counter() - t0

    def forward():
        return model.eps(x, t, c)

    plain_t, hooked_t = [], []
    for _ in range(3):
        forward()
    with patched_attention(model.unet, editor):
        for _ in range(3):
            forward()
    for _ in range(repeats):  # interleaved, so clock drift and thermals hit both alike
        plain_t.append(timed(forward))
        with patched_attention(model.unet, editor):
            hooked_t.append(timed(forward))
    p, h = statistics.median(plain_t), statistics.median(hooked_t)
    plain_k = count_kernels(forward)
    with patched_attention(model.unet, editor):
        hooked_k = count_kernels(forward)
    return {
        "rows": rows,
        "plain_s": p,
        "hooked_s": h,
        "ratio": h / p,
        "layer_table": table.name,
        "reference_layers": len(table.reference_layers),
        "blend_layers": len(table.blend_layers),
        "plain_kernels": sum(plain_k.values()),
        "hooked_kernels": sum(hooked_k.values()),
        "extra_kernels": {
            k: hooked_k[k] - plain_k.get(k, 0)
            for k in sorted(hooked_k)
            if hooked_k[k] != plain_k.get(k, 0)
        },
    }


def count_kernels(fn) -> dict:
    """aten ops that compute (views and other aliasing ops left out) in one call of `fn`, by name:
    a device-independent measure of what the hooks add — on a launch-bound GPU each is a launch."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns
            aliasing = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
            if not aliasing:
                self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    counter = _Count()
    with counter:
        fn()
    return dict(counter.ops)


def reference_image(size: int, seed: int = 1) -> torch.Tensor:
    """A smooth (1, 3, H, W) image in [-1, 1]: low-frequency noise, like a photo's layout."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------
# Reporting


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    return f"CPU {proc} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out(card: str, config: str, device: torch.device) -> str:
    name = "cpu" if device.type != "cuda" else slug(card)
    suffix = ".json" if device.type == "cuda" else ".tmp.json"  # only GPU results are committed
    return os.path.join(ROOT, "benchmarks", "results", f"{name}-{config}{suffix}")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def summarize(per: dict) -> dict:
    """The figures of one batch size from its measurements."""
    plain, paper, fast = per["plain"], per["lr_paper"], per["lr_fast"]
    d = {
        "batch": per["batch"],
        "plain_s": plain["s"],
        "lr_paper_s": paper["s"],
        "lr_fast_s": fast["s"],
        "ratio_paper": _ratio(paper["s"], plain["s"]),
        "ratio_fast": _ratio(fast["s"], plain["s"]),
        "plain_peak_gib": plain["peak_gib"],
        "lr_peak_gib": paper["peak_gib"],
        "lr_fast_peak_gib": fast["peak_gib"],
        "lr_extra_peak_gib": (
            None if paper["peak_gib"] is None else paper["peak_gib"] - plain["peak_gib"]
        ),
        "hook_overhead": per["hook"]["ratio"],
        "hook_overhead_blend": per["hook_blend"]["ratio"],
        "hook": {"identity": per["hook"], "identity_blend": per["hook_blend"]},
        "unet_calls": {k: per[k]["unet_calls"] for k in ("plain", "lr_paper", "lr_fast")},
        "unet_rows": {k: per[k]["unet_rows"] for k in ("plain", "lr_paper", "lr_fast")},
        "retouch_unet_calls": {k: per[k]["retouch_calls"] for k in ("lr_paper", "lr_fast")},
        "retouch_unet_rows": {k: per[k]["retouch_rows"] for k in ("lr_paper", "lr_fast")},
        "reference_cached": all(per[k]["reference_cached"] for k in ("lr_paper", "lr_fast")),
        "images_finite": all(per[k]["images_finite"] for k in ("lr_paper", "lr_fast")),
        "mask_kind": per["lr_paper"]["mask_kind"],
        "phases_s": {k: per[k]["phases_s"] for k in ("plain", "lr_paper", "lr_fast")},
        "runs_s": {k: per[k]["runs_s"] for k in ("plain", "lr_paper", "lr_fast")},
    }
    if "lr_fast_kv" in per:  # optional: the reference attention cache on top of the fast options
        kv = per["lr_fast_kv"]
        d.update(
            lr_fast_kv_s=kv["s"],
            ratio_fast_kv=_ratio(kv["s"], plain["s"]),
            lr_fast_kv_peak_gib=kv["peak_gib"],
            lr_fast_kv_unet_rows=kv["unet_rows"],
        )
    d["goals"] = {
        k: {"goal": g, "value": d[k], "met": None if d[k] is None else bool(d[k] <= g)}
        for k, g in GOALS.items()
    }
    timed = [k for k in per if isinstance(per[k], dict) and "phase_calls" in per[k]]
    d["cpu_s"] = {k: per[k]["cpu_s"] for k in timed}
    d["phases_cpu_s"] = {k: per[k]["phases_cpu_s"] for k in timed}
    d["phases_s"] = {k: per[k]["phases_s"] for k in timed}
    d["runs_s"] = {k: per[k]["runs_s"] for k in timed}
    d["phase_calls"] = {k: per[k]["phase_calls"] for k in timed}
    d["phase_rows"] = {k: per[k]["phase_rows"] for k in timed}
    subjects = sorted({int(k.split("_")[-1][0]) for k in timed if k.endswith("subj")})
    if subjects:
        d["subjects"] = {str(k): subjects_summary(per, k) for k in subjects}
    return d


def subjects_summary(per: dict, k: int) -> dict:
    """K subjects against one, same batch and run: whole L&R image and retouch phase, time ratios
    (goal: the image ≤ SUBJECTS_GOAL× one subject's), UNet calls and rows."""
    d: dict = {"subjects": k}
    for run in ("lr_paper", "lr_fast"):
        one, several = per[run], per[subjects_key(run, k)]
        name = run[3:]  # paper / fast
        d[f"{run}_s"] = several["s"]
        d[f"ratio_{name}"] = _ratio(several["s"], one["s"])
        d[f"retouch_ratio_{name}"] = _ratio(
            several["phases_s"].get("retouch"), one["phases_s"].get("retouch")
        )
        d[f"cpu_ratio_{name}"] = _ratio(several["cpu_s"], one["cpu_s"])
        d[f"retouch_cpu_ratio_{name}"] = _ratio(
            several["phases_cpu_s"].get("retouch"), one["phases_cpu_s"].get("retouch")
        )
        d[f"rows_ratio_{name}"] = _ratio(several["unet_rows"], one["unet_rows"])
        d[f"unet_calls_{name}"] = several["unet_calls"]
        d[f"unet_rows_{name}"] = several["unet_rows"]
        d[f"retouch_unet_calls_{name}"] = several["retouch_calls"]
        d[f"retouch_unet_rows_{name}"] = several["retouch_rows"]
        d[f"images_finite_{name}"] = several["images_finite"]
        d[f"reference_cached_{name}"] = several["reference_cached"]
        d[f"phases_s_{name}"] = several["phases_s"]
    d["goals"] = {
        key: {"goal": SUBJECTS_GOAL, "value": d[key], "met": bool(d[key] <= SUBJECTS_GOAL)}
        for key in ("ratio_paper", "ratio_fast")
    }
    return d


def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def subjects_lines(batches, w0: int, w: int) -> list[str]:
    """The several-subjects rows of the table (--subjects 1 2): K subjects against one."""
    lines = []
    for k in sorted({k for _, d in batches for k in d.get("subjects", {})}):
        figures = (
            (f"L&R paper, {k} subjects (s)", "lr_paper_s", ".3f", False),
            (f"L&R fast, {k} subjects (s)", "lr_fast_s", ".3f", False),
            (f"  ratio paper {k}/1 subject", "ratio_paper", ".2f", True),
            (f"  ratio fast {k}/1 subject", "ratio_fast", ".2f", True),
            (f"  retouch phase paper {k}/1", "retouch_ratio_paper", ".2f", False),
            (f"  retouch phase fast {k}/1", "retouch_ratio_fast", ".2f", False),
            (f"  CPU time paper {k}/1", "cpu_ratio_paper", ".2f", False),
            (f"  CPU time fast {k}/1", "cpu_ratio_fast", ".2f", False),
            (f"  CPU retouch paper {k}/1", "retouch_cpu_ratio_paper", ".2f", False),
            (f"  CPU retouch fast {k}/1", "retouch_cpu_ratio_fast", ".2f", False),
            (f"  UNet rows paper {k}/1", "rows_ratio_paper", ".2f", False),
            (f"  UNet rows fast {k}/1", "rows_ratio_fast", ".2f", False),
        )
        for label, key, spec, goal in figures:
            cells = "".join(
                f"{_fmt(d.get('subjects', {}).get(k, {}).get(key), spec):>{w}}" for _, d in batches
            )
            gtxt = f"≤ {SUBJECTS_GOAL}" if goal else ""
            lines.append(f"{label:<{w0}}{cells}{gtxt:>{w}}")
        for what in ("unet_calls", "unet_rows"):
            cells = "".join(
                f"{'/'.join(str(d['subjects'][k][f'{what}_{r}']) for r in ('paper', 'fast')):>{w}}"
                for _, d in batches
                if k in d.get("subjects", {})
            )
            lines.append(f"{what.replace('_', ' ') + f' paper/fast {k} subj.':<{w0}}{cells}")
    return lines


def format_table(res: dict) -> str:
    """The human-readable table (also what the CI test looks for)."""
    batches = [("batch 1", res)] + ([("batch 4", res["batch4"])] if "batch4" in res else [])
    head = (
        f"Layout-and-Retouch benchmark — {res['card']} · {res['config']} {res['dtype']} "
        f"{res['image_size']}² · T={res['steps']} · attention {res['attention']} · torch {res['torch']}"
    )
    rows = [
        ("plain (s)", "plain_s", ".3f", None),
        ("L&R paper (s)", "lr_paper_s", ".3f", None),
        ("L&R fast (s)", "lr_fast_s", ".3f", None),
        ("ratio paper (×plain)", "ratio_paper", ".2f", "ratio_paper"),
        ("ratio fast (×plain)", "ratio_fast", ".2f", "ratio_fast"),
        ("plain peak (GiB)", "plain_peak_gib", ".2f", None),
        ("L&R paper peak (GiB)", "lr_peak_gib", ".2f", None),
        ("L&R fast peak (GiB)", "lr_fast_peak_gib", ".2f", None),
        ("L&R − plain peak (GiB)", "lr_extra_peak_gib", ".2f", "lr_extra_peak_gib"),
        ("L&R fast + ref. K/V cache (s)", "lr_fast_kv_s", ".3f", None),
        ("  … its ratio (×plain)", "ratio_fast_kv", ".2f", None),
        ("  … its peak (GiB)", "lr_fast_kv_peak_gib", ".2f", None),
        ("hooked/plain UNet fwd", "hook_overhead", ".3f", "hook_overhead"),
        ("  … with mask blend", "hook_overhead_blend", ".3f", None),
    ]
    kernel_rows = [
        ("kernels plain/hooked fwd", "identity"),
        ("  … with mask blend", "identity_blend"),
    ]
    w0, w = 26, 14
    lines = [
        head,
        f"{'figure':<{w0}}" + "".join(f"{b:>{w}}" for b, _ in batches) + f"{'goal':>{w}}",
    ]
    for label, key, spec, goal in rows:
        cells = "".join(f"{_fmt(d.get(key), spec):>{w}}" for _, d in batches)
        gtxt = f"≤ {GOALS[goal]}" if goal in GOALS else ""
        lines.append(f"{label:<{w0}}{cells}{gtxt:>{w}}")
    for label, key in kernel_rows:
        cells = "".join(
            f"{_fmt(d['hook'][key].get('plain_kernels')) + '/' + _fmt(d['hook'][key].get('hooked_kernels')):>{w}}"
            for _, d in batches
        )
        lines.append(f"{label:<{w0}}{cells}")
    for what in ("unet_calls", "unet_rows"):
        cells = "".join(
            f"{'/'.join(str(d[what][k]) for k in ('plain', 'lr_paper', 'lr_fast')):>{w}}"
            for _, d in batches
        )
        lines.append(f"{what.replace('_', ' ') + ' plain/paper/fast':<{w0}}{cells}")
    lines += subjects_lines(batches, w0, w)
    lines.append("")
    lines.append("where the time goes (s, median run): " + ", ".join(PHASE_ORDER))
    for bname, d in batches:
        for k in d["phase_calls"]:
            ph = d["phases_s"][k]
            lines.append(
                f"  {bname} {k:<16}" + "".join(f"{ph.get(p, 0.0):>10.3f}" for p in PHASE_ORDER)
            )
    if res["device"] == "cpu":
        lines.append("this process's CPU time (s, same run): " + ", ".join(PHASE_ORDER))
        for bname, d in batches:
            for k, ph in d["phases_cpu_s"].items():
                lines.append(
                    f"  {bname} {k:<16}" + "".join(f"{ph.get(p, 0.0):>10.3f}" for p in PHASE_ORDER)
                )
    lines.append("UNet calls / rows per phase (one run): " + ", ".join(PHASE_ORDER[:4]))
    for bname, d in batches:
        for k, calls in d["phase_calls"].items():
            rows = d["phase_rows"][k]
            cells = "".join(f"{f'{calls.get(p, 0)}/{rows.get(p, 0)}':>10}" for p in PHASE_ORDER[:4])
            lines.append(f"  {bname} {k:<16}{cells}")
    for what, pts in (res.get("sync_points") or {}).items():
        total = sum(p["count"] for p in pts)
        lines.append(
            f"implicit host-device syncs in one {what} batch-1 run: {total}"
            + "".join(f"\n    {p['count']:>5} × {p['where']}" for p in pts[:6])
        )
    if res["device"] != "cuda":
        lines.append(
            "(CPU run: the goals are for a GPU, where a UNet call is launch-bound; on a CPU rows cost"
            " time in proportion, so the ratios here say nothing about the goals)"
        )
        if res.get("subjects"):
            lines.append(
                f"(several subjects: the goal ≤ {SUBJECTS_GOAL}× one subject is for the compute-bound"
                " CPU proxy, --config sd15 --image-size 256 --steps 10 --batches 1)"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="fp16 on CUDA, fp32 on the CPU by default",
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="pixels per side (default: 512 for sd15, 64 for tiny); smaller for a quick CPU smoke run",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 4],
        help="batch sizes; 1 (top level) and 4 (batch4)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per figure (median)")
    p.add_argument(
        "--hook-repeats",
        type=int,
        default=10,
        help="timed forwards per hook figure (median); 0 skips the hook figures",
    )
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--attention",
        choices=("sdpa", "ldm"),
        default="sdpa",
        help="attention of the unhooked layers (see attention_mode)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--subjects",
        type=int,
        nargs="+",
        default=[1],
        choices=range(1, MAX_SUBJECTS + 1),
        metavar="K",
        help="several subjects: '1 2' also times L&R paper and fast with two subjects (two "
        "reference photos, two concept tokens), right after the one-subject runs, and reports K "
        "subjects against one (goal ≤ 1.3×)",
    )
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=4.0,
        help="also time the fast options with the opt-in reference attention cache of this size "
        "(0: skip that figure)",
    )
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/<card>-<config>.json)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run one L&R paper batch-1 generation under torch.profiler; top ops → JSON + .txt",
    )
    p.add_argument(
        "--no-sync-check",
        action="store_true",
        help="skip the pass that lists implicit host-device syncs (CUDA only)",
    )
    p.add_argument(
        "--forward-only",
        action="store_true",
        help="sanity check: build the model and time one UNet forward at CFG batch 2, nothing else",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 avoids OpenMP spin-waits on a busy shared CPU; CI uses it)",
    )
    p.add_argument("--verbose", action="store_true", help="show ldm's prints while building")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "fp16" if str(args.device).startswith("cuda") else "fp32"
    return args


def _autocast_for(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def run(args: argparse.Namespace) -> dict:
    """Build the models, then measure per batch size: plain, L&R paper and fast (and fast with the
    reference attention cache), the hooks' overhead; the figures (`summarize`) as one dict."""
    bench = Bench(args)
    res = describe(bench)
    with torch.inference_mode(), attention_mode(args.attention):
        if args.forward_only:
            res.update(one_forward(bench))
        else:
            res.update(measure_all(bench))
            bench.counter.remove()
    if not args.forward_only:
        res.update(summary(bench))
    res["total_s"] = time.perf_counter() - bench.started
    return res


def _device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The run's device and dtype (and torch's CPU threads), refused where they cannot run."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and dtype == torch.float16:
        raise SystemExit("fp16 needs a GPU; use --dtype fp32 (or bf16) on the CPU")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    return device, dtype


def _placed(ldm, vanilla, device: torch.device, dtype: torch.dtype) -> None:
    """Weights in the run's dtype (A1111: model.half()), ldm's schedule buffers (ᾱ) stay float32;
    the vanilla UNet stays on the CPU for the plain runs (a user without the extension)."""
    ldm.model.to(device, dtype)
    ldm.first_stage_model.to(device, dtype)
    ldm.to(device)
    if vanilla is not None:
        vanilla.to(dtype)
    if device.type == "cpu" and dtype != torch.float32:
        # CPU-only: ldm's GroupNorm32 runs in float32 on half weights, which CUDA autocast allows
        # and the CPU kernels refuse; norms stay float32 so bf16 runs on a CPU (a check of the
        # mixed-precision path, not a speed figure).
        for m in [ldm] + ([vanilla] if vanilla is not None else []):
            for mod in m.modules():
                if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    mod.float()


class Bench:
    """One benchmark run: its models on the device, the clock, the UNet counter (not for
    --forward-only), the L&R settings and caches, and the two generations it times. `say`: progress
    on stderr (the run takes minutes on a GPU, longer on a CPU)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.started = args, time.perf_counter()
        self.device, self.dtype = _device_and_dtype(args)
        self.cuda = self.device.type == "cuda"
        self.cfg = CONFIGS[args.config]()
        self.size = args.image_size or image_size_of(self.cfg)
        if self.size % 8:
            raise SystemExit(f"--image-size must be a multiple of 8, got {self.size}")
        self.latent_hw = (self.size // 8, self.size // 8)
        self.clock = PhaseClock(self.device)
        t0 = time.perf_counter()
        self.ldm, self.vanilla = build_models(
            args.config, args.seed, vanilla=not args.forward_only, quiet=not args.verbose
        )
        _placed(self.ldm, self.vanilla, self.device, self.dtype)
        self.build_s = time.perf_counter() - t0
        self.say(f"built the {args.config} models ({self.build_s:.1f} s)")
        self.model = BenchModel(
            self.ldm,
            _autocast_for(self.device, self.dtype),
            context_dim_of(self.cfg),
            clock=self.clock,
            vector_dim=self.cfg.get("adm"),
        )
        if self.cfg.get("family") == "sdxl":  # the goals of this run's model family
            global GOALS
            unet_gib = sum(p.numel() * p.element_size() for p in self.model.unet.parameters())
            GOALS = sdxl_goals(unet_gib / GIB)
        self.schedule = Schedule.for_steps(args.steps)  # the paper's λ1, λ2, mask start (T-scaled)
        self.settings = pl.RetouchSettings(schedule=self.schedule, guidance_scale=args.guidance)
        self.prompts = derive_prompts(PROMPT, CONCEPT, CLASS)
        self.ref_img = reference_image(self.size)
        # One inversion per reference photo: the one-subject run's and each several-subjects run's.
        self.cache = pl.InversionCache(max_entries=1 + sum(k for k in args.subjects if k > 1))
        # The opt-in reference attention cache (WebUI setting, off by default): warm after the
        # warm-up run.
        self.kv_cache = pl.ReferenceAttentionCache(max_bytes=int(args.kv_cache_gib * 2**30))
        if not args.forward_only:
            self.counter = UNetCounter([self.model.unet, self.vanilla])
            self.clock.counter = self.counter  # calls and rows per phase
        self.per_batch: dict[int, dict] = {}

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f} s] {msg}", file=sys.stderr, flush=True)

    def memory_gib(self) -> Optional[float]:
        return torch.cuda.memory_allocated() / GIB if self.cuda else None

    def measure(self, fn) -> dict:
        return measure(fn, self.clock, self.counter, self.args.warmup, self.args.repeats)

    def noise(self, b: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.args.seed + 100 + b)
        return torch.randn(b, 4, *self.latent_hw, generator=g).to(self.device)

    def plain(self, noise: torch.Tensor, progress=None) -> torch.Tensor:
        return plain_generate(self.model, noise, self.args.steps, self.args.guidance, progress)

    def generate(
        self,
        noise: torch.Tensor,
        layout_source: str,
        *,
        kv=None,
        quiet: bool = False,
        progress=None,
        should_stop=None,
    ):
        """`pl.generate` with the paper's settings and the warm reference inversion cache."""
        return pl.generate(
            self.model,
            prompts=self.prompts,
            reference_image=self.ref_img,
            noise=noise,
            settings=self.settings,
            negative_prompt=NEGATIVE,
            vanilla_unet=self.vanilla,
            layout_source=layout_source,
            cache=self.cache,
            reference_key=("bench-reference", self.args.config, self.args.seed),
            kv_cache=kv,
            progress=progress or (None if quiet else self.clock.progress),
            should_stop=should_stop,
        )


def generate_subjects(
    bench: Bench, noise: torch.Tensor, layout_source: str, k: int, progress=None, should_stop=None
):
    """`pl.generate`'s two stages with K ≥ 2 subjects (SUBJECT_PROMPTS[k]): y_p⁻ with every concept
    token as its class phrase for stage 1, then the retouch with one reference photo per subject
    (each its own inversion, cached), each subject's rows and region (docs/ALGORITHM.md, "Several
    subjects"). One multi-concept DreamBooth checkpoint: no per-subject weights."""
    model, family = bench.model, bench.model.family
    words = [SubjectWords(token, phrase) for token, phrase in SUBJECT_WORDS[:k]]
    prompt = SUBJECT_PROMPTS[k]
    prompts = derive_subject_prompts(prompt, words)
    size = (bench.size, bench.size)
    conds = pl.encode_prompts(
        model, prompts, NEGATIVE, image_size=size, reference_subjects=list(range(k))
    )
    trajectory = stage1.sample_step_blended(
        family.sampler(model, bench.schedule.steps, tuple(noise.shape[-2:])),
        model,
        bench.schedule,
        family.conditioning(model, [prompts.layout], image_size=size),
        conds.layout,
        conds.uncond,
        noise,
        bench.settings.guidance_scale,
        vanilla=lambda: family.vanilla(model, bench.vanilla),
        halves=family.halves(bench.settings.guidance_scale),
        progress=progress or bench.clock.progress,
        should_stop=should_stop,
    )
    rows = subject_rows(
        lambda p, phrases: family.subject_tokens(model, p, phrases), prompt, prompts.subject_words()
    )
    model.decode(trajectory[-1])  # the layout image, as pl.generate decodes it
    keys = subject_reference_keys(bench, k)
    references = torch.cat([_subject_reference(bench, j, key) for j, key in enumerate(keys)])
    result = pl.retouch(
        model,
        reference_latent=references,
        layout_latents=trajectory[-1],
        conds=conds,
        subject_tokens=rows,
        settings=dataclasses.replace(bench.settings, subject_labels=tuple(w.label for w in words)),
        layout_trajectory=trajectory if layout_source == "stage1" else None,
        reference_keys=keys,
        reference_groups=(1,) * k,
        cache=bench.cache,
        progress=progress or bench.clock.progress,
        should_stop=should_stop,
    )
    return pl.GenerationResult(
        images=model.decode(result.latents),
        layout_images=None,
        layout_latents=trajectory[-1],
        retouch=result,
    )


def subject_reference_keys(bench: Bench, k: int) -> list[tuple]:
    """The reference cache keys of a run with K subjects (K = 1: `Bench.generate`'s)."""
    if k == 1:
        return [("bench-reference", bench.args.config, bench.args.seed)]
    return [("bench-reference", bench.args.config, bench.args.seed, k, j) for j in range(k)]


def warm_reference_cache(bench: Bench, noise: torch.Tensor, counts) -> None:
    """Invert every reference photo of the one-subject and the K-subject runs once, so that every
    timed run finds its reference inversion cached (what the figures promise) without a whole
    warm-up run: each run is stopped right after its reference inversion (stage 1 runs first)."""
    inverted = {"done": False}

    def progress(phase, s, total):
        if phase == "reference inversion" and s == total:
            inverted["done"] = True

    def stop() -> bool:
        return inverted["done"]

    for k in counts:
        keys = [
            pl.inversion_key(key, bench.schedule.steps, bench.latent_hw)
            for key in subject_reference_keys(bench, k)
        ]
        if all(bench.cache.peek(key) is not None for key in keys):
            continue
        inverted["done"] = False
        bench.say(f"inverting the reference photo(s) of the {k}-subject runs")
        try:
            if k == 1:
                bench.generate(noise, "stage1", progress=progress, should_stop=stop)
            else:
                generate_subjects(bench, noise, "stage1", k, progress=progress, should_stop=stop)
        except Interrupted:
            pass


def _subject_reference(bench: Bench, j: int, key: tuple) -> torch.Tensor:
    """Subject j's reference latent (subject 0: the one-subject run's photo); a cached inversion
    starts with it, so no VAE pass then."""
    cached = bench.cache.peek(pl.inversion_key(key, bench.schedule.steps, bench.latent_hw))
    if cached is not None:
        return cached[0]
    return bench.model.encode(reference_image(bench.size, seed=1 + j))


def describe(bench: Bench) -> dict:
    """What ran where: the card, the config, the software, the settings."""
    args, device, cuda = bench.args, bench.device, bench.cuda
    return {
        "card": card_name(device),
        "config": args.config,
        "dtype": args.dtype,
        "steps": args.steps,
        "device": device.type,
        "image_size": bench.size,
        "attention": args.attention,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "grad_mode": "inference_mode",
        "device_props": _device_props(device),
        "backends": {
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
        "unet_params_m": round(sum(p.numel() for p in bench.model.unet.parameters()) / 1e6, 2),
        "vae_params_m": round(
            sum(p.numel() for p in bench.ldm.first_stage_model.parameters()) / 1e6, 2
        ),
        "build_s": bench.build_s,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "hook_repeats": args.hook_repeats,
        "guidance": args.guidance,
    }


def _device_props(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {
        "total_memory_gib": props.total_memory / GIB,
        "multiprocessors": props.multi_processor_count,
    }


def one_forward(bench: Bench) -> dict:
    """--forward-only: one UNet forward at CFG batch 2 (after one warm-up)."""
    model, clock = bench.model, bench.clock
    x = torch.randn(2, 4, *bench.latent_hw).to(bench.device)
    c = model.conditioning([PROMPT, NEGATIVE])
    t = torch.full((2,), 501, device=bench.device, dtype=torch.long)
    model.eps(x, t, c)  # warm-up
    clock.start()
    eps = model.eps(x, t, c)
    clock.close("forward")
    return {
        "forward_s": clock.totals["forward"],
        "forward_finite": bool(torch.isfinite(eps).all()),
        "forward_abs_max": float(eps.abs().max()),
    }


def measure_all(bench: Bench) -> dict:
    """Plain runs with only the personalized model on the device, then (DreamBooth mode: the
    vanilla UNet joins it, sharing the VAE) the L&R runs and the hook figures, per batch size
    (into `bench.per_batch`); then the diagnostics. Returns the run's other figures."""
    sched = bench.schedule
    res: dict = {
        "schedule": {
            "lambda1": sched.lambda1,
            "lambda2": sched.lambda2,
            "mask_start": sched.mask_start,
            "describe": sched.describe(),
        },
        "weights_gib": bench.memory_gib(),
    }
    for b in bench.args.batches:
        bench.per_batch[b] = {"batch": b, "plain": plain_figure(bench, b)}
    if bench.vanilla is not None:
        bench.vanilla.to(bench.device)
    res["vanilla_unet_gib"] = bench.memory_gib() - res["weights_gib"] if bench.cuda else None
    for b in bench.args.batches:
        bench.per_batch[b].update(lr_figures(bench, b))
        bench.per_batch[b].update(hook_figures(bench, b))
    res.update(diagnostics(bench))
    return res


def plain_figure(bench: Bench, b: int) -> dict:
    noise = bench.noise(b)
    m = bench.measure(lambda: bench.plain(noise, bench.clock.progress))
    m.pop("out")
    bench.say(f"batch {b}: plain {m['s']:.3f} s")
    return m


def lr_figures(bench: Bench, b: int) -> dict:
    """L&R paper (layout inverted) and fast (the stage-1 trajectory), and fast with the reference
    attention cache unless --kv-cache-gib 0; each with what its retouch did."""
    noise = bench.noise(b)
    several = [k for k in bench.args.subjects if k > 1]
    groups = []  # each group's runs interleaved (one subject beside K: the same load)
    for run, source in (("lr_paper", "inversion"), ("lr_fast", "stage1")):
        group = {run: lambda source=source: bench.generate(noise, source)}
        for k in several:
            group[subjects_key(run, k)] = lambda source=source, k=k: generate_subjects(
                bench, noise, source, k
            )
        groups.append(group)
    if bench.args.kv_cache_gib > 0:
        groups.append({"lr_fast_kv": lambda: bench.generate(noise, "stage1", kv=bench.kv_cache)})
    warm_reference_cache(bench, noise, [1, *several])
    measured = {}
    for group in groups:
        bench.say(f"batch {b}: timing {', '.join(group)}")
        measured.update(
            measure_interleaved(
                group, bench.clock, bench.counter, bench.args.warmup, bench.args.repeats
            )
        )
    figures = {}
    for key, m in measured.items():
        out = m.pop("out")
        r = out.retouch
        m.update(
            retouch_calls=r.unet_calls,
            retouch_rows=r.unet_rows,
            reference_cached=r.reference_cached,
            mask_kind=r.mask_kind,
            images_finite=bool(torch.isfinite(out.images).all()),
        )
        figures[key] = m
        bench.say(f"batch {b}: {key} {m['s']:.3f} s")
    return figures


def subjects_key(run: str, k: int) -> str:
    """The figure's name of a K-subject run: lr_paper_2subj, lr_fast_2subj."""
    return f"{run}_{k}subj"


def hook_figures(bench: Bench, b: int) -> dict:
    """The hooked/plain UNet forward at the retouch batch, in the identity phase and with the mask
    blend (`hook_overhead`)."""
    if bench.args.hook_repeats <= 0:  # skipped (--hook-repeats 0): the figures are null
        return {"hook": {"ratio": None}, "hook_blend": {"ratio": None}}
    figures = {}
    for key, blend in (("hook", False), ("hook_blend", True)):
        figures[key] = hook_overhead(
            bench.model,
            b,
            bench.latent_hw,
            bench.clock,
            bench.args.hook_repeats,
            blend,
            bench.args.seed,
        )
        bench.say(f"batch {b}: {key} forward ×{figures[key]['ratio']:.3f}")
    return figures


def diagnostics(bench: Bench) -> dict:
    """CUDA: the implicit host-device syncs of one plain and one L&R run (unless --no-sync-check);
    --profile: one L&R run under torch.profiler."""
    res: dict = {}
    if bench.cuda and not bench.args.no_sync_check:
        bench.model.clock = None  # the clock's own synchronize() calls are not what we look for
        n1 = bench.noise(1)
        try:
            res["sync_points"] = {
                "plain": sync_points(lambda: bench.plain(n1)),
                "lr_paper": sync_points(lambda: bench.generate(n1, "inversion", quiet=True)),
            }
        except Exception as e:  # a diagnostic: never lose the figures above to it
            res["sync_points_error"] = f"{type(e).__name__}: {e}"
        bench.model.clock = bench.clock
    if bench.args.profile:
        bench.say("profiling one L&R run")
        res["torch_profile"] = profile_once(
            lambda: bench.generate(bench.noise(1), "inversion"), bench.device
        )
    return res


def summary(bench: Bench) -> dict:
    """The first batch size's figures at the top level, the others as batch<N>; the cache's use."""
    batches, cache = bench.args.batches, bench.cache
    res = summarize(bench.per_batch[batches[0]])
    for b in batches[1:]:
        res[f"batch{b}"] = summarize(bench.per_batch[b])
    res["cache"] = {
        "entries": len(cache),
        "max_entries": cache.max_entries,
        "hits": cache.hits,
        "misses": cache.misses,
    }
    return res


def sync_points(fn) -> list[dict]:
    """Where one run makes the host wait for the GPU implicitly (a D2H copy, a pageable H2D copy,
    `.item()`, …): torch.cuda.set_sync_debug_mode("warn") turns each into a warning at the Python
    line that caused it. Inside the step loop these stall the launch queue every step."""
    import warnings

    counts: dict[str, int] = defaultdict(int)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        where = os.path.relpath(w.filename, ROOT) if w.filename.startswith(ROOT) else w.filename
        counts[f"{where}:{w.lineno}"] += 1
    return [{"where": k, "count": v} for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]


def profile_once(fn, device: torch.device, top: int = 25) -> dict:
    """One run under torch.profiler: the ops that take the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    try:
        with profile(activities=acts) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        avgs = prof.key_averages()
    except Exception as e:  # the figures above must survive a profiler that fails on some machine
        return {"error": f"{type(e).__name__}: {e}", "table": ""}
    dev = (
        "self_device_time_total"
        if hasattr(avgs[0], "self_device_time_total")
        else "self_cuda_time_total"
    )
    sort = dev if device.type == "cuda" else "self_cpu_time_total"
    table = avgs.table(sort_by=sort, row_limit=top)
    rows = [
        {
            "op": e.key,
            "count": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "self_device_ms": getattr(e, dev, 0) / 1e3,
        }
        for e in sorted(avgs, key=lambda e: getattr(e, sort, 0), reverse=True)[:top]
    ]
    return {"sort": sort, "top": rows, "table": table}


FLUX_CONFIGS = ("tiny-flux", "flux")  # benchmarks/bench_flux.py (a DiT, not an ldm UNet)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    if config in FLUX_CONFIGS or any(a in (f"--config={c}" for c in FLUX_CONFIGS) for a in argv):
        from benchmarks.bench_flux import main as flux_main

        return flux_main(argv)
    args = parse_args(argv)
    res = run(args)
    if args.forward_only:
        print(
            f"{res['config']} UNet ({res['unet_params_m']} M params) + VAE ({res['vae_params_m']} M) built in "
            f"{res['build_s']:.1f} s; one UNet forward at batch 2 on {res['card']} ({res['dtype']}): "
            f"{res['forward_s']:.3f} s; finite={res['forward_finite']} |eps|max={res['forward_abs_max']:.3g}"
        )
        return res
    print(format_table(res))
    out = args.out or default_out(res["card"], res["config"], torch.device(args.device))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    prof = res.get("torch_profile")
    if prof is not None:
        with open(os.path.splitext(out)[0] + ".profile.txt", "w", encoding="utf-8") as f:
            f.write(prof.pop("table"))
    with open(out, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2, sort_keys=False)
        f.write("\n")
    print(f"JSON: {out}  (total {res['total_s']:.1f} s)")
    return res


if __name__ == "__main__":
    main()
