"""One enabled generation, host-agnostic: what the WebUI glue asks the library for.

`RetouchJob` turns validated parameters plus the generation's prompt, size and step count into
everything both stages need — the schedule at this step count, y_p / y_p⁻ / y_r, the prepared
reference — and runs the retouch on a batch of stage-1 latents. The glue only wires host objects
(the model, the progress bar, the Interrupt button) to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from . import retouch as pipeline
from .errors import LayoutRetouchError
from .images import image_fingerprint, prepare_reference, reference_size_terms
from .params import NO_SAM, LayoutRetouchParams, reference_error
from .prompts import RetouchPrompts, SubjectWords
from .subjects import derive_subject_prompts, subject_rows
from .unet.model import LdmModel

# Reference inversions across generations (pipeline.INVERSION_ENTRY_MB each); the WebUI setting
# "Reference inversions kept in memory" sets the size.
SHARED_INVERSION_CACHE = pipeline.InversionCache()
# The reference path's K/V across generations: opt-in (pipeline.KV_REFERENCE_MB a reference), so
# 0 bytes until the WebUI setting "Reference attention cache, MB of VRAM" says otherwise.
SHARED_REFERENCE_ATTENTION_CACHE = pipeline.ReferenceAttentionCache(max_bytes=0)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB → (1, 3, H, W) float in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] → PIL images."""
    return [Image.fromarray(a) for a in pipeline.to_uint8(x)]


def mask_to_image(mask: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """(H, W) in [0, 1] → grey PIL image at `size` (w, h), nearest so cells stay visible."""
    arr = (mask.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr, mode="L").resize(size, Image.NEAREST).convert("RGB")


# Several subjects: each subject's colour in the regions image (subject 1, 2, 3), distinct for the
# colour-blind; black where no subject is. One home: the WebUI's intermediates, ComfyUI's output and
# the evaluation's reader (`regions_from_image`) all use it.
SUBJECT_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115))


