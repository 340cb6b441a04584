"""AUTOMATIC1111 glue for Layout-and-Retouch: the txt2img accordion, the hooks, X/Y/Z axes, settings.

All algorithm lives in `lib_layout_retouch`. Here we only translate between the WebUI and it:
- `process` parses/validates the parameters (`LayoutRetouchParams`) and, for an enabled run, wraps
  THIS generation's `p.sample` / `p.sample_hr_pass` (instance attributes of `p`, gone with it);
- stage 1 switches prompt (and UNet / LoRA) per step from the CFG-denoiser callback, which acts
  only for a `p` that carries a live run, and is undone in a `finally` of the wrapped `p.sample`;
- stage 2 runs on the stage-1 latents inside the wrapped `p.sample` (before hires fix), so its
  errors reach the API as HTTP errors instead of being swallowed by the WebUI's hook runner.
"""
from __future__ import annotations

import copy
import os
import re
import sys
import threading
import time
from collections import OrderedDict

import gradio as gr
import torch

_EXT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_ROOT not in sys.path:
    sys.path.insert(0, _EXT_ROOT)

from modules import devices, scripts, script_callbacks, sd_models, shared  # noqa: E402
from modules.processing import StableDiffusionProcessingTxt2Img  # noqa: E402

from lib_layout_retouch import axes, job as lr_job, logs, pipeline, text_encoders, ui_text  # noqa: E402
from lib_layout_retouch import conditioning as lr_cond  # noqa: E402
from lib_layout_retouch.errors import Interrupted, LayoutRetouchError  # noqa: E402
from lib_layout_retouch.model import LdmModel, check_model_supported, unet_family  # noqa: E402
from lib_layout_retouch.params import FIELDS, FIELD_BY_NAME, INFOTEXT_PREFIX, NO_SAM, LayoutRetouchParams  # noqa: E402
from lib_layout_retouch.progress import STAGE1_PERSONAL, STAGE1_VANILLA, ProgressPlan  # noqa: E402
from lib_layout_retouch.prompts import guess_concept, strip_extra_networks, subject_positions_in_chunks  # noqa: E402
from lib_layout_retouch.segmentation import find_sam_checkpoints, load_segmenter  # noqa: E402

TITLE = "Layout-and-Retouch"
LOG = logs.LOG_PREFIX
RUN_ATTR = "layout_retouch_run"


logger = logs.attach_console()  # "[Layout-and-Retouch] ..." lines on the WebUI's stdout


def log(msg: str) -> None:
    logger.info(msg)


# ---------------------------------------------------------------------------------------------------
# What the WebUI offers: SAM files, checkpoints, settings
# ---------------------------------------------------------------------------------------------------
def sam_folders() -> list[str]:
    models = getattr(shared, "models_path", os.path.join(_EXT_ROOT, "models"))
    return [os.path.join(models, "sam"),
            # where the popular sd-webui-segment-anything extension keeps its checkpoints
            os.path.join(os.path.dirname(_EXT_ROOT), "sd-webui-segment-anything", "models", "sam")]


_SAM_SEEN: set[str] = set()  # names ever listed: one that vanished later is "missing", not "unknown"


def sam_choices() -> list[str]:
    names = list(find_sam_checkpoints(sam_folders()))
    _SAM_SEEN.update(names)
    return [NO_SAM] + names


def loaded_checkpoint_title() -> str | None:
    info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
    return getattr(info, "title", None)


def checkpoint_choices() -> list[str]:
    """Vanilla checkpoint candidates: the WebUI's list without the loaded (personalized) model."""
    loaded = loaded_checkpoint_title()
    return [t for t in sd_models.checkpoint_tiles() if t != loaded]


def is_loaded_checkpoint(p, name: str) -> bool:
    info = sd_models.get_closet_checkpoint_match(name) if name else None
    loaded = getattr(p.sd_model, "sd_checkpoint_info", None)
    return info is not None and loaded is not None and info.filename == getattr(loaded, "filename", None)


def opt(name: str, default):
    return getattr(shared.opts, name, default) if hasattr(shared, "opts") else default


def on_ui_settings():
    section = ("layout_retouch", TITLE)
    shared.opts.add_option("layout_retouch_default_sam", shared.OptionInfo(
        NO_SAM, "Default Segment-Anything model", gr.Dropdown, lambda: {"choices": sam_choices()}, section=section))
    shared.opts.add_option("layout_retouch_reference_cache", shared.OptionInfo(
        4, "Reference inversions kept in memory (≈3.3 MB each at 512², 50 steps)", gr.Slider,
        {"minimum": 0, "maximum": 32, "step": 1}, section=section))
    shared.opts.add_option("layout_retouch_kv_cache_mb", shared.OptionInfo(
        0, "Reference attention cache, MB of VRAM (0 = off; one SD1 512² 50-step reference ≈ 1900 MB): "
           "repeat generations with the same reference skip the reference path", gr.Slider,
        {"minimum": 0, "maximum": 16384, "step": 64}, section=section))
    shared.opts.add_option("layout_retouch_vanilla_cache", shared.OptionInfo(
        1, "Vanilla UNets kept loaded for DreamBooth mode (≈1.7 GB each in fp16)", gr.Slider,
        {"minimum": 0, "maximum": 4, "step": 1}, section=section))
    shared.opts.add_option("layout_retouch_vanilla_on_cpu", shared.OptionInfo(
        False, "Keep the vanilla UNet on the CPU between its steps (saves VRAM, costs a transfer per image)",
        section=section))


