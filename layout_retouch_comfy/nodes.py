"""The ComfyUI nodes: Layout-and-Retouch Sampler (both stages), Layout (stage 1), Retouch (stage 2 of
any layout latent) and the SAM loader. Inputs come from `inputs` (FIELDS), the work from `run`, what
they say from `texts`.

Each node's VALIDATE_INPUTS refuses before the run what needs no model (`inputs.check_before_run`),
so ComfyUI shows it as a validation error on the node before any checkpoint loads. A node shows the
values it uses ("At N steps: …"), the mask kind and the notes on itself (ComfyUI's progress text),
in the `ui` of its result (/history) and as its `info` STRING output.
"""

from __future__ import annotations

import inspect

from layout_retouch_comfy import inputs, run, tensors, texts
from layout_retouch_comfy import subjects as S
from layout_retouch_comfy.glue import ComfyCalls
from lib_layout_retouch import ui_text
from lib_layout_retouch.adapters.comfy import GUIDANCE_DEFAULT
from lib_layout_retouch.errors import LayoutRetouchError
from lib_layout_retouch.params import LayoutRetouchParams, SubjectParams
from lib_layout_retouch.prompts import NO_CLASS_PHRASE
from lib_layout_retouch.segmentation import OFFICIAL_SAM_FILES, load_segmenter

