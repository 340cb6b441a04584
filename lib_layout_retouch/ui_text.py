"""What the WebUI panel says to a person: grouping, extra hover hints, messages with control labels.

Host-agnostic (no WebUI imports) so it is tested with the library. The API keeps the parameter
names of `params.FIELDS`; the panel speaks in its controls' labels.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from . import NAME
from .images import find_fingerprints
from .params import FIELD_BY_NAME, FIELDS, MAX_REFERENCES, MAX_SUBJECTS

# Folded into the "Advanced" accordion; everything else is what a first-time user needs.
ADVANCED = (
    "reference_prompt",
    "sam_model",
    "ca_threshold",
    "layout_source",
    "reset_reference",
    "layer_preset",
    "stage1_text_encoder",
)

ADD_SUBJECT_LABEL = "➕ Add subject"
PANEL_INTRO = (
    "Vanilla model draws the layout, your subject is retouched in from its photo (up to 4) "
    f"([paper](https://arxiv.org/abs/2407.09779)); **{ADD_SUBJECT_LABEL}** for a second or third one. "
    "Stage 1 works with any sampler; the paper used **DDIM**."
)
ACCORDION_LABEL = NAME  # the accordion's header, with the Enable checkbox in it
ADVANCED_LABEL = "Advanced"
GUESS_LABEL = "Guess"
VANILLA_REFRESH_HINT = (
    "Vanilla checkpoint: refresh the list after adding files (the model you generate with stays "
    "as it is; the list follows it by itself)"
)
# Hover hints of controls that are no parameter (by their visible text).
MORE_PHOTOS_LABEL = f"More photos of the subject (optional, up to {MAX_REFERENCES - 1})"
# Several subjects: subject 1 is the panel's own controls, subjects 2 … each a panel of their own.
REMOVE_SUBJECT_LABEL = "✖ Remove subject"
LORA_NAME_LABEL = "LoRA name (optional)"


def subject_heading(number: int) -> str:
    """The heading of subject `number`'s panel (1-based, as the user counts)."""
    return f"Subject {number}"


EXTRA_HINTS = {
    MORE_PHOTOS_LABEL: "Other photos of the same subject (other angles, other light): the retouch attends to all "
    "of them together. Each is inverted once and cached. The API sends them in "
    "reference_image as a list.",
    GUESS_LABEL: "Fill Concept token and Class phrase from the prompt: a Textual-Inversion embedding "
    "name, a rare identifier such as sks / ohwx followed by its class word, or a LoRA tag. "
    "Several in the prompt fill subject 2 and 3 too (their panels open). It says what it could "
    "not find.",
    ADD_SUBJECT_LABEL: f"{FIELD_BY_NAME['subjects'].hint} Shows the next subject's panel (up to "
    f"{MAX_SUBJECTS}): name each in the prompt with its own concept token and class phrase, e.g. "
    "'a photo of sks dog and zwx cat on a sofa'.",
    REMOVE_SUBJECT_LABEL: "Remove this subject from the image; the subjects after it move up.",
    LORA_NAME_LABEL: "For a LoRA subject: the name of its tag in the prompt (my_dog for "
    "<lora:my_dog:1>), so its LoRA acts only in its own region. Empty: the prompt's LoRA tags are "
    "the LoRA subjects' in order.",
    ADVANCED_LABEL: "The reference prompt, the Segment-Anything mask and its threshold, the layout "
    "source, how exactly the photo is read, the attention layers and DreamBooth's stage-1 text "
    "encoder: the paper's defaults work for most subjects.",
}


# The X/Y/Z axes of the step knobs count steps at the generation's own step count (`axes`).
for _f in FIELDS:
    if _f.name in ("lambda1", "lambda2", "mask_start") and _f.axis:
        EXTRA_HINTS[f"[L&R] {_f.axis}"] = (
            f"{_f.label}: the values are steps at this generation's step count, used as given "
            "(not scaled with steps): at 10 steps the panel's paper values 5 / 10 / 31 (for 50 "
            "steps) are 1 / 2 / 7."
        )


def is_advanced(name: str) -> bool:
    return name in ADVANCED


def basic_fields():
    return [f for f in FIELDS if not is_advanced(f.name)]


def advanced_fields():
    return [f for f in FIELDS if is_advanced(f.name)]