script_callbacks.on_ui_settings(on_ui_settings)


# ---------------------------------------------------------------------------------------------------
# DreamBooth: the vanilla UNet, loaded once and switched by reference
# ---------------------------------------------------------------------------------------------------
class VanillaUNets:
    """Bounded cache of vanilla UNets built from checkpoint files, sharing nothing but the class
    with the loaded model (VAE and text encoder stay the loaded model's)."""

    def __init__(self):
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    @staticmethod
    def _dtype(like) -> torch.dtype:
        return next(like.parameters()).dtype

    def get(self, info, personal_unet: torch.nn.Module) -> torch.nn.Module:
        key = (info.filename, os.path.getmtime(info.filename), self._dtype(personal_unet))
        with self._lock:
            unet = self._items.get(key)
            if unet is None:
                unet = self._load(info, personal_unet)
                self._items[key] = unet
                self.loads += 1
            self._items.move_to_end(key)
            while len(self._items) > max(1, int(opt("layout_retouch_vanilla_cache", 1))):
                self._items.popitem(last=False)
            return unet

    @staticmethod
    def _load(info, personal_unet):
        log(f"loading vanilla UNet from {os.path.basename(info.filename)}")
        state = sd_models.read_state_dict(info.filename, map_location="cpu")
        prefix = "model.diffusion_model."
        unet_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        del state
        own = personal_unet.state_dict()
        loaded_family = unet_family(own)
        if not unet_state:
            raise LayoutRetouchError(f"vanilla checkpoint '{info.title}' has no SD UNet weights "
                                     f"(model.diffusion_model.*): choose an {loaded_family} checkpoint",
                                     parameter="vanilla_checkpoint")
        family = unet_family(unet_state)
        if family != loaded_family:
            raise LayoutRetouchError(
                f"vanilla checkpoint '{info.title}' is an {family} model but the loaded model is {loaded_family}; "
                f"choose the {loaded_family} checkpoint your DreamBooth model was trained from",
                parameter="vanilla_checkpoint")
        mismatch = [k for k in own if k not in unet_state or unet_state[k].shape != own[k].shape]
        if mismatch or len(unet_state) != len(own):
            raise LayoutRetouchError(
                f"vanilla checkpoint '{info.title}' is an {family} model of another size than the loaded one "
                f"({len(mismatch)} UNet weights differ); choose the checkpoint your DreamBooth model was "
                "trained from", parameter="vanilla_checkpoint")
        unet = copy.deepcopy(personal_unet)
        for m in unet.modules():  # a patched instance forward must not be copied along
            m.__dict__.pop("forward", None)
        unet.load_state_dict(unet_state)
        unet.eval().requires_grad_(False)
        return unet

    def clear(self):
        with self._lock:
            self._items.clear()


VANILLA_UNETS = VanillaUNets()


def text_encoder_slots(sd_model) -> list:
    """Where the loaded model keeps its text transformers, and where a checkpoint keeps their weights:
    (holder, attribute, key prefix). The WebUI's encoder objects wrap the original (`.wrapped`)."""
    def inner(e):
        return getattr(e, "wrapped", e)
    if getattr(sd_model, "is_sdxl", False):
        embedders = list(sd_model.conditioner.embedders)
        slots = [(inner(embedders[0]), "transformer", "conditioner.embedders.0.transformer."),
                 (inner(embedders[1]), "model", "conditioner.embedders.1.model.")]
    else:
        encoder = inner(sd_model.cond_stage_model)
        attr = "transformer" if hasattr(encoder, "transformer") else "model"  # SD1 CLIP / SD2 OpenCLIP
        slots = [(encoder, attr, f"cond_stage_model.{attr}.")]
    return [s for s in slots if isinstance(getattr(s[0], s[1], None), torch.nn.Module)]


class VanillaTextEncoders(VanillaUNets):
    """Bounded cache of the vanilla checkpoints' text transformers (copies of the loaded model's
    with the vanilla weights), for stage 1's y_p⁻ in DreamBooth mode."""

    @staticmethod
    def _dtype(slots) -> torch.dtype:
        holder, attr, _ = slots[0]
        return next(getattr(holder, attr).parameters()).dtype

    @staticmethod
    def _load(info, slots):
        log(f"loading the vanilla text encoder from {os.path.basename(info.filename)}")
        state = sd_models.read_state_dict(info.filename, map_location="cpu")
        return [text_encoders.copy_with_weights(getattr(h, a), state, prefix, info.title) for h, a, prefix in slots]


VANILLA_TEXT_ENCODERS = VanillaTextEncoders()


