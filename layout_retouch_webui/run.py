"""One enabled generation: its state, kept on `p` (never global); `sampling.install` wraps its
sampling, `stage1`'s callbacks find it with `of(p)`."""

from __future__ import annotations

import torch

from layout_retouch_webui import hosts, img2img, samplers
from lib_layout_retouch import job as lr_job
from lib_layout_retouch.params import LayoutRetouchParams
from lib_layout_retouch.progress import ProgressPlan
from lib_layout_retouch.prompts import strip_extra_networks

RUN_ATTR = "layout_retouch_run"


class Run:
    """State of one enabled generation, kept on `p` (never global)."""

    def __init__(self, p, params: LayoutRetouchParams):
        self.params = params
        self.host = hosts.current()
        self.img2img = img2img.is_img2img(p)
        # img2img: the steps its sampler actually runs (λ1/λ2/mask start are scaled to them); with
        # layout source 'input' (no stage 1) the slider's steps.
        steps = img2img.steps_run(p, params.layout_source)
        self.job = lr_job.RetouchJob(
            params,
            prompt=strip_extra_networks(p.prompt if isinstance(p.prompt, str) else p.prompt[0]),
            negative_prompt=p.negative_prompt
            if isinstance(p.negative_prompt, str)
            else p.negative_prompt[0],
            steps=steps,
            width=p.width,
            height=p.height,
            guidance_scale=p.cfg_scale,
            img2img=self.img2img,
            requested_steps=p.steps,
        )
        # stage 1 switches by the host sampler's own steps (DDIM at N steps runs N − 1)
        self.sampler = samplers.of(p)
        if self.job.schedule.lambda1 and params.runs_stage1:
            self.job.stage1_words = self.sampler.words()
        self.vanilla_unet = None
        self.personal_unet = None
        self.layout_cond = None
        self.stage1_active = False
        self.switched_at = None
        self.trajectory: list[torch.Tensor] = []
        self.intermediates: list = []
        self.retouched = False
        self.lora_nets: list = []
        self.lora_restore = None
        # several subjects: each subject's LoRA network (None: it has none), off for all of stage 1
        self.subject_loras: list = []
        self.loras_off_in_stage1 = False
        self.progress = ProgressPlan(
            steps=steps,
            batch=p.batch_size,
            invert_layout=not (
                params.layout_source == "stage1" and p.sampler_name == "DDIM" and not self.img2img
            ),
            references=len(params.references),
            stage1_steps=0 if self.stage1_skipped else self.sampler.steps,
        )
        self.phase = None

    @property
    def stage1_skipped(self) -> bool:
        """img2img's layout source 'input': the input is the layout; the host samples nothing."""
        return not self.params.runs_stage1


def of(p):
    """The live run of generation `p`, or None."""
    return getattr(p, RUN_ATTR, None)


def clear(p) -> None:
    setattr(p, RUN_ATTR, None)  # drop references to tensors and UNets held by the run