def regions_to_image(regions: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """(H, W) subject index (masks.NO_REGION outside) → RGB image at `size` (w, h), one colour per
    subject, nearest so cells stay visible."""
    index = regions.detach().long().cpu().numpy()
    arr = np.zeros((*index.shape, 3), dtype=np.uint8)
    for k, colour in enumerate(SUBJECT_COLOURS):
        arr[index == k] = colour
    return Image.fromarray(arr, mode="RGB").resize(size, Image.NEAREST)


def regions_from_image(image: Image.Image) -> np.ndarray:
    """`regions_to_image`'s picture back to a subject index (H, W) (-1 where no subject's colour)."""
    arr = np.asarray(image.convert("RGB"))
    index = np.full(arr.shape[:2], -1, dtype=np.int64)
    for k, colour in enumerate(SUBJECT_COLOURS):
        index[(arr == np.array(colour, dtype=np.uint8)).all(axis=-1)] = k
    return index


@dataclass
class RetouchJob:
    params: LayoutRetouchParams
    prompt: str
    negative_prompt: str
    steps: int
    width: int
    height: int
    guidance_scale: float
    notes: list[str] = field(default_factory=list)
    # img2img: `steps` is then the number of steps the img2img sampler RUNS
    # (schedule.img2img_steps); `requested_steps` the slider's value, for the infotext only.
    img2img: bool = False
    requested_steps: Optional[int] = None
    # What the host's sampler really runs in stage 1 when it is not `steps` model calls
    # ("DDIM runs 9 steps for 10 (…)"), for the infotext; "" otherwise.
    stage1_words: str = ""

    def __post_init__(self) -> None:
        self.params.validate()
        if self.width % 8 or self.height % 8:
            raise LayoutRetouchError(
                f"image size {self.width}×{self.height} is not a multiple of 8", parameter="width"
            )
        if self.params.layout_source == "input" and not self.img2img:
            raise LayoutRetouchError(
                "layout_source 'input' retouches the img2img input image itself, but this is no img2img "
                "generation: use it in the img2img tab, or choose 'inversion'",
                parameter="layout_source",
            )
        self.schedule = self.params.schedule(self.steps)
        self.subjects = self.params.all_subjects()
        words = [SubjectWords(s.concept_token, s.class_phrase) for s in self.subjects]
        self.prompts: RetouchPrompts = derive_subject_prompts(
            self.prompt, words, self.params.reference_prompt or None
        )
        size = (self.width, self.height)
        # One entry per reference photo, in order, subject by subject (prepared image, fingerprint
        # of it, SDXL size terms); `reference_groups`: how many photos each subject has.
        self.references: list[Image.Image] = []
        self.reference_sizes = []
        self.reference_groups = tuple(len(s.references) for s in self.subjects)
        for k, subject in enumerate(self.subjects):
            self._prepare_photos(subject.references, size, k)
        self.reference_fingerprints = [image_fingerprint(img) for img in self.references]
        # The first reference (the only one, with one photo): what single-photo callers read.
        self.reference = self.references[0]
        self.reference_fingerprint = self.reference_fingerprints[0]
        self.reference_size = self.reference_sizes[0]
        self.mask_kind: Optional[str] = None

    def _prepare_photos(self, photos, size, k: int) -> None:
        """Subject k's reference photos, prepared at the generation size (notes name the photo and,
        with several subjects, the subject)."""
        subject = f"subject {k + 1}: " if len(self.subjects) > 1 else ""
        for i, photo in enumerate(photos):
            try:
                prepared, ref_notes = prepare_reference(photo, size)
                self.reference_sizes.append(reference_size_terms(photo, size))
            except LayoutRetouchError as e:
                error = reference_error(e, i, len(photos))
                raise LayoutRetouchError(subject + error.args[0], parameter=error.parameter) from e
            self.references.append(prepared)
            which = "" if len(photos) == 1 else f"reference photo {i + 1} of {len(photos)}: "
            self.notes.extend(subject + which + n for n in ref_notes)

    @property
    def several_subjects(self) -> bool:
        return len(self.subjects) > 1

    def subject_rows(self, model, prompt: Optional[str] = None) -> list:
        """The conditioning rows of each subject in y_p as the model's family reads them: one
        subject's list, or one list per subject (refused where two subjects share a row)."""
        prompt = self.prompts.personalized if prompt is None else prompt
        words = self.prompts.subject_words()
        rows = subject_rows(
            lambda text, phrases: model.family.subject_tokens(model, text, phrases), prompt, words
        )
        return rows if self.several_subjects else rows[0]

    # -- stage 1 ---------------------------------------------------------------------------------
    def uses_vanilla(self, s: int) -> bool:
        """Stage 1 at (1-based) step s: vanilla model with y_p⁻?"""
        return 1 <= s <= self.steps and self.schedule.uses_vanilla(s)

    # -- stage 2 ---------------------------------------------------------------------------------
    def settings(self, **overrides) -> pipeline.RetouchSettings:
        return pipeline.RetouchSettings(
            schedule=self.schedule,
            guidance_scale=self.guidance_scale,
            ca_threshold=self.params.ca_threshold,
            reset_reference=self.params.reset_reference,
            layer_preset=self.params.layer_preset,
            subject_labels=tuple(w.label for w in self.prompts.subject_words()),
            **overrides,
        )

    def reference_keys(self, model_key: str) -> list[tuple]:
        """The inversion cache's reference keys, one per photo: (fingerprint, model_key)."""
        return [(fp, model_key) for fp in self.reference_fingerprints]

    def references_cached(
        self, cache: Optional[pipeline.InversionCache], model_key: str, latent_hw
    ) -> int:
        """How many of the photos' inversions `cache` already holds (for the progress plan)."""
        if cache is None:
            return 0
        return sum(
            cache.peek(pipeline.inversion_key(k, self.steps, tuple(latent_hw))) is not None
            for k in self.reference_keys(model_key)
        )

    def retouch(
        self,
        model: LdmModel,
        layout_latents: torch.Tensor,
        *,
        subject_tokens: Sequence[int],
        model_key: str,
        layout_trajectory: Optional[Sequence[torch.Tensor]] = None,
        layout_images: Optional[np.ndarray] = None,
        segmenter=None,
        cache: Optional[pipeline.InversionCache] = SHARED_INVERSION_CACHE,
        kv_cache: Optional[pipeline.ReferenceAttentionCache] = SHARED_REFERENCE_ATTENTION_CACHE,
        progress: Optional[pipeline.ProgressFn] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        user_mask: Optional[torch.Tensor] = None,
        subject_weights=None,
        base_weights=None,
    ) -> pipeline.RetouchResult:
        """Stage 2 on `layout_latents` (N, C, h, w): stage 1's result, or with layout_source
        'input' the img2img input's latents (then pass no `layout_trajectory`: it is inverted).
        `user_mask`: inpaint, (N or 1, 1, h, w) float in [0, 1] at latent resolution (1 = retouch);
        the result equals `layout_latents` exactly where it is 0. Several subjects: `subject_tokens`
        one list per subject (`subject_rows`); `subject_weights`/`base_weights` the host's
        contexts for each subject's own weights (its LoRA alone) and for none of them."""
        keys = self.reference_keys(model_key)
        reference_latent = self._reference_latents(model, keys, cache, layout_latents)
        conds = pipeline.encode_prompts(
            model,
            self.prompts,
            self.negative_prompt,
            image_size=(self.width, self.height),
            reference_size=self.reference_sizes if len(keys) > 1 else self.reference_size,
            reference_subjects=self.reference_subjects() if self.several_subjects else None,
        )
        if layout_trajectory is not None and self.params.layout_source == "input":
            raise ValueError(
                "layout_source 'input' inverts the input's latents: pass no layout_trajectory"
            )
        result = pipeline.retouch(
            model,
            reference_latent=reference_latent,
            layout_latents=layout_latents,
            conds=conds,
            subject_tokens=subject_tokens,
            settings=self.settings(),
            layout_trajectory=layout_trajectory,
            layout_images=layout_images,
            segmenter=segmenter,
            reference_keys=keys,
            cache=cache,
            kv_cache=kv_cache,
            progress=progress,
            should_stop=should_stop,
            user_mask=user_mask,
            reference_groups=self.reference_groups if self.several_subjects else None,
            subject_weights=subject_weights,
            base_weights=base_weights,
        )
        self.mask_kind = result.mask_kind
        for note in result.notes:
            if note not in self.notes:
                self.notes.append(note)
        return result

    def reference_subjects(self) -> list[int]:
        """The subject of each reference photo, in order."""
        return [k for k, count in enumerate(self.reference_groups) for _ in range(count)]

    def _reference_latents(self, model, keys, cache, layout_latents) -> torch.Tensor:
        """The photos' latents (R, C, h, w); a cached inversion starts with its photo's latent, so
        no VAE pass for those."""
        latents = []
        for key, img in zip(keys, self.references):
            inversion_key = pipeline.inversion_key(key, self.steps, layout_latents.shape[-2:])
            cached = cache.peek(inversion_key) if cache is not None else None
            if cached is not None:
                latents.append(cached[0])
            else:
                image = image_to_tensor(img).to(layout_latents.device)
                latents.append(model.encode(image).to(layout_latents.dtype))
        return torch.cat(latents)

    # -- batches -------------------------------------------------------------------------------
    def for_batch(self, prompt: str, negative_prompt: str) -> "RetouchJob":
        """This job for a batch whose prompt differs from the request's (a style, wildcards): its own
        prompts and its own notes list. `merge_notes` brings its notes back, each once."""
        return RetouchJob(
            self.params,
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=self.steps,
            width=self.width,
            height=self.height,
            guidance_scale=self.guidance_scale,
            img2img=self.img2img,
            requested_steps=self.requested_steps,
        )

    def merge_notes(self, other: "RetouchJob") -> None:
        for note in other.notes:
            self.add_note(note)

    # -- record --------------------------------------------------------------------------------
    def infotext(self) -> dict[str, str]:
        info = self.params.to_infotext(self.steps, mask_kind=self.mask_kind)
        if self.img2img and self.requested_steps is not None and self.requested_steps != self.steps:
            # the values above are at the steps img2img ran; say so next to them
            info["LR steps used"] += f" (img2img ran {self.steps} of {self.requested_steps} steps)"
        if self.stage1_words:
            info["LR steps used"] += f"; stage 1: {self.stage1_words}"
        if self.params.sam_model != NO_SAM and self.mask_kind == pipeline.MASK_CA_ONLY:
            self.add_note(f"SAM '{self.params.sam_model}' not used; cross-attention mask only")
        if self.notes:
            info["LR notes"] = "; ".join(self.notes)
        return info

    def add_note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)