# ---------------------------------------------------------------------------------------------------
# One enabled generation
# ---------------------------------------------------------------------------------------------------
class Run:
    """State of one enabled generation, kept on `p` (never global)."""

    def __init__(self, p, params: LayoutRetouchParams):
        self.params = params
        self.job = lr_job.RetouchJob(params, prompt=strip_extra_networks(p.prompt if isinstance(p.prompt, str) else p.prompt[0]),
                                     negative_prompt=p.negative_prompt if isinstance(p.negative_prompt, str) else p.negative_prompt[0],
                                     steps=p.steps, width=p.width, height=p.height, guidance_scale=p.cfg_scale)
        self.vanilla_unet = None
        self.personal_unet = None
        self.layout_cond = None
        self.stage1_active = False
        self.switched_at = None
        self.trajectory: list[torch.Tensor] = []
        self.intermediates: list = []
        self.retouched = False
        self.lora_saved: list = []
        self.progress = ProgressPlan(
            steps=p.steps, batch=p.batch_size,
            invert_layout=not (params.layout_source == "stage1" and p.sampler_name == "DDIM"))
        self.phase = None


def parse_params(p, args) -> LayoutRetouchParams:
    params = LayoutRetouchParams.from_script_args(args)
    params = axes.apply_overrides(params, getattr(p, axes.OVERRIDES_ATTR, None), p.steps)
    # The settings' default SAM is the UI dropdown's initial value; for the API it fills an omitted name.
    if params.enabled and params.sam_model == NO_SAM and _named_without(args, "sam_model"):
        default_sam = opt("layout_retouch_default_sam", NO_SAM)
        if default_sam and default_sam != NO_SAM:
            params = axes.apply_overrides(params, {"sam_model": default_sam})
    return params


def _named_without(args, name) -> bool:
    return bool(args) and isinstance(args[0], dict) and name not in args[0]


def check_host(p, params: LayoutRetouchParams) -> None:
    """The checks that need the WebUI: model kind, lists of checkpoints/files."""
    if not isinstance(p, StableDiffusionProcessingTxt2Img):
        raise LayoutRetouchError("Layout-and-Retouch works in txt2img only")
    model = p.sd_model
    check_model_supported(model)
    refiner = getattr(p, "refiner_checkpoint", None)
    if refiner not in (None, "", "None") and 0 < float(getattr(p, "refiner_switch_at", 1.0) or 0) < 1:
        # The WebUI would load another model in the middle of sampling: stage 1's switch and the
        # retouch would then run on the refiner (not a personalized model).
        raise LayoutRetouchError(f"the WebUI's Refiner ('{refiner}') switches models during sampling, which "
                                 "Layout-and-Retouch cannot follow; turn Refiner off for retouched images",
                                 parameter="refiner_checkpoint")
    name = params.sam_model
    if name != NO_SAM and (os.path.basename(name) != name or name in (".", "..") or "\\" in name):
        # A name from the list, never a path: API input must not open arbitrary files.
        raise LayoutRetouchError(f"SAM model '{name}' is a path; give a file name from the list of SAM "
                                 f"checkpoints ({', '.join(sam_choices())}) or 'none'", parameter="sam_model")
    if name != NO_SAM and name not in sam_choices()[1:] and name not in _SAM_SEEN:
        raise LayoutRetouchError(f"SAM model '{name}' is not in the list of SAM checkpoints "
                                 f"({', '.join(sam_choices())}); put the file in models/sam or choose 'none'",
                                 parameter="sam_model")
    if params.personalization == "dreambooth":
        info = sd_models.get_closet_checkpoint_match(params.vanilla_checkpoint)
        if info is None or not os.path.isfile(info.filename):
            raise LayoutRetouchError(f"vanilla checkpoint '{params.vanilla_checkpoint}' is not in the WebUI's "
                                     "checkpoint list; choose one from the list (refresh it after adding files)",
                                     parameter="vanilla_checkpoint")


def refuse(p, err: LayoutRetouchError) -> None:
    """A refused input is an expected event: ONE log line, no traceback, and the generation stops
    before any compute. The API answers 422 with the message (parameter names); the UI shows it
    under the gallery (control labels) and makes no image."""
    log(f"refused: {err}")
    if getattr(p, "is_api", False):
        fail_generation(p, err, logged=True)
        return
    p.comment(ui_text.refusal(str(err)))
    p.n_iter = 0  # process_images' batch loop runs no batch: nothing is sampled, nothing is raised


def fail_generation(p, err: LayoutRetouchError, logged: bool = False) -> None:
    """Make the generation fail with `err`: hooks' exceptions are swallowed by the WebUI, so raise
    from `p.sample` instead. The API answers 422 with the message; the UI shows it."""
    exc = request_error(p, err, logged=logged)

    def sample(*args, **kwargs):
        raise exc
    p.sample = sample


def request_error(p, err: LayoutRetouchError, logged: bool = False) -> Exception:
    """What to raise for a user error: for the API an HTTPException, which reaches the client as a
    plain 422 {"detail": msg} without a server traceback; in the UI the error itself (a toast)."""
    if not logged:
        log(f"refused: {err}")
    if getattr(p, "is_api", False):
        from fastapi import HTTPException
        return HTTPException(status_code=422, detail=str(err))
    return LayoutRetouchError(ui_text.for_ui(str(err)), parameter=err.parameter)


def own_infotext(p) -> None:
    """Give this generation its own `extra_generation_params` without `LR ` keys.

    The X/Y/Z plot (and anything else that copies a job with `copy(p)`) shares one dict between
    the copies; writing our keys into the shared dict leaked them into cells that were not
    retouched. A fresh dict per processed job keeps each image's infotext to its own values."""
    p.extra_generation_params = {k: v for k, v in (p.extra_generation_params or {}).items()
                                 if not str(k).startswith(INFOTEXT_PREFIX)}