def _label(name: str) -> str:
    return FIELD_BY_NAME[name].label


def for_ui(message: str) -> str:
    """An error message for the panel: parameter names → “control label”, choice values →
    “choice label”. (The API keeps the names.)"""
    out = message
    for f in FIELDS:
        if f.name == "enabled":
            continue
        out = re.sub(rf"(?<![\w.]){re.escape(f.name)}(?![\w])", f"“{f.label}”", out)
        for value, label in zip(f.choices, f.choice_labels):
            out = out.replace(f"'{value}'", f"“{label}”")
    return out


# Starts every refusal the panel shows; the page's script finds it by this, styles it as an
# error above the gallery and hides the infotext of the image that was not made.
REFUSAL_MARK = "⚠ Layout-and-Retouch:"
MORE_PHOTOS_UPLOADING = (
    f"“{MORE_PHOTOS_LABEL}” is still uploading — wait until the file sizes show, "
    "then Generate again"
)


# Starts each further line of a refusal with several problems (the page's script keeps them with it).
REFUSAL_ITEM = "•"


def refusal(error) -> str:
    """A refused generation as the panel shows it (above the gallery): marked, in control labels.
    `error`: a LayoutRetouchError (several problems: one line each) or its message."""
    parts = getattr(error, "problems", None) or []
    if len(parts) > 1:
        lines = [f"{REFUSAL_MARK} {len(parts)} problems, fix them all before you Generate again:"]
        lines += [f"{REFUSAL_ITEM} {for_ui(part.message)}" for part in parts]
        return "\n".join(lines)
    message = str(error)
    prefix = "Layout-and-Retouch: "  # str(LayoutRetouchError) starts with it; the mark says it once
    message = message[len(prefix) :] if message.startswith(prefix) else message
    return f"{REFUSAL_MARK} {for_ui(message)}"


def page_texts() -> dict:
    """The texts the page's script shows itself (javascript/layout_retouch.js carries them)."""
    return {
        "refusalMark": REFUSAL_MARK,
        "refusalItem": REFUSAL_ITEM,
        "moreUploading": MORE_PHOTOS_UPLOADING,
        "intermediateKey": INTERMEDIATE_KEY,  # the gallery's thumbnails get a caption from it
        "intermediateShort": {INTERMEDIATE_WHAT[k]: v for k, v in INTERMEDIATE_CAPTION.items()},
    }


def _of_subject(subject: int) -> str:
    return f" of subject {subject}" if subject > 1 else ""


def photo_notice(fingerprint: Optional[str], subject: int = 1) -> str:
    """Shown after Send to txt2img / paste: the photo is never stored in an image. `fingerprint`:
    the infotext's "LR reference" value (one fingerprint, or several joined by ", "); `subject`:
    whose photos (1-based; subjects after the first are named)."""
    prints = find_fingerprints(fingerprint or "")
    whose = _of_subject(subject)
    if len(prints) > 1:
        listed = ", ".join(f"`{p}`" for p in prints)
        return (
            f"⚠ **Upload the {len(prints)} reference photos{whose} again** (the ones used had "
            f"fingerprints {listed}): pasted parameters switch Layout-and-Retouch on and restore "
            "every control except the photos, which no image stores."
        )
    which = f" (the one used had fingerprint `{fingerprint}`)" if fingerprint else ""
    return (
        f"⚠ **Upload the reference photo{whose} again**{which}: pasted parameters switch "
        "Layout-and-Retouch on and restore every control except the photo, which no image stores."
    )


def photos_still_loaded(fingerprints: list[str], subject: int = 1) -> str:
    """Shown instead of `photo_notice` when the photos loaded in the panel are the ones used."""
    listed = ", ".join(f"`{p}`" for p in fingerprints)
    many = len(fingerprints) > 1
    what = f"photo{'s' if many else ''}{_of_subject(subject)} used {'are' if many else 'is'}"
    return (
        f"✓ The reference {what} still loaded "
        f"(fingerprint{'s' if len(fingerprints) > 1 else ''} {listed}): pasted parameters switched "
        "Layout-and-Retouch on and restored every control."
    )


