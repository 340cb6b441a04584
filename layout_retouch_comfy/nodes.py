"""The ComfyUI nodes: Layout-and-Retouch Sampler (both stages), Layout (stage 1) and Retouch
(stage 2 of any layout latent). Inputs come from `inputs` (FIELDS), the work from `run`."""

from __future__ import annotations

from layout_retouch_comfy import inputs, run
from layout_retouch_comfy.glue import ComfyCalls
from lib_layout_retouch.dit.flux.family import DEFAULT_GUIDANCE
from lib_layout_retouch.errors import LayoutRetouchError

CALLS = ComfyCalls()
IMAGE_SIZE = {"default": 512, "min": 64, "max": 8192, "step": 8}
MODELS = {
    "model": (
        "MODEL",
        {
            "tooltip": "The personalized model (DreamBooth checkpoint, or the MODEL "
            "after your LoRA loader; for Textual Inversion the base model)."
        },
    ),
    "clip": ("CLIP", {"tooltip": "Its text encoder (after the LoRA loader, if any)."}),
    "vae": ("VAE", {}),
}
VANILLA = {
    "vanilla_model": (
        "MODEL",
        {
            "tooltip": "The model your subject was learned on: it draws the "
            "first λ1 layout steps. LoRA: the MODEL before the LoRA loader; "
            "DreamBooth: the base checkpoint; Textual Inversion: leave empty."
        },
    ),
    "vanilla_clip": (
        "CLIP",
        {"tooltip": "The vanilla model's text encoder, for y_p⁻ (default: 'clip')."},
    ),
}
REFERENCE = {
    "reference": (
        "IMAGE",
        {"tooltip": "Photo(s) of your subject: a batch of up to 4 photos is used together."},
    )
}
LATENT_IN = {
    "latent": (
        "LATENT",
        {
            "tooltip": "img2img / inpaint: the image's latent (default: an empty "
            "latent of width × height × batch_size)."
        },
    ),
    "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
    "mask": (
        "MASK",
        {"tooltip": "Inpaint: 1 = redraw and retouch here; the rest stays the input's."},
    ),
}
GUIDANCE = {
    "guidance": (
        "FLOAT",
        {
            "default": DEFAULT_GUIDANCE,
            "min": 0.0,
            "max": 100.0,
            "step": 0.1,
            "advanced": True,
            "tooltip": "Flux.1-dev's distilled guidance, as the FluxGuidance node sets it (for "
            "stage 1 and the retouch); SD models and Flux.1-schnell ignore it.",
        },
    )
}
RETOUCH_OUT = ("LATENT", "MASK", "IMAGE")


def _lambdas(*names):
    return {name: inputs.field_input(name) for name in names}


class LayoutRetouchSampler:
    """KSampler-like: stage 1 (vanilla MODEL for λ1 steps, then the personalized one) and the
    retouch of the subject's identity from the reference photo(s)."""

    CATEGORY = inputs.CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT", "MASK", "IMAGE")
    RETURN_NAMES = ("retouched", "layout", "blend_mask", "attention_map")
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **MODELS,
                **inputs.prompt_inputs(),
                **inputs.sampler_inputs(CALLS.samplers, CALLS.schedulers),
                **_lambdas(*inputs.LAMBDAS),
                "width": ("INT", IMAGE_SIZE),
                "height": ("INT", IMAGE_SIZE),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            },
            "optional": {
                **REFERENCE,
                **VANILLA,
                **LATENT_IN,
                **GUIDANCE,
                **inputs.advanced_inputs(),
            },
        }

    def sample(self, reference=None, **kw):
        return run.layout_and_retouch(CALLS, reference=reference, **kw).as_tuple()