def host_notes(p, run) -> None:
    """Checks that only warrant a note in the infotext (the run still does what was asked)."""
    params = run.params
    if params.personalization == "dreambooth" and is_loaded_checkpoint(p, params.vanilla_checkpoint):
        run.job.add_note("the vanilla checkpoint is the loaded model itself: stage 1 only swaps the prompt; "
                         "choose the checkpoint your DreamBooth model was trained from")
    if params.personalization == "textual_inversion":
        try:
            from modules import sd_hijack
            names = list(sd_hijack.model_hijack.embedding_db.word_embeddings)
        except Exception:  # no embedding DB: nothing to compare with
            names = None
        if names is not None and params.concept_token not in names:
            known = ", ".join(names[:8]) if names else "none is installed"
            run.job.add_note(f"concept token '{params.concept_token}' is no installed Textual-Inversion embedding "
                             f"({known}): the personalized steps read it as plain text")


def check_before_sampling(p, params: LayoutRetouchParams) -> None:
    """Problems that would otherwise only show mid-sampling: refused here, before any compute."""
    if params.personalization == "lora" and params.schedule(p.steps).lambda1 > 0:
        prompts = p.all_prompts or [p.prompt if isinstance(p.prompt, str) else p.prompt[0]]
        if not any(re.search(r"<(lora|lyco):", pr or "") for pr in prompts):
            raise LayoutRetouchError("personalization is 'lora' but the prompt has no <lora:name:1> tag: add "
                                     "your LoRA's tag to the prompt", parameter="personalization")
    if params.personalization == "dreambooth":
        info = sd_models.get_closet_checkpoint_match(params.vanilla_checkpoint)
        VANILLA_UNETS.get(info, p.sd_model.model.diffusion_model)  # loads (cached) and checks the architecture


# --- stage 1 -----------------------------------------------------------------------------------------
def on_cfg_denoiser(params):
    """Stage 1: (ε, y_p⁻) for s ≤ λ1, then (ε*, y_p). Acts only for a p with a live run."""
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    run = getattr(p, RUN_ATTR, None)
    if run is None or not run.stage1_active:
        return
    s = int(denoiser.step) + 1  # the model call about to run, 1-based (exact, unlike sampling_step)
    if run.params.layout_source == "stage1" and len(run.trajectory) < s:
        # x_in holds the cond rows then the uncond rows; its last B rows are the latents themselves.
        run.trajectory.append(params.x[-p.batch_size:].detach().clone())
    if run.job.uses_vanilla(s):
        tc = params.text_cond
        if isinstance(tc, (torch.Tensor, dict)):  # SD1: a tensor; SDXL: {"crossattn", "vector"}
            cond = lr_cond.expand(lr_cond.like(run.layout_cond, tc), lr_cond.batch_size(tc))
            if isinstance(tc, dict) and type(tc) is not dict:
                cond = type(tc)(cond)  # the WebUI's DictWithShape: it reads `.shape` right after the hook
            params.text_cond = cond
        if run.vanilla_unet is not None:
            p.sd_model.model.diffusion_model = run.vanilla_unet
    elif run.switched_at is None:
        run.switched_at = s
        restore_stage1(p, run)
        log(f"stage 1: switched to personalized UNet at step {s}")


def on_progress_denoiser(params):
    """One progress bar over both stages: during stage 1 the bar's length includes stage 2 (the
    sampler set it to its own step count at launch), and the text names the phase. Note: while an
    enabled run samples, `CFGDenoiserParams.total_sampling_steps` reports this length too."""
    p = getattr(getattr(params, "denoiser", None), "p", None)
    run = getattr(p, RUN_ATTR, None)
    if run is None or not run.stage1_active:
        return
    shared.state.sampling_steps = run.progress.total
    s = int(params.denoiser.step) + 1
    shared.state.textinfo = ProgressPlan.text(STAGE1_VANILLA if run.job.uses_vanilla(s) else STAGE1_PERSONAL)


def restore_stage1(p, run) -> None:
    if run.personal_unet is not None:
        p.sd_model.model.diffusion_model = run.personal_unet
    if run.lora_saved:
        for net, mult in run.lora_saved:
            net.unet_multiplier = mult
        run.lora_saved = []


def loaded_loras():
    networks = sys.modules.get("networks")  # the built-in Lora extension
    return list(getattr(networks, "loaded_networks", []) or [])