CALLS = ComfyCalls()
texts.install_refusal_filter()
IMAGE_SIZE = {"default": 512, "min": 64, "max": 8192, "step": 8}
SAM_TYPE = "LAYOUT_RETOUCH_SAM"
SUBJECTS_TYPE = "LAYOUT_RETOUCH_SUBJECTS"
HIDDEN = {"unique_id": "UNIQUE_ID"}  # the node's id, for the text shown on it
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
        {
            "tooltip": "Photo(s) of your subject: a batch of up to 4 photos is used together. "
            "With Subject nodes in 'subjects' this is subject 1 (concept_token, class_phrase) "
            "and they are the subjects after it; leave it empty to make them every subject."
        },
    )
}
SUBJECTS = {
    "subjects": (
        SUBJECTS_TYPE,
        {
            "tooltip": "Several subjects in one image: chained Layout-and-Retouch Subject nodes. "
            "Each subject is retouched only in its own region of the layout, from its own photos "
            "(and its LoRA only there). With 'reference' empty they are every subject."
        },
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
SUBJECT_MASK = {
    "subject_mask": (
        "MASK",
        {
            "tooltip": "txt2img: where your subject is (1 = retouch here). Stage 1 still draws "
            "the whole picture; the retouch changes only inside this mask, and the blend mask is "
            "bounded by it. (Inpaint: 'mask' with a 'latent'.)"
        },
    )
}
SAM = {
    "sam": (
        SAM_TYPE,
        {
            "tooltip": "A SAM model (Layout-and-Retouch: SAM Loader): the blend mask becomes the "
            "paper's adaptive mask, SAM's segment of the subject in the layout joined with the "
            "cross-attention mask (SAM+CA). Empty: the cross-attention mask alone."
        },
    )
}
GUIDANCE = {
    "guidance": (
        "FLOAT",
        {
            "default": GUIDANCE_DEFAULT,
            "min": 0.0,
            "max": 100.0,
            "step": 0.1,
            "advanced": True,
            "tooltip": "Flux.1-dev's distilled guidance, as the FluxGuidance node sets it (for "
            "stage 1 and the retouch); SD models and Flux.1-schnell ignore it.",
        },
    )
}
INFO_TOOLTIP = (
    "What λ1, λ2 and mask start are at this step count, the mask used and the notes (also shown "
    "on the node after a run)."
)
RETOUCH_TOOLTIPS = (
    "The retouched LATENT (VAE Decode it).",
    "The blend mask M at image size (1 = retouched from the reference).",
    "The subject's normalised cross-attention map, as an image.",
)
REGIONS_TOOLTIP = (
    "Each subject's region in its colour (subject 1 orange, 2 sky blue, 3 green; black: no "
    "subject's), where it was retouched from its own photos; one subject: where the blend mask "
    "is at least ½."
)


def _lambdas(*names):
    return {name: inputs.field_input(name) for name in names}


def describe(doc: str) -> str:
    """A docstring as one paragraph (ComfyUI shows DESCRIPTION as it is)."""
    return " ".join(inspect.cleandoc(doc).split())


def _verdict(refusal):
    """VALIDATE_INPUTS' answer: True, or the message ComfyUI shows on the node."""
    return True if refusal is None else refusal


def _show(unique_id, text: str) -> None:
    if text:
        CALLS.show_text(unique_id, text)


def _start_text(steps, lambdas: dict, scale_with_steps, *, stage1=True, retouch=True) -> str:
    """The "At N steps" line before the run (the run's own text replaces it); "" for values the
    run will refuse."""
    try:
        params = LayoutRetouchParams(scale_with_steps=scale_with_steps, **lambdas)
        schedule = inputs.schedule_of(steps, params, lambdas)
    except LayoutRetouchError:
        return ""
    return ui_text.steps_line(schedule, stage1=stage1, retouch=retouch)


def _result(info: str, outputs: tuple) -> dict:
    return {"ui": {"text": [info]}, "result": outputs}


def _own_words(reference, subjects, concept_token, class_phrase):
    """VALIDATE_INPUTS' view of the node's own subject: its (concept_token, class_phrase) to check,
    (None, None) when the chained Subject nodes are every subject (their words are checked on the
    run), or the refusal when there is no subject at all."""
    if reference is not inputs.UNCONNECTED:
        return concept_token, class_phrase
    if subjects is inputs.UNCONNECTED:
        try:
            S.run_subjects(None, None)
        except LayoutRetouchError as e:
            return str(inputs.node_error(e))
    return None, None


def _validate(reference, subjects, concept_token, class_phrase, **checks):
    """The Sampler's and Retouch node's VALIDATE_INPUTS: the node's own subject words (see
    `_own_words`) and `checks` (inputs.check_before_run's other arguments) as ComfyUI's verdict."""
    words = _own_words(reference, subjects, concept_token, class_phrase)
    if isinstance(words, str):
        return words
    return _verdict(
        inputs.check_before_run(concept_token=words[0], class_phrase=words[1], **checks)
    )


class LayoutRetouchSampler:
    """KSampler-like: stage 1 (vanilla MODEL for λ1 steps, then the personalized one) and the
    retouch of the subject's identity from the reference photo(s)."""

    CATEGORY = inputs.CATEGORY
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT", "MASK", "IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("retouched", "layout", "blend_mask", "attention_map", "info", "regions")
    OUTPUT_TOOLTIPS = (
        RETOUCH_TOOLTIPS[0],
        "The stage-1 layout LATENT.",
        *RETOUCH_TOOLTIPS[1:],
        INFO_TOOLTIP,
        REGIONS_TOOLTIP,
    )
    DESCRIPTION = describe(__doc__)

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
                **SUBJECTS,
                **VANILLA,
                **LATENT_IN,
                **SUBJECT_MASK,
                **SAM,
                **GUIDANCE,
                **inputs.advanced_inputs(),
            },
            "hidden": HIDDEN,
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls,
        prompt=None,
        concept_token=None,
        class_phrase=None,
        steps=None,
        lambda1=None,
        lambda2=None,
        mask_start=None,
        scale_with_steps=True,
        layout_source=None,
        latent=inputs.UNCONNECTED,
        reference=inputs.UNCONNECTED,
        subjects=inputs.UNCONNECTED,
    ):
        return _validate(
            reference,
            subjects,
            concept_token,
            class_phrase,
            prompt=prompt,
            steps=steps,
            lambdas=dict(lambda1=lambda1, lambda2=lambda2, mask_start=mask_start),
            scale_with_steps=scale_with_steps,
            layout_source=layout_source,
            latent=latent,
        )

    def sample(self, reference=None, unique_id=None, **kw):
        lambdas = {k: kw.get(k) for k in inputs.LAMBDAS}
        stage1 = kw.get("layout_source") != "input"
        _show(
            unique_id,
            _start_text(kw.get("steps"), lambdas, kw.get("scale_with_steps", True), stage1=stage1),
        )
        out = run.layout_and_retouch(CALLS, reference=reference, **kw)
        _show(unique_id, out.info)
        return _result(out.info, out.as_tuple())