def vanilla_cleared(title: str, reason: str) -> str:
    """Shown when the checkpoint at the top of the page changed and the chosen vanilla checkpoint
    no longer fits it (`reason` follows the title: "is an SD1 model but the loaded model is SDXL")."""
    label = FIELD_BY_NAME["vanilla_checkpoint"].label
    return (
        f"⚠ “{label}” was cleared: {title} {reason}. Choose the checkpoint your DreamBooth model "
        "was trained from (the list offers those that fit the loaded model)."
    )


def input_source_in_txt2img() -> str:
    """Pasted into txt2img from an image made with img2img's layout source 'input'."""
    f = FIELD_BY_NAME["layout_source"]
    labels = dict(zip(f.choices, f.choice_labels))
    return (
        f"⚠ The image's “{f.label}” was “{labels['input']}”, which only img2img has: txt2img "
        f"uses “{labels[f.default]}” instead (send the image to img2img to retouch it as it is)."
    )


def guess_message(prompt: str, found, embeddings: Iterable[str] = ()) -> str:
    """What the Guess button says about its result. `found`: `guess_concept`'s (token, class) or
    None, or `guess_subjects`' list of them."""
    if not (prompt or "").strip():
        return "⚠ Guess: the prompt is empty; write a prompt with your concept token first."
    if not found:
        names = list(embeddings)
        tried = "no Textual-Inversion embedding name" + (
            f" ({', '.join(names[:5])}{'…' if len(names) > 5 else ''})" if names else ""
        )
        return (
            f"⚠ Guess found no concept token in the prompt ({tried}, no rare identifier such as "
            "sks / ohwx / zwx, no `<lora:…>` tag): type the token and the class phrase yourself."
        )
    if isinstance(found, list):  # every subject `guess_subjects` found
        if len(found) > 1:
            return _several_guessed(found)
        found = found[0]
    token, cls = found
    if not cls:
        return (
            f"Guess: concept token `{token}`; no class phrase found after it — type what a normal "
            "model calls your subject (e.g. dog)."
        )
    return f"Guess: concept token `{token}`, class phrase `{cls}`."


def _several_guessed(found) -> str:
    parts = [
        f"subject {k} `{token}`" + (f" {cls}" if cls else "")
        for k, (token, cls) in enumerate(found, start=1)
    ]
    line = f"Guess: {', '.join(parts)}."
    missing = [f"`{token}`" for token, cls in found if not cls]
    if missing:
        line += (
            f" No class phrase found after {', '.join(missing)} — type what a normal model calls "
            "each (e.g. dog, cat)."
        )
    return line


# The key that labels an intermediate image's infotext (no `LR ` prefix: it is not a retouched image).
INTERMEDIATE_KEY = "Layout-and-Retouch intermediate"
INTERMEDIATE_WHAT = {
    "layout": "stage-1 layout",
    "mask": "blend mask",
    "attention map": "subject cross-attention map",
    "regions": "subject regions",  # several subjects: one colour each (job.SUBJECT_COLOURS)
}


# The thumbnails' captions: a word that fits a thumbnail (≈ 40 px at 1280 px), the full label on hover.
INTERMEDIATE_CAPTION = {
    "layout": "layout",
    "mask": "mask",
    "attention map": "map",
    "regions": "regions",
}


def intermediate_label(kind: str, index: int) -> str:
    """`layout of image 1` etc. (`index` 0-based)."""
    return f"{INTERMEDIATE_WHAT.get(kind, kind)} of image {index + 1}"


def steps_line(schedule, *, stage1: bool = True, retouch: bool = True) -> str:
    """What λ1 / λ2 / mask start are at this step count, in the WebUI's "At N steps" words:
    "At 4 steps: λ1=1, λ2=1, mask from step 3 of 4 (scaled from 5 / 10 / 31 for 50 steps)".
    `stage1` False: no λ1 (no stage 1); `retouch` False: λ1 only (a layout alone)."""
    if retouch:
        used = schedule.describe(stage1=stage1)
    else:
        used = f"λ1={schedule.lambda1}"
    line = f"At {schedule.steps} steps: {used}"
    if schedule.scaled_from is not None:
        l1, l2, start, reference_steps = schedule.scaled_from
        given = [l1] if not retouch else ([l1] if stage1 else []) + [l2, start]
        if reference_steps != schedule.steps:
            line += (
                f" (scaled from {' / '.join(str(v) for v in given)} for {reference_steps} steps)"
            )
    return line