def begin_stage1(p, run) -> None:
    model = p.sd_model
    run.personal_unet = model.model.diffusion_model
    kind = run.params.personalization
    if kind == "dreambooth":
        info = sd_models.get_closet_checkpoint_match(run.params.vanilla_checkpoint)
        run.vanilla_unet = VANILLA_UNETS.get(info, run.personal_unet)
        if not getattr(model, "lowvram", False):
            # Normal VRAM: resident beside the personalized UNet. In --medvram/--lowvram the WebUI's own
            # hooks (on the UNet wrapper, or copied with the blocks) move it to the GPU when it runs.
            device = next(run.personal_unet.parameters()).device
            if next(run.vanilla_unet.parameters()).device != device:
                run.vanilla_unet.to(device)
    lora_off = kind == "lora" and run.job.schedule.lambda1 > 0
    nets = loaded_loras() if lora_off else []
    if lora_off and not nets:
        raise LayoutRetouchError("personalization is 'lora' but no LoRA is active: add its <lora:name:1> tag "
                                 "to the prompt", parameter="personalization")
    # y_p⁻ for the vanilla steps: DreamBooth through the vanilla checkpoint's text encoder (unless asked
    # otherwise), LoRA with the network off in the text encoder.
    slots, vanilla_te = [], []
    if kind == "dreambooth" and run.params.stage1_text_encoder == "vanilla":
        slots = text_encoder_slots(model)
        if slots:
            vanilla_te = VANILLA_TEXT_ENCODERS.get(info, slots)
        else:
            run.job.add_note("no vanilla text encoder for this model kind: stage 1 used the loaded model's")
    saved_te = [(n, n.te_multiplier) for n in nets]
    lowvram = getattr(model, "lowvram", False)
    try:
        for n in nets:
            n.te_multiplier = 0
        from modules.prompt_parser import SdConditioning

        if lowvram:  # the WebUI's hooks move only its own modules
            for m in vanilla_te:
                m.to(devices.device)
        with text_encoders.swapped(slots, vanilla_te), devices.autocast():
            # SdConditioning: SDXL's size terms are the generation's, as the WebUI's own
            run.layout_cond = model.get_learned_conditioning(
                SdConditioning([run.job.prompts.layout], width=p.width, height=p.height))
        if vanilla_te:
            log("stage 1: y_p⁻ encoded with the vanilla checkpoint's text encoder")
    finally:
        for n, m in saved_te:
            n.te_multiplier = m
        if lowvram:
            for m in vanilla_te:
                m.to(devices.cpu)
    if lora_off:
        run.lora_saved = [(n, n.unet_multiplier) for n in nets]
        for n in nets:
            n.unet_multiplier = 0
    run.stage1_active = True
    run.switched_at = None
    run.trajectory = []


def end_stage1(p, run) -> None:
    run.stage1_active = False
    restore_stage1(p, run)
    if run.vanilla_unet is None:
        return
    medvram = getattr(p.sd_model, "lowvram", False) and not getattr(shared.cmd_opts, "lowvram", False)
    if opt("layout_retouch_vanilla_on_cpu", False) or medvram:
        # --medvram moves the whole UNet wrapper to the GPU with whatever UNet it holds, and back
        # without the swapped-out one: send the vanilla UNet back ourselves. (--lowvram's per-block
        # hooks handle it; never move a lowvram model as a whole.)
        if not getattr(shared.cmd_opts, "lowvram", False):
            run.vanilla_unet.to("cpu")