class LayoutRetouchLayout:
    """Stage 1 alone: the vanilla MODEL draws the first λ1 steps with the class phrase in place of
    the concept token, the personalized MODEL the rest with your prompt."""

    CATEGORY = inputs.CATEGORY
    FUNCTION = "layout"
    RETURN_TYPES = ("LATENT", "STRING")
    RETURN_NAMES = ("layout", "info")
    OUTPUT_TOOLTIPS = ("The stage-1 layout LATENT.", "What λ1 is at this step count.")
    DESCRIPTION = describe(__doc__)

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
                "subjects": (
                    SUBJECTS_TYPE,
                    {
                        "tooltip": "Several subjects: the Subject nodes of the Retouch node this "
                        "layout goes to; each subject's concept token becomes its class phrase in "
                        "the vanilla steps' prompt (the node's own words too, unless a Subject "
                        "node has its concept token)."
                    },
                ),
                **GUIDANCE,
                **inputs.advanced_inputs(("scale_with_steps",)),
            },
            "hidden": HIDDEN,
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls,
        prompt=None,
        concept_token=None,
        class_phrase=None,
        steps=None,
        lambda1=None,
        scale_with_steps=True,
    ):
        return _verdict(
            inputs.check_before_run(
                prompt=prompt,
                concept_token=concept_token,
                class_phrase=class_phrase,
                steps=steps,
                lambdas=dict(lambda1=lambda1),
                scale_with_steps=scale_with_steps,
            )
        )

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
        guidance=GUIDANCE_DEFAULT,
        subjects=None,
        unique_id=None,
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
                subjects=subjects,
            )
        except LayoutRetouchError as e:
            raise inputs.node_error(e) from e
        info = texts.info_text(job.schedule, retouch=False)
        _show(unique_id, info)
        source = latent or {"samples": torch.zeros(batch_size, 4, height // 8, width // 8)}
        noise_mask = mask if mask is not None else source.get("noise_mask")
        bar = CALLS.progress_bar(steps * run.TICKS)
        progress = run.Progress(bar, steps, previewer=CALLS.previewer(model))
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
        return _result(info, (out, info))


class LayoutRetouchRetouch:
    """Stage 2 alone: retouch the subject's identity from the reference photo(s) into any layout
    latent (a Layout node's, a ControlNet render, an img2img result, another model's)."""

    CATEGORY = inputs.CATEGORY
    FUNCTION = "retouch"
    RETURN_TYPES = ("LATENT", "MASK", "IMAGE", "STRING", "IMAGE")
    RETURN_NAMES = ("retouched", "blend_mask", "attention_map", "info", "regions")
    OUTPUT_TOOLTIPS = (*RETOUCH_TOOLTIPS, INFO_TOOLTIP, REGIONS_TOOLTIP)
    DESCRIPTION = describe(__doc__)
    RETOUCH_LAMBDAS = ("lambda2", "mask_start")

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
                **_lambdas(*cls.RETOUCH_LAMBDAS),
            },
            "optional": {
                **REFERENCE,
                **SUBJECTS,
                "mask": (
                    "MASK",
                    {"tooltip": "Where to retouch (1 = here); the rest stays the layout's."},
                ),
                **SAM,
                **GUIDANCE,
                **inputs.advanced_inputs(advanced),
            },
            "hidden": HIDDEN,
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls,
        prompt=None,
        concept_token=None,
        class_phrase=None,
        steps=None,
        lambda2=None,
        mask_start=None,
        scale_with_steps=True,
        reference=inputs.UNCONNECTED,
        subjects=inputs.UNCONNECTED,
    ):
        return _validate(
            reference,
            subjects,
            concept_token,
            class_phrase,
            prompt=prompt,
            steps=steps,
            lambdas=dict(lambda2=lambda2, mask_start=mask_start),
            scale_with_steps=scale_with_steps,
        )

    def retouch(self, *, layout, reference=None, unique_id=None, **kw):
        lambdas = {k: kw.get(k) for k in self.RETOUCH_LAMBDAS}
        scale = kw.get("scale_with_steps", True)
        _show(unique_id, _start_text(kw.get("steps"), lambdas, scale, stage1=False))
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
        _show(unique_id, out.info)
        outputs = (out.retouched, out.mask, out.attention, out.info, out.regions)
        return _result(out.info, outputs)