class LayoutRetouchLayout:
    """Stage 1 alone: the vanilla MODEL draws the first λ1 steps with the class phrase in place of
    the concept token, the personalized MODEL the rest with your prompt."""

    CATEGORY = inputs.CATEGORY
    FUNCTION = "layout"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("layout",)
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": MODELS["model"],
                "clip": MODELS["clip"],
                **inputs.prompt_inputs(),
                **inputs.sampler_inputs(CALLS.samplers, CALLS.schedulers),
                **_lambdas("lambda1"),
                "width": ("INT", IMAGE_SIZE),
                "height": ("INT", IMAGE_SIZE),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
            },
            "optional": {
                **VANILLA,
                **LATENT_IN,
                **GUIDANCE,
                **inputs.advanced_inputs(("scale_with_steps",)),
            },
        }

    def layout(
        self,
        *,
        model,
        clip,
        prompt,
        negative_prompt,
        concept_token,
        class_phrase,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        lambda1,
        width,
        height,
        batch_size,
        vanilla_model=None,
        vanilla_clip=None,
        latent=None,
        denoise=1.0,
        mask=None,
        scale_with_steps=True,
        guidance=DEFAULT_GUIDANCE,
    ):
        import torch

        try:
            run.check_models(model, vanilla_model)
            job = run.layout_job(
                prompt,
                negative_prompt,
                concept_token,
                class_phrase,
                steps=steps,
                lambda1=lambda1,
                scale_with_steps=scale_with_steps,
            )
        except LayoutRetouchError as e:
            raise inputs.node_error(e) from e
        source = latent or {"samples": torch.zeros(batch_size, 4, height // 8, width // 8)}
        noise_mask = mask if mask is not None else source.get("noise_mask")
        progress = run.Progress(CALLS.progress_bar(steps), steps, CALLS.previewer(model))
        samples = run.stage1(
            CALLS,
            job,
            model=model.clone(),
            vanilla_model=vanilla_model.clone() if vanilla_model is not None else None,
            clip=clip,
            vanilla_clip=vanilla_clip,
            latent=source,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            denoise=denoise,
            noise_mask=noise_mask,
            progress=progress,
            guidance=guidance,
        )
        out = dict(source)
        out["samples"] = samples
        return (out,)


class LayoutRetouchRetouch:
    """Stage 2 alone: retouch the subject's identity from the reference photo(s) into any layout
    latent (a Layout node's, a ControlNet render, an img2img result, another model's)."""

    CATEGORY = inputs.CATEGORY
    FUNCTION = "retouch"
    RETURN_TYPES = RETOUCH_OUT
    RETURN_NAMES = ("retouched", "blend_mask", "attention_map")
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        advanced = tuple(n for n in inputs.ADVANCED if n != "layout_source")
        return {
            "required": {
                **MODELS,
                "layout": ("LATENT", {"tooltip": "The layout to retouch."}),
                **inputs.prompt_inputs(),
                "steps": inputs.sampler_inputs((), ())["steps"],
                "cfg": inputs.sampler_inputs((), ())["cfg"],
                **_lambdas("lambda2", "mask_start"),
            },
            "optional": {
                **REFERENCE,
                "mask": LATENT_IN["mask"],
                **GUIDANCE,
                **inputs.advanced_inputs(advanced),
            },
        }

    def retouch(self, *, layout, reference=None, **kw):
        out = run.layout_and_retouch(
            CALLS,
            layout=layout,
            reference=reference,
            lambda1=0,
            seed=0,
            sampler_name="ddim",
            scheduler="ddim_uniform",
            **kw,
        )
        return (out.retouched, out.mask, out.attention)


NODE_CLASS_MAPPINGS = {
    "LayoutRetouchSampler": LayoutRetouchSampler,
    "LayoutRetouchLayout": LayoutRetouchLayout,
    "LayoutRetouchRetouch": LayoutRetouchRetouch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LayoutRetouchSampler": "Layout-and-Retouch Sampler",
    "LayoutRetouchLayout": "Layout-and-Retouch: Layout (stage 1)",
    "LayoutRetouchRetouch": "Layout-and-Retouch: Retouch (stage 2)",
}