# --- stage 2 -----------------------------------------------------------------------------------------
def retouch_samples(p, run, samples: torch.Tensor) -> torch.Tensor:
    """Stage 2 on a batch of stage-1 latents; returns the retouched latents."""
    if run.retouched or samples is None:
        return samples
    run.retouched = True
    if shared.state.interrupted or shared.state.skipped:
        run.job.add_note("interrupted before the retouch: layout returned")
        return samples
    job = run.job
    job_for_batch = job
    if p.prompts and strip_extra_networks(p.prompts[0]) != job.prompt:
        job_for_batch = job.for_batch(p.prompts[0], p.negative_prompts[0])  # its own notes list
    model = LdmModel(p.sd_model, autocast=devices.autocast,
                     sdxl_crop=(int(opt("sdxl_crop_top", 0)), int(opt("sdxl_crop_left", 0))))
    clip = model.text_encoder()  # SDXL: the CLIP-L embedder (both tokenize alike)
    if hasattr(clip, "tokenize_line"):
        chunks, _ = clip.tokenize_line(job_for_batch.prompts.personalized)
        subject = subject_positions_in_chunks(chunks, lambda t: clip.tokenize([t])[0],
                                              job.params.concept_token, job.params.class_phrase)
    else:
        from lib_layout_retouch.prompts import subject_token_positions
        subject = subject_token_positions(model.tokenize, job_for_batch.prompts.personalized,
                                          [job.params.concept_token, job.params.class_phrase])
    segmenter = None
    if job.params.sam_model != NO_SAM:
        path = find_sam_checkpoints(sam_folders()).get(job.params.sam_model)
        try:
            if path is None:  # listed once, gone now (or never there): the CA mask still works
                raise LayoutRetouchError(f"SAM file '{job.params.sam_model}' is not in models/sam", parameter="sam_model")
            segmenter = load_segmenter(path, device=devices.device)
        except LayoutRetouchError as e:
            job.add_note(f"SAM not used ({e}); cross-attention mask only")
            log(f"SAM fallback: {e}")
    layout_images = None
    if segmenter is not None:
        layout_images = pipeline.to_uint8(model.decode(samples))
    trajectory = None
    if job.params.layout_source == "stage1":
        if p.sampler_name == "DDIM" and len(run.trajectory) == job.steps - 1:
            # A1111's DDIM stops at t=1 after N−1 calls: its latents are our levels T…1.
            trajectory = run.trajectory + [samples, samples]
        else:
            job.add_note("layout source 'stage1' needs the DDIM sampler; the layout was inverted instead")
    cache = lr_job.SHARED_INVERSION_CACHE
    cache.max_entries = int(opt("layout_retouch_reference_cache", 4))
    kv_cache = lr_job.SHARED_REFERENCE_ATTENTION_CACHE
    kv_cache.max_bytes = int(opt("layout_retouch_kv_cache_mb", 0)) * 2 ** 20
    if kv_cache.max_bytes == 0:
        kv_cache.clear()
    checkpoint = getattr(p.sd_model, "sd_checkpoint_info", None)
    model_key = "|".join([getattr(checkpoint, "filename", "?"), job.params.personalization,
                          ",".join(f"{n.name}:{n.unet_multiplier}" for n in loaded_loras())])

    plan = run.progress
    if cache.peek(pipeline.inversion_key((job_for_batch.reference_fingerprint, model_key), job.steps,
                                         samples.shape[-2:])) is not None:
        plan = ProgressPlan(plan.steps, plan.batch, reference_cached=True, invert_layout=plan.invert_layout)

    def progress(phase, step, total_steps):  # one bar: stage 2 continues where stage 1 ended
        shared.state.textinfo = ProgressPlan.text(phase)
        shared.state.sampling_steps = plan.total
        shared.state.sampling_step = max(shared.state.sampling_step, plan.position(phase, step, total_steps))

    def preview(latents):  # the WebUI's live preview, at its own setting's rate
        shared.state.current_latent = latents
        shared.state.set_current_image()
    progress.preview = preview

    def should_stop():
        return bool(shared.state.interrupted or shared.state.skipped)

    started = time.perf_counter()
    try:
        result = job_for_batch.retouch(model, samples, subject_tokens=subject, model_key=model_key,
                                       layout_trajectory=trajectory, layout_images=layout_images,
                                       segmenter=segmenter, cache=cache, kv_cache=kv_cache, progress=progress,
                                       should_stop=should_stop)
    except Interrupted as e:
        job.add_note(f"retouch interrupted ({e}); layout returned")
        log(f"interrupted: {e}")
        return samples
    job.mask_kind = result.mask_kind
    job.merge_notes(job_for_batch)
    for note in model.notes:  # e.g. a half-precision VAE retried in float32
        job.add_note(note)
    log(f"retouch of {samples.shape[0]} image(s): {time.perf_counter() - started:.1f}s, {result.unet_calls} UNet calls "
        f"({result.unet_rows} rows), "
        f"reference {'cached' if result.reference_cached else 'inverted'}, mask {result.mask_kind}")
    if job.params.show_intermediates:
        size = (p.width, p.height)
        layouts = lr_job.tensor_to_images(model.decode(samples))
        base = int(getattr(p, "iteration", 0) or 0) * p.batch_size  # index of this batch's first image
        for i, layout in enumerate(layouts):
            run.intermediates.append(("layout", base + i, layout))
            if result.masks is not None:
                run.intermediates.append(("mask", base + i, lr_job.mask_to_image(result.masks[i], size)))
            if result.ca_maps is not None:
                run.intermediates.append(("attention map", base + i,
                                          lr_job.mask_to_image(result.ca_maps[i], size)))
    return result.latents.to(samples.dtype)


def install(p, run) -> None:
    """Wrap this generation's sampling (instance attributes on p only)."""
    original_sample = p.sample
    original_hr = getattr(p, "sample_hr_pass", None)

    def sample(*args, **kwargs):
        run.retouched = False
        try:
            try:
                begin_stage1(p, run)
                samples = original_sample(*args, **kwargs)
            finally:
                end_stage1(p, run)  # nothing stays switched, whatever happened
            if not run.retouched:
                samples = retouch_samples(p, run, samples)
        except LayoutRetouchError as e:
            raise request_error(p, e) from None
        p.extra_generation_params.update(run.job.infotext())
        return samples

    def sample_hr_pass(samples, decoded_samples, *args, **kwargs):
        end_stage1(p, run)
        retouched = retouch_samples(p, run, samples)  # its errors pass through sample() above
        if decoded_samples is not None and retouched is not samples:
            with devices.autocast():
                decoded_samples = p.sd_model.decode_first_stage(retouched.to(devices.dtype_vae)).float().cpu()
        return original_hr(retouched, decoded_samples, *args, **kwargs)

    p.sample = sample
    if original_hr is not None:
        p.sample_hr_pass = sample_hr_pass
    setattr(p, RUN_ATTR, run)