class LayoutRetouchSubject:
    """One subject of several in one image: its photo(s), how it was learned, how the prompt names
    it and, for a LoRA subject, its LoRA file, which acts only in this subject's region. Chain
    Subject nodes through 'subjects' and connect the last to the Sampler's or the Retouch node's
    'subjects'; the prompt names every subject, e.g. 'a photo of sks dog and zwx cat on a sofa'."""

    CATEGORY = inputs.CATEGORY
    FUNCTION = "subject"
    RETURN_TYPES = (SUBJECTS_TYPE,)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = (
        "The subjects so far, this one last: to the next Subject node's 'subjects', or the "
        "Sampler's / Retouch node's 'subjects'.",
    )
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        kinds, options = inputs.field_input("personalization")
        return {
            "required": {
                "reference": (
                    "IMAGE",
                    {"tooltip": "Photo(s) of this subject: a batch of up to 4 is used together."},
                ),
                "personalization": (
                    kinds,
                    {**options, "default": SUBJECT_DEFAULT.personalization},
                ),
                **{name: inputs.field_input(name) for name in inputs.CONCEPT},
                "lora_name": (
                    [S.NO_LORA, *CALLS.lora_files()],
                    {
                        "tooltip": "personalization 'lora': this subject's LoRA (models/loras); "
                        "it acts only in this subject's region (its text-encoder weights are "
                        "not applied). Load no LoRA for it in the MODEL."
                    },
                ),
                "lora_strength": (
                    "FLOAT",
                    {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01},
                ),
            },
            "optional": {
                "subjects": (
                    SUBJECTS_TYPE,
                    {"tooltip": "The Subject nodes before this one (this one comes after them)."},
                )
            },
        }

    @classmethod
    def VALIDATE_INPUTS(
        cls, personalization=None, concept_token=None, class_phrase=None, lora_name=None
    ):
        try:
            if None not in (personalization, concept_token, lora_name):
                S.check_subject(personalization, concept_token, lora_name)
            if class_phrase is not None and not class_phrase.strip():
                raise LayoutRetouchError(NO_CLASS_PHRASE, parameter="class_phrase")
        except LayoutRetouchError as e:
            return str(_subject_error(e))
        return True

    def subject(
        self,
        reference,
        personalization,
        concept_token,
        class_phrase,
        lora_name=S.NO_LORA,
        lora_strength=1.0,
        subjects=None,
    ):
        try:
            S.check_subject(personalization, concept_token, lora_name)
            if not class_phrase.strip():
                raise LayoutRetouchError(NO_CLASS_PHRASE, parameter="class_phrase")
            tensors.reference_photos(reference)  # more than 4 photos: refused on this node
            lora = None
            if lora_name != S.NO_LORA:
                lora = CALLS.load_lora(lora_name)
                if lora is None:
                    raise LayoutRetouchError(
                        f"LoRA file '{lora_name}' is not in models/loras: put it there and press "
                        "R (refresh), or choose another",
                        parameter="lora_name",
                    )
            subject = S.Subject(
                reference,
                personalization,
                concept_token.strip(),
                " ".join(class_phrase.split()),
                lora_name,
                lora,
                float(lora_strength),
            )
            return (S.chained(subjects, subject),)
        except LayoutRetouchError as e:
            raise _subject_error(e) from e


SUBJECT_DEFAULT = SubjectParams()


def _subject_error(error: LayoutRetouchError) -> LayoutRetouchError:
    """A Subject node's refusal naming its own input (the Sampler's map sends 'personalization' to
    its vanilla_model socket)."""
    name = "reference" if error.parameter == "reference_image" else error.parameter
    return inputs.node_error(error, name)


class LayoutRetouchSAMLoader:
    """Load a Segment Anything checkpoint (the official ViT-B, ViT-L or ViT-H file) from ComfyUI's
    models/sams folder for the Sampler's or the Retouch node's 'sam' input: the blend mask becomes
    the paper's adaptive mask, SAM's segment of the subject joined with the cross-attention mask."""

    CATEGORY = inputs.CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (SAM_TYPE,)
    RETURN_NAMES = ("sam",)
    OUTPUT_TOOLTIPS = ("Connect to the 'sam' input of the Sampler or the Retouch node.",)
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sam_name": (
                    CALLS.sam_files(),
                    {
                        "tooltip": "A file in models/sams: "
                        + ", ".join(OFFICIAL_SAM_FILES)
                        + " (ViT-B is the lightest). The kind is read from the name or the weights."
                    },
                ),
                "device": (
                    ["auto", "cpu"],
                    {
                        "default": "auto",
                        "tooltip": "auto: ComfyUI's device (the GPU); cpu: SAM leaves the GPU's "
                        "memory to the models (slower).",
                    },
                ),
            }
        }

    def load(self, sam_name, device="auto"):
        path = CALLS.sam_path(sam_name)
        try:
            if path is None:
                raise LayoutRetouchError(
                    f"SAM file '{sam_name}' is not in models/sams: put it there and press R "
                    "(refresh), or choose another",
                    parameter="sam_model",
                )
            segmenter = load_segmenter(path, device=CALLS.sam_device(device))
        except LayoutRetouchError as e:
            raise inputs.node_error(e, "sam_name") from e
        return (segmenter,)


NODE_CLASS_MAPPINGS = {
    "LayoutRetouchSampler": LayoutRetouchSampler,
    "LayoutRetouchLayout": LayoutRetouchLayout,
    "LayoutRetouchRetouch": LayoutRetouchRetouch,
    "LayoutRetouchSAMLoader": LayoutRetouchSAMLoader,
    "LayoutRetouchSubject": LayoutRetouchSubject,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LayoutRetouchSampler": "Layout-and-Retouch Sampler",
    "LayoutRetouchLayout": "Layout-and-Retouch: Layout (stage 1)",
    "LayoutRetouchRetouch": "Layout-and-Retouch: Retouch (stage 2)",
    "LayoutRetouchSAMLoader": "Layout-and-Retouch: SAM Loader",
    "LayoutRetouchSubject": "Layout-and-Retouch Subject",
}