# ---------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------
class LayoutRetouchScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return False if is_img2img else scripts.AlwaysVisible

    def _control(self, f, labels):
        eid = self.elem_id(f.name)
        if f.kind == "bool":
            return gr.Checkbox(value=f.default, label=f.label, elem_id=eid)
        if f.kind == "image":
            return gr.Image(label=f.label, type="pil", source="upload", elem_id=eid, height=256)
        if f.kind == "choice":
            return gr.Radio(choices=list(labels[f.name].values()), value=labels[f.name][f.default],
                            label=f.label, elem_id=eid)
        if f.name == "vanilla_checkpoint":
            # value "" (no empty choice in the list): the API's infotext paste converts a pasted value
            # to the type of the component's value, and a None value would drop the paste.
            return gr.Dropdown(choices=checkpoint_choices(), value="", label=f.label, elem_id=eid)
        if f.name == "sam_model":
            choices = sam_choices()
            default_sam = opt("layout_retouch_default_sam", NO_SAM)
            return gr.Dropdown(choices=choices, value=default_sam if default_sam in choices else NO_SAM,
                               label=f.label, elem_id=eid)
        if f.kind in ("int", "float"):
            low, high = f.slider_range()
            return gr.Slider(minimum=low, maximum=high, step=f.step, value=f.default,
                             label=f.label, elem_id=eid)
        if f.choices:  # a text field with a fixed set of values (e.g. a preset)
            return gr.Radio(choices=list(labels[f.name].values()), value=labels[f.name][f.default],
                            label=f.label, elem_id=eid)
        return gr.Textbox(value=f.default, label=f.label, elem_id=eid, lines=1, max_lines=1)

    def ui(self, is_img2img):
        from modules.ui_common import create_refresh_button
        from modules.ui_components import FormRow, InputAccordion, ToolButton

        comps = {}
        labels = {f.name: dict(zip(f.choices, f.choice_labels or f.choices)) for f in FIELDS}
        made = set()

        def make(name):
            comps[name] = self._control(FIELD_BY_NAME[name], labels)
            made.add(name)
            return comps[name]

        enabled_field = FIELD_BY_NAME["enabled"]
        with InputAccordion(enabled_field.default, label=ui_text.ACCORDION_LABEL,
                            elem_id=self.elem_id("enabled")) as enabled:
            comps["enabled"] = enabled
            made.add("enabled")
            gr.Markdown("Vanilla model draws the layout, your subject is retouched in from one photo "
                        "([paper](https://arxiv.org/abs/2407.09779)). Stage 1 works with any sampler; "
                        "the paper used **DDIM**.")
            photo_notice = gr.Markdown("", visible=False, elem_id=self.elem_id("photo_notice"))
            with gr.Row():
                with gr.Column(scale=1, min_width=200):
                    make("reference_image")
                with gr.Column(scale=2):
                    make("personalization")
                    with FormRow(elem_id=self.elem_id("vanilla_row")) as vanilla_row:
                        make("vanilla_checkpoint")
                        create_refresh_button(
                            comps["vanilla_checkpoint"], sd_models.list_models,
                            lambda: {"choices": checkpoint_choices()}, self.elem_id("vanilla_refresh"))
                    with FormRow():
                        make("concept_token")
                        make("class_phrase")
                        guess = ToolButton(ui_text.GUESS_LABEL, elem_id=self.elem_id("guess"),
                                           tooltip=ui_text.EXTRA_HINTS[ui_text.GUESS_LABEL])
                    guess_msg = gr.Markdown("", elem_id=self.elem_id("guess_message"))
            for name in ("lambda1", "lambda2", "mask_start", "scale_with_steps"):
                make(name)
            steps_now = getattr(getattr(self, "_txt2img_steps", None), "value", 20) or 20
            effective = gr.Markdown(_describe_effective(5, 10, 31, True, steps_now), elem_id=self.elem_id("effective"))
            for f in ui_text.basic_fields():
                if f.name not in made:
                    make(f.name)
            with gr.Accordion(ui_text.ADVANCED_LABEL, open=False, elem_id=self.elem_id("advanced")):
                for f in ui_text.advanced_fields():
                    make(f.name)

        kind = comps["personalization"]
        kind.change(lambda v: gr.update(visible=v == labels["personalization"]["dreambooth"]),
                    inputs=[kind], outputs=[vanilla_row], show_progress=False)
        comps["reference_image"].upload(lambda: gr.update(value="", visible=False), outputs=[photo_notice],
                                        show_progress=False)
        prompt_box = getattr(self, "_txt2img_prompt", None)
        steps_box = getattr(self, "_txt2img_steps", None)
        knobs = [comps[n] for n in ("lambda1", "lambda2", "mask_start", "scale_with_steps")]
        if steps_box is not None:
            for c in knobs + [steps_box]:
                c.change(_describe_effective, inputs=knobs + [steps_box], outputs=[effective], show_progress=False)
        if prompt_box is not None:
            guess.click(_guess, inputs=[prompt_box], outputs=[comps["concept_token"], comps["class_phrase"], guess_msg],
                        show_progress=False)

        self.infotext_fields = [(comps["enabled"], lambda d: True if _has_lr_keys(d) else None),
                                (photo_notice, _paste_notice)]
        for f in FIELDS:
            if f.infotext_key and f.kind != "image":
                self.infotext_fields.append((comps[f.name], _paste(f.name, labels.get(f.name, {}))))
        self.paste_field_names = [f.infotext_key for f in FIELDS if f.infotext_key]
        return [comps[f.name] for f in FIELDS]  # FIELDS order: the API's positional order

    def after_component(self, component, **kwargs):
        eid = kwargs.get("elem_id")
        if eid == "txt2img_prompt":
            self._txt2img_prompt = component
        elif eid == "txt2img_steps":
            self._txt2img_steps = component

    def process(self, p, *args):
        setattr(p, RUN_ATTR, None)
        own_infotext(p)  # before anything: an image that is not retouched carries no `LR ` key
        try:
            params = parse_params(p, args)
            if not params.enabled:
                return
            params.validate()  # the user's own values first, then what depends on the WebUI
            check_host(p, params)
            check_before_sampling(p, params)
            run = Run(p, params)
            host_notes(p, run)
        except LayoutRetouchError as e:
            refuse(p, e)
            return
        install(p, run)
        p.extra_generation_params.update(run.job.infotext())
        log(f"enabled: {run.job.schedule.describe()}, personalization {params.personalization}")

    def postprocess(self, p, processed, *args):
        run = getattr(p, RUN_ATTR, None)
        if run is None:
            return
        if run.intermediates:
            for label, index, img in run.intermediates:
                text = intermediate_infotext(p, label, index)
                img.info["parameters"] = text
                processed.images.append(img)
                processed.infotexts.append(text)
            run.intermediates = []
        setattr(p, RUN_ATTR, None)  # drop references to tensors and UNets held by the run


def intermediate_infotext(p, label: str, index: int) -> str:
    """An intermediate's own infotext: the generation's prompt and settings without `LR ` keys (it is
    not a retouched image; pasting it makes a plain generation) and a label saying what it is."""
    from modules.processing import create_infotext
    saved = p.extra_generation_params
    p.extra_generation_params = {k: v for k, v in saved.items() if not str(k).startswith(INFOTEXT_PREFIX)}
    p.extra_generation_params[ui_text.INTERMEDIATE_KEY] = ui_text.intermediate_label(label, index)
    try:
        n = len(p.all_prompts or [])
        i = min(index, n - 1) if n else 0
        return create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, index=i)
    finally:
        p.extra_generation_params = saved


def _has_lr_keys(d) -> bool:
    return any(str(k).startswith(INFOTEXT_PREFIX) for k in d)


def _paste_notice(d):
    if not _has_lr_keys(d):
        return gr.update(value="", visible=False)
    return gr.update(value=ui_text.photo_notice(d.get(FIELD_BY_NAME["reference_image"].infotext_key)), visible=True)


def _describe_effective(l1, l2, ms, scale, steps):
    try:
        params = LayoutRetouchParams(lambda1=l1, lambda2=l2, mask_start=ms, scale_with_steps=scale)
        return f"At {int(steps)} steps: {params.schedule(int(steps)).describe()}"
    except LayoutRetouchError as e:
        return f"⚠ {ui_text.for_ui(str(e))}"


def _guess(prompt):
    try:
        from modules import sd_hijack
        names = list(sd_hijack.model_hijack.embedding_db.word_embeddings)
    except Exception:  # the embedding DB is optional for a guess
        names = []
    found = guess_concept(prompt or "", names)
    message = ui_text.guess_message(prompt, found, names)
    if not found:
        return gr.update(), gr.update(), message
    return found[0], found[1] or gr.update(), message


def _paste(name, labels):
    def read(d):
        values = LayoutRetouchParams.from_infotext(d)
        if name not in values:
            return None
        v = values[name]
        if name == "vanilla_checkpoint" and not v:
            return None
        return labels.get(v, v) if labels else v
    return read


# ---------------------------------------------------------------------------------------------------
# X/Y/Z plot axes (at import and on_before_ui: with --nowebui the API builds its UI first)
# ---------------------------------------------------------------------------------------------------
def _grid_base_params(p) -> LayoutRetouchParams:
    """The grid's own Layout-and-Retouch parameters (what the UI/API sent with the X/Y/Z request)."""
    runner = getattr(p, "scripts", None)
    for script in getattr(runner, "alwayson_scripts", []) or []:
        if isinstance(script, LayoutRetouchScript) or getattr(script, "title", lambda: None)() == TITLE:
            return parse_params(p, list(p.script_args[script.args_from:script.args_to]))
    return LayoutRetouchParams()


def axis_confirm(spec):
    """The X/Y/Z `confirm(p, xs)` hook: validate every value before the grid starts."""
    def confirm(p, xs):
        try:
            base = _grid_base_params(p)
            axes.check_axis_values(base, spec.field, xs, p.steps, label=spec.label,
                                   host_check=lambda params: check_host(p, params))
        except LayoutRetouchError as e:
            log(f"refused: {e}")
            if getattr(p, "is_api", False):
                from fastapi import HTTPException
                raise HTTPException(status_code=422, detail=str(e)) from None
            # The UI: no exception (the WebUI would print a traceback and an argument dump): the
            # grid gets no cells, so nothing is computed, and the message is shown under the gallery.
            p.comment(ui_text.refusal(str(e)))
            xs.clear()
    return confirm


def register_axes() -> None:
    xyz = None
    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") or os.path.basename(data.path) == "xyz_grid.py":
            xyz = data.module
            break
    if xyz is None:
        return
    existing = {getattr(o, "label", None) for o in xyz.axis_options}
    choices = {"bool": lambda: ["True", "False"], "checkpoints": lambda: list(sd_models.checkpoint_tiles()),
               "sam": sam_choices, "layer_presets": lambda: list(FIELD_BY_NAME["layer_preset"].choices)}
    for spec in axes.AXES:
        if spec.label in existing:
            continue
        xyz.axis_options.append(xyz.AxisOption(spec.label, spec.value_type, axes.axis_apply(spec.field),
                                               confirm=axis_confirm(spec), choices=choices.get(spec.choices)))


try:
    register_axes()
except Exception as e:  # the grid script may not be loaded yet; on_before_ui tries again
    log(f"X/Y/Z axes not registered yet: {e}")
script_callbacks.on_before_ui(register_axes)
script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
script_callbacks.on_cfg_denoiser(on_progress_denoiser)
