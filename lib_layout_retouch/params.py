"""All of the extension's parameters in ONE validated object.

`FIELDS` is the single source of truth: its order is the UI component order and the positional API
order (A1111 passes script args positionally), and each field carries its label, hint, UI range and
infotext key. `LayoutRetouchParams` coerces what the UI/API sends, validates it with messages that
name the parameter and the fix, and (de)serialises to the API dict and the infotext. Modelled on
sd-webui-controlnet's `internal_controlnet/args.py`, with dataclasses instead of pydantic.
"""

from __future__ import annotations

import base64
import difflib
import io
import math
import numbers
import re
from dataclasses import dataclass
from dataclasses import fields as dc_fields
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from .errors import LayoutRetouchError, check_range, combine
from .images import NO_IMAGE, decode_image, find_fingerprints, image_fingerprint
from .masks import CA_THRESHOLD_FIX, CA_THRESHOLD_MEANING, CA_THRESHOLD_RANGE, DEFAULT_CA_THRESHOLD
from .prompts import NO_CLASS_PHRASE, NO_CONCEPT_TOKEN
from .retouch.layers import DEFAULT_PRESET, PRESETS
from .sampler_steps import SamplerSteps
from .schedule import (
    KNOBS,
    PAPER_LAMBDA1,
    PAPER_LAMBDA1_CHALLENGING,
    PAPER_LAMBDA2,
    PAPER_MASK_START,
    PAPER_STEPS,
    Schedule,
)
from .subjects import MAX_SUBJECTS

PERSONALIZATION_KINDS = ("dreambooth", "textual_inversion", "lora", "photo")
PHOTO_ONLY = "photo"  # no trained model: the identity comes from the reference photos alone
# What each subject after the first is given with (subject 1: the flat fields of the same names).
SUBJECT_KEYS = ("reference_image", "personalization", "concept_token", "class_phrase", "lora")
LAYOUT_SOURCES = ("inversion", "stage1", "input")
# Reference photos the target attends to at once. Each adds one row per CFG half to every retouch
# step and n tokens to the reference layers' keys/values (and one inversion, cached per photo).
MAX_REFERENCES = 4
# Several fingerprints in "LR reference" are joined with this (one photo: the fingerprint alone,
# as before, so old infotexts paste the same).
FINGERPRINT_SEPARATOR = ", "
STAGE1_TEXT_ENCODERS = ("vanilla", "loaded")
NO_SAM = "none"
INFOTEXT_PREFIX = "LR "

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Field:
    name: str  # API name (dict key) and dataclass attribute
    default: Any
    kind: str  # "bool" | "int" | "float" | "str" | "choice" | "image"
    label: str  # UI label
    hint: str  # UI tooltip and README meaning
    infotext_key: str | None  # None = not written to the infotext
    # Range. For "float" fields with exclusive=True the value must lie strictly inside
    # (minimum, maximum) and the slider runs from minimum+step to maximum-step. For the step counts
    # ("int") minimum is the smallest value `validate` accepts and maximum the slider's end at
    # PAPER_STEPS; their step-count-dependent rules are `Schedule`'s.
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()  # values, for kind "choice"
    choice_labels: tuple[str, ...] = ()  # UI labels, same order; accepted as input too
    step: float | None = None  # UI slider step
    exclusive: bool = False
    symbol: str = ""  # how messages name it ("λ1")
    meaning: str = (
        ""  # what it is, for messages: "the number of first steps drawn by the vanilla model"
    )
    axis: str = ""  # X/Y/Z axis label (after "[L&R] "); "" = no axis
    axis_choices: str | None = (
        None  # "bool" | "checkpoints" | "sam" | "layer_presets": the glue supplies the lists
    )
    doc: str = ""  # README-only addition to the hint (API details)

    def slider_range(self) -> tuple[float, float]:
        """The UI slider's (minimum, maximum): the valid range, ends left out when they are excluded."""
        if self.exclusive:
            return self.minimum + self.step, self.maximum - self.step
        return self.minimum, self.maximum

    def range_text(self) -> str:
        """The valid range in words (README), or "" for fields without one."""
        if self.minimum is None:
            return ""
        low, high = self.slider_range()
        if self.kind == "int":
            return f"At least {self.minimum:g} (slider {low:g}–{high:g} at {PAPER_STEPS} steps)."
        if self.exclusive:
            return (
                f"Strictly between {self.minimum:g} and {self.maximum:g} (slider {low:g}–{high:g})."
            )
        return f"From {self.minimum:g} to {self.maximum:g}."

    def words(self) -> str:
        """'λ1 (the number of first steps drawn by the vanilla model)' — for messages."""
        return f"{self.symbol} ({self.meaning})" if self.symbol else self.meaning

    def check_range(self, value: float, fix: str = "") -> float:
        """`value`, or a LayoutRetouchError naming the field, its meaning and its range."""
        symbol = self.symbol if self.symbol and self.symbol != self.name.replace("_", " ") else ""
        high = None if self.kind == "int" else self.maximum
        return check_range(
            self.name,
            value,
            self.minimum,
            high,
            exclusive=self.exclusive,
            symbol=symbol,
            meaning=self.meaning,
            fix=fix,
        )


FIELDS: tuple[Field, ...] = (
    Field(
        "enabled",
        False,
        "bool",
        "Enable Layout-and-Retouch",
        "Let the vanilla model draw the layout, then retouch the subject's identity from the "
        "reference photo.",
        None,
        axis="Enable",
        axis_choices="bool",
    ),
    Field(
        "reference_image",
        None,
        "image",
        "Reference photo of the subject",
        f"One photo of your subject, or up to {MAX_REFERENCES}: the subject's identity is taken "
        "from all of them together. Each is centre-cropped to the image's aspect ratio; the "
        "infotext records their fingerprints.",
        "LR reference",
        doc="In the API: base64 (with or without a `data:image/...;base64,` prefix), or a list of "
        f"up to {MAX_REFERENCES} such strings.",
    ),
    Field(
        "personalization",
        "dreambooth",
        "choice",
        "Personalized model type",
        "How your subject was learned: a DreamBooth checkpoint (the loaded model; choose the "
        "vanilla checkpoint below), or a Textual-Inversion embedding / LoRA in the prompt on the "
        "loaded (vanilla) model.",
        "LR personalization",
        choices=PERSONALIZATION_KINDS,
        choice_labels=(
            "DreamBooth checkpoint",
            "Textual Inversion embedding",
            "LoRA",
            "Photos only (no trained model)",
        ),
        doc="`photo`: no trained model at all — the identity comes from the reference photos "
        "alone through the retouch; no concept token is needed (the class phrase names the "
        "subject in the prompt).",
    ),
    Field(
        "vanilla_checkpoint",
        "",
        "str",
        "Vanilla checkpoint",
        "The original checkpoint your DreamBooth model was fine-tuned from; it draws the layout. "
        "Not needed for Textual Inversion or LoRA.",
        "LR vanilla checkpoint",
        axis="Vanilla checkpoint",
        axis_choices="checkpoints",
        doc="In the API: a title or name from the WebUI's checkpoint list.",
    ),
    Field(
        "concept_token",
        "",
        "str",
        "Concept token",
        "The word in your prompt that stands for the subject, e.g. sks or <my-vase>.",
        "LR concept token",
    ),
    Field(
        "class_phrase",
        "",
        "str",
        "Class phrase",
        "What a normal model calls the subject, e.g. dog or red vase. Replaces the concept token "
        "in the vanilla model's prompt and finds the subject for the mask.",
        "LR class phrase",
    ),
    Field(
        "reference_prompt",
        "",
        "str",
        "Reference prompt (optional)",
        "Neutral prompt for the reference and target paths; empty means "
        "'a photo of <concept token> <class phrase>'.",
        "LR reference prompt",
    ),
    Field(
        "lambda1",
        PAPER_LAMBDA1,
        "int",
        "λ1: vanilla layout steps",
        f"How many first steps the vanilla model draws (paper: {PAPER_LAMBDA1}; "
        f"{PAPER_LAMBDA1_CHALLENGING} for hard prompts). Larger "
        "follows the prompt better but weakens the identity.",
        "LR lambda1",
        minimum=0,
        maximum=PAPER_STEPS,
        step=1,
        symbol=KNOBS["lambda1"][0],
        meaning=KNOBS["lambda1"][1],
        axis="Lambda1",
    ),
    Field(
        "lambda2",
        PAPER_LAMBDA2,
        "int",
        "λ2: retouch steps that keep the layout",
        "How many first steps of the retouch keep the layout exactly before your subject's "
        f"identity is painted in (paper: {PAPER_LAMBDA2}). Larger keeps more of the layout's "
        "shapes; smaller lets the photo change more.",
        "LR lambda2",
        minimum=0,
        maximum=PAPER_STEPS,
        step=1,
        symbol=KNOBS["lambda2"][0],
        meaning=KNOBS["lambda2"][1],
        axis="Lambda2",
    ),
    Field(
        "mask_start",
        PAPER_MASK_START,
        "int",
        "Mask blending from step",
        "From this step of the retouch on, everything outside the subject mask is kept from the "
        f"layout (paper: {PAPER_MASK_START} of {PAPER_STEPS}); {PAPER_STEPS + 1} "
        "turns this blending off.",
        "LR mask start",
        minimum=2,
        maximum=PAPER_STEPS + 1,
        step=1,
        symbol=KNOBS["mask_start"][0],
        meaning=KNOBS["mask_start"][1],
        axis="Mask start",
    ),
    Field(
        "scale_with_steps",
        True,
        "bool",
        "Scale λ1, λ2 and mask start with the step count",
        f"On: the three values are for {PAPER_STEPS} steps and are scaled to your step count. "
        "Off: they are used as they are; unticking puts in the values used at your step count.",
        "LR scale with steps",
    ),
    Field(
        "sam_model",
        NO_SAM,
        "str",
        "Segment-Anything model",
        f"SAM checkpoint that sharpens the subject mask; '{NO_SAM}' uses the cross-attention "
        "mask only.",
        "LR SAM model",
        axis="SAM model",
        axis_choices="sam",
        doc="In the API: a file name from the list (`models/sam`).",
    ),
    Field(
        "ca_threshold",
        DEFAULT_CA_THRESHOLD,
        "float",
        "Cross-attention mask threshold",
        "How strongly a place must attend to the subject's words to count as the subject in the "
        "mask, relative to the strongest place (MasaCtrl "
        f"{DEFAULT_CA_THRESHOLD}, DreamMatcher 0.05); lower gives a larger mask. Must be between "
        f"{CA_THRESHOLD_RANGE[0]:g} and {CA_THRESHOLD_RANGE[1]:g}.",
        "LR CA threshold",
        minimum=CA_THRESHOLD_RANGE[0],
        maximum=CA_THRESHOLD_RANGE[1],
        step=0.01,
        exclusive=True,
        meaning=CA_THRESHOLD_MEANING,
        axis="CA threshold",
    ),
    Field(
        "show_intermediates",
        False,
        "bool",
        "Show layout, mask and attention map",
        "Add each image's stage-1 layout, its blend mask and its subject cross-attention map to "
        "the gallery after the results (a viewing option: not written to the infotext).",
        None,
    ),
    Field(
        "layout_source",
        "inversion",
        "choice",
        "Layout source",
        "What the retouch keeps the layout from: the stage-1 image turned back into noise by DDIM "
        "inversion (paper), or the noisy images stage 1 passed through (faster: no inversion; needs "
        "the DDIM sampler, else the image is inverted and the infotext says so), or — img2img only "
        "— the input image itself (no stage 1: your subject is put into that picture).",
        "LR layout source",
        choices=LAYOUT_SOURCES,
        choice_labels=(
            "DDIM inversion of the layout (paper)",
            "Stage-1 latents (faster)",
            "The input image itself (img2img)",
        ),
    ),
    Field(
        "reset_reference",
        True,
        "bool",
        "Read the reference photo exactly at every step",
        "The photo is turned into noise once and replayed beside your image, which takes the "
        "subject's identity from it at every step. On: each step restarts the replay from the "
        "photo's own stored noise, so it is read exactly (as MasaCtrl and DreamMatcher do). Off: "
        "the replay runs on by itself and may drift from the photo.",
        "LR reset reference",
    ),
    Field(
        "layer_preset",
        DEFAULT_PRESET,
        "choice",
        "Attention layer preset",
        "Which decoder self-attention layers take the reference's identity (and blend the mask): "
        "standard = the paper's (SD1: decoder blocks 10–15 of 16; SDXL: output_blocks.1–5, 26 of 70 "
        "layers); light = only the finer of those levels (SD1: output_blocks.9–11; SDXL: "
        "output_blocks.3–5), for when the reference's pose or background bleeds in.",
        "LR layer preset",
        choices=PRESETS,
        choice_labels=("Standard (paper)", "Light"),
        axis="Layer preset",
        axis_choices="layer_presets",
    ),
    Field(
        "stage1_text_encoder",
        "vanilla",
        "choice",
        "Stage-1 text encoder (DreamBooth)",
        "Which text encoder reads the prompt of the vanilla model's steps (yours with the class "
        "phrase in place of the concept token) in DreamBooth mode: the vanilla checkpoint's own "
        "(what the vanilla model understands; DreamBooth often fine-tunes the text encoder too), "
        "or the loaded personalized model's.",
        "LR stage-1 text encoder",
        choices=STAGE1_TEXT_ENCODERS,
        choice_labels=("Vanilla checkpoint's", "Loaded model's"),
    ),
    Field(
        "subjects",
        (),
        "subjects",
        "More subjects",
        f"Subjects 2 to {MAX_SUBJECTS} in the same image, each from its own photos: each is "
        "retouched only in its own region of the layout, from its own reference photos (and its "
        "own LoRA).",
        None,
        doc="In the API: a list of dicts with the keys "
        + ", ".join(f"`{k}`" for k in SUBJECT_KEYS)
        + ". When `reference_image`, `concept_token` and `class_phrase` are not given, the list "
        "is every subject (the first is subject 1); otherwise those names are subject 1 and the "
        "list the subjects after it.",
    ),
)
FIELD_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)


def _norm_choice(text: str) -> str:
    return re.sub(r"[\s\-]+", "_", text.strip().lower())


def _type_error(f: Field, value: Any, wanted: str) -> LayoutRetouchError:
    return LayoutRetouchError(
        f"{f.name} must be {wanted}, got {value!r} ({type(value).__name__})", parameter=f.name
    )


def _coerce(f: Field, value: Any) -> Any:
    """One UI/API value → the field's type, or a LayoutRetouchError naming the field."""
    if f.kind == "image":
        if _no_image(value):
            return None
        if isinstance(value, (list, tuple)):
            return _coerce_references(f, value)
        return decode_image(value)
    if value is None:  # Gradio sends None for untouched components; the API may send null
        return f.default
    try:
        coerce = _COERCE[f.kind]
    except KeyError:
        raise AssertionError(f"unknown field kind {f.kind!r}") from None  # a bug in FIELDS
    return coerce(f, value)


def _to_bool(f: Field, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Real) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _type_error(f, value, "true or false")


def _to_int(f: Field, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise _type_error(f, value, "a whole number")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number.is_integer():
            return int(number)
    raise _type_error(f, value, "a whole number")


def _to_float(f: Field, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise _type_error(f, value, "a number")
    number = math.nan
    if isinstance(value, numbers.Real):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if not math.isfinite(number):
        raise _type_error(f, value, "a number")
    return number


def _to_str(f: Field, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(f, value, "text")
    text = value.strip()
    if f.name == "sam_model" and text.lower() in ("", NO_SAM):
        return NO_SAM
    return text


def _to_choice(f: Field, value: Any) -> str:
    text = _to_str(f, value)
    key = _norm_choice(text)
    for choice, label in zip(f.choices, f.choice_labels or f.choices):
        if key in (_norm_choice(choice), _norm_choice(label)):
            return choice
    allowed = ", ".join(f"'{c}'" for c in f.choices)
    raise LayoutRetouchError(
        f"{f.name} is '{text}', which is not one of {allowed}: choose one of those",
        parameter=f.name,
    )


# -- several subjects --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectParams:
    """One subject: its photos, how it was learned, how the prompt names it, and (LoRA) the name of
    its LoRA tag in the prompt — empty: the LoRA tags are taken in order."""

    reference_image: Any = None
    personalization: str = "lora"
    concept_token: str = ""
    class_phrase: str = ""
    lora: str = ""

    @property
    def references(self) -> list:
        value = self.reference_image
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    @property
    def photo_only(self) -> bool:
        return self.personalization == PHOTO_ONLY

    def to_dict(self, images: bool = True) -> dict:
        out = {k: getattr(self, k) for k in SUBJECT_KEYS}
        if images:
            refs = [_encode_png(img) for img in self.references]
            out["reference_image"] = refs[0] if len(refs) == 1 else (refs or None)
        else:
            out.pop("reference_image")
        return out


def _to_subjects(f: Field, value: Any) -> tuple:
    """The API's / UI's list of subject dicts → SubjectParams, each value checked as its flat
    field is; messages name the subject ("subjects[2].class_phrase …", numbered as the user counts:
    subject 2 is the first of this list)."""
    if isinstance(value, (SubjectParams, Mapping)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _type_error(f, value, "a list of subjects (dicts)")
    out = []
    for i, item in enumerate(value):
        number = i + 2
        if isinstance(item, SubjectParams):
            out.append(item)
            continue
        if not isinstance(item, Mapping):
            raise LayoutRetouchError(
                f"subject {number} must be a dict with the keys {', '.join(SUBJECT_KEYS)}, got "
                f"{type(item).__name__}",
                parameter="subjects",
            )
        values = {}
        for key, raw in item.items():
            if key not in SUBJECT_KEYS:
                close = difflib.get_close_matches(str(key), SUBJECT_KEYS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise LayoutRetouchError(
                    f"subject {number}: unknown key '{key}'{hint}; valid keys are: "
                    + ", ".join(SUBJECT_KEYS),
                    parameter="subjects",
                )
            field = FIELD_BY_NAME.get(key) or _LORA_FIELD
            try:
                values[key] = _coerce(field, raw)
            except LayoutRetouchError as e:
                raise LayoutRetouchError(
                    f"subject {number}: {e.args[0]}", parameter="subjects"
                ) from e
        out.append(SubjectParams(**values))
    return tuple(out)


_LORA_FIELD = Field(
    "lora", "", "str", "LoRA", "The name of the subject's LoRA tag in the prompt.", None
)


# How each field kind (but "image") is read from what the UI or the API sends.
_COERCE = {
    "bool": _to_bool,
    "int": _to_int,
    "float": _to_float,
    "str": _to_str,
    "choice": _to_choice,
    "subjects": _to_subjects,
}


def _no_image(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _coerce_references(f: Field, values: Sequence[Any]) -> list[Image.Image] | None:
    """Several reference photos (API list, UI gallery) → a list of PIL images, or None when every
    entry is empty. Messages number the photos as sent: "reference photo 2 of 3: …"."""
    given = [(i, v) for i, v in enumerate(values) if not _no_image(v)]
    if not given:
        return None
    if len(given) > MAX_REFERENCES:
        raise LayoutRetouchError(
            f"{f.name} has {len(given)} photos but at most {MAX_REFERENCES} are used: remove "
            f"{len(given) - MAX_REFERENCES} of them (keep the ones that show the subject best)",
            parameter=f.name,
        )
    images = []
    for i, value in given:
        try:
            images.append(decode_image(value))
        except LayoutRetouchError as e:
            raise reference_error(e, i, len(values)) from e
    return images


def reference_error(error: LayoutRetouchError, index: int, count: int) -> LayoutRetouchError:
    """`error` about one of several photos, prefixed with which: "reference photo 2 of 3: …"
    (`index` 0-based). With one photo the message is unchanged."""
    if count <= 1:
        return error
    message = str(error.args[0]) if error.args else str(error)
    return LayoutRetouchError(
        f"reference photo {index + 1} of {count}: {message}",
        parameter=error.parameter or "reference_image",
    )


def fingerprints_from_infotext(info: Mapping[str, Any]) -> list[str]:
    """The reference fingerprints a pasted infotext records ("LR reference"), in order; [] if none."""
    value = info.get(FIELD_BY_NAME["reference_image"].infotext_key)
    if not isinstance(value, str):
        return []
    return find_fingerprints(value)


def _format_infotext(f: Field, value: Any) -> str:
    if f.kind == "float":
        return repr(float(value))
    return str(value)


def _encode_png(img: Image.Image) -> str:
    if img.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


NO_CONCEPT_TOKEN_OR_PHOTO = (
    NO_CONCEPT_TOKEN + "; a subject with no trained model takes personalization 'photo' (no token)"
)
_NO_VANILLA_CHECKPOINT = (
    "vanilla_checkpoint is empty, but personalization 'dreambooth' needs it: choose the original "
    "checkpoint your DreamBooth model was fine-tuned from (e.g. v1-5-pruned-emaonly.safetensors), "
    "or set personalization to 'textual_inversion' or 'lora' if your subject is an embedding or a "
    "LoRA"
)
# Written to the infotext for DreamBooth only.
_DREAMBOOTH_ONLY = ("vanilla_checkpoint", "stage1_text_encoder")


def _range_fix(f: Field) -> str:
    """The fix an out-of-range message suggests."""
    if f.kind == "int":
        return f"set it to {f.minimum:g} or more (paper: {f.default} at {PAPER_STEPS} steps)"
    return CA_THRESHOLD_FIX if f.name == "ca_threshold" else ""


def _default(name: str) -> Any:
    """The dataclass default of a parameter: the table's (FIELDS is the one home of defaults)."""
    return FIELD_BY_NAME[name].default


def _subject_one_from_list(d: Mapping) -> Mapping:
    """The API's `subjects` as every subject: when subject 1's own names are absent, its first entry
    is subject 1 (moved into those names) and the rest stay `subjects`."""
    listed = d.get("subjects")
    if not listed or not isinstance(listed, (list, tuple)):
        return d
    own = ("reference_image", "concept_token", "class_phrase")
    if any(not _no_image(d.get(k)) if k == "reference_image" else d.get(k) for k in own):
        return d
    first = listed[0]
    if not isinstance(first, Mapping):
        return d
    unknown = [k for k in first if k not in SUBJECT_KEYS]
    if unknown:
        return d  # _to_subjects names the key
    if str(first.get("lora") or "").strip():
        # subject 1 has no LoRA name of its own (the panel's fields): never drop one silently
        raise LayoutRetouchError(
            f"subject 1: its lora '{first['lora']}' cannot be named; subject 1 takes the first of "
            "the prompt's LoRA tags that no other subject names: leave it empty and name the "
            "other subjects' LoRAs (or put subject 1's tag first in the prompt)",
            parameter="subjects",
        )
    d = dict(d)
    d.update({k: v for k, v in first.items() if k != "lora"})
    d["subjects"] = list(listed[1:])
    return d


def _subject_problems(subject: SubjectParams, k: int) -> list[LayoutRetouchError]:
    """What subject k (0-based) needs to run, each message naming the subject after the first."""
    where = f"subject {k + 1}: " if k else ""
    param = "subjects" if k else None
    checks = [("reference_image", NO_IMAGE), ("class_phrase", NO_CLASS_PHRASE)]
    if not subject.photo_only:
        checks.insert(1, ("concept_token", NO_CONCEPT_TOKEN_OR_PHOTO))
    return [
        LayoutRetouchError(where + message, parameter=param or name)
        for name, message in checks
        if not getattr(subject, name)
    ]


def _distinct_subject_problems(subjects: Sequence[SubjectParams]) -> list[LayoutRetouchError]:
    """Two subjects may not share a concept token or a class phrase: their regions would be one."""
    problems = []
    for k, subject in enumerate(subjects):
        for j in range(k):
            other = subjects[j]
            token = subject.concept_token.lower()
            if token and token == other.concept_token.lower():
                problems.append(
                    LayoutRetouchError(
                        f"subject {k + 1}: the concept token '{subject.concept_token}' is subject "
                        f"{j + 1}'s too: each subject needs its own (e.g. sks and zwx)",
                        parameter="subjects",
                    )
                )
            if subject.class_phrase.strip() and " ".join(
                subject.class_phrase.lower().split()
            ) == " ".join(other.class_phrase.lower().split()):
                problems.append(
                    LayoutRetouchError(
                        f"subject {k + 1}: the class phrase '{subject.class_phrase}' is subject "
                        f"{j + 1}'s too, so their regions cannot be told apart: name each its own "
                        "way (e.g. 'terrier' and 'poodle', or 'dog' and 'puppy')",
                        parameter="subjects",
                    )
                )
    return problems


SUBJECT_INFOTEXT = "LR subject {number} {what}"  # "LR subject 2 concept token"
_SUBJECT_INFOTEXT_WHAT = {
    "reference_image": "reference",
    "personalization": "personalization",
    "concept_token": "concept token",
    "class_phrase": "class phrase",
    "lora": "LoRA",
}


def _subject_infotext(subject: SubjectParams, number: int) -> dict[str, str]:
    info = {}
    for key, what in _SUBJECT_INFOTEXT_WHAT.items():
        if key == "reference_image":
            value = FINGERPRINT_SEPARATOR.join(image_fingerprint(i) for i in subject.references)
        else:
            value = str(getattr(subject, key))
        if value:
            info[SUBJECT_INFOTEXT.format(number=number, what=what)] = value
    return info


def _subjects_from_infotext(info: Mapping[str, Any]) -> tuple:
    """Subjects 2 … of a pasted infotext, as dicts without photos ("reference_fingerprints": the
    photos' fingerprints, for the UI to match); values that do not parse are left out."""
    out = []
    for number in range(2, MAX_SUBJECTS + 1):
        keys = {
            k: SUBJECT_INFOTEXT.format(number=number, what=w)
            for k, w in _SUBJECT_INFOTEXT_WHAT.items()
        }
        if not any(key in info for key in keys.values()):
            break
        subject: dict[str, Any] = {}
        for key, infokey in keys.items():
            if infokey not in info:
                continue
            if key == "reference_image":
                subject["reference_fingerprints"] = find_fingerprints(str(info[infokey]))
                continue
            field = FIELD_BY_NAME.get(key) or _LORA_FIELD
            try:
                subject[key] = _coerce(field, info[infokey])
            except LayoutRetouchError:
                continue
        out.append(subject)
    return tuple(out)


@dataclass
class LayoutRetouchParams:
    """The parameters of FIELDS as typed attributes, in FIELDS order, with the table's defaults."""

    enabled: bool = _default("enabled")
    # One image, or a list of 1…MAX_REFERENCES (`references` gives the list either way).
    reference_image: Image.Image | list[Image.Image] | None = _default("reference_image")
    personalization: str = _default("personalization")
    vanilla_checkpoint: str = _default("vanilla_checkpoint")
    concept_token: str = _default("concept_token")
    class_phrase: str = _default("class_phrase")
    reference_prompt: str = _default("reference_prompt")
    lambda1: int = _default("lambda1")
    lambda2: int = _default("lambda2")
    mask_start: int = _default("mask_start")
    scale_with_steps: bool = _default("scale_with_steps")
    sam_model: str = _default("sam_model")
    ca_threshold: float = _default("ca_threshold")
    show_intermediates: bool = _default("show_intermediates")
    layout_source: str = _default("layout_source")
    reset_reference: bool = _default("reset_reference")
    layer_preset: str = _default("layer_preset")
    stage1_text_encoder: str = _default("stage1_text_encoder")
    subjects: tuple = _default("subjects")  # SubjectParams of subjects 2 … (several subjects)

    def __post_init__(self) -> None:
        # Coerce on construction, so every instance holds typed values (types only; `validate`
        # checks the rules, because a disabled unit may be incomplete).
        for f in FIELDS:
            setattr(self, f.name, _coerce(f, getattr(self, f.name)))

    @property
    def references(self) -> list[Image.Image]:
        """The reference photos as a list: [] (none), [one], or several."""
        value = self.reference_image
        if value is None:
            return []
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def reference_fingerprints(self) -> list[str]:
        return [image_fingerprint(img) for img in self.references]

    def all_subjects(self) -> list[SubjectParams]:
        """Every subject in order: subject 1 from the panel's own fields, then `subjects`."""
        first = SubjectParams(
            self.reference_image, self.personalization, self.concept_token, self.class_phrase
        )
        return [first, *self.subjects]

    @property
    def several_subjects(self) -> bool:
        return bool(self.subjects)

    # ---- construction from the UI / API -------------------------------------------------------
    @classmethod
    def from_script_args(
        cls, args: Sequence[Any] | Mapping[str, Any] | LayoutRetouchParams
    ) -> LayoutRetouchParams:
        """A1111 script args → params.

        Accepted: the positional values in `FIELDS` order (shorter lists take defaults; None takes
        the default), or one dict of named parameters first (the API's ``"args": [{...}]``; A1111
        fills the remaining positions with UI defaults, which are ignored), or a params object.
        """
        if isinstance(args, LayoutRetouchParams):
            return args
        if isinstance(args, Mapping):
            return cls.from_dict(args)
        args = list(args)
        if args and isinstance(args[0], LayoutRetouchParams):
            return args[0]
        if args and isinstance(args[0], Mapping):
            return cls.from_dict(args[0])
        if len(args) > len(FIELDS):
            raise LayoutRetouchError(
                f"got {len(args)} positional arguments but Layout-and-Retouch takes at most "
                f"{len(FIELDS)}, in this order: {', '.join(FIELD_NAMES)}; or send one dict of "
                "named parameters instead",
            )
        return cls(**dict(zip(FIELD_NAMES, args)))

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayoutRetouchParams":
        """Named parameters (API names) → params; missing names take defaults. `subjects` is every
        subject when subject 1's own names are not given, else the subjects after it."""
        if not isinstance(d, Mapping):
            raise LayoutRetouchError(
                f"parameters must be a dict of named values, got {type(d).__name__}"
            )
        d = _subject_one_from_list(d)
        for key in d:
            if key not in FIELD_BY_NAME:
                close = difflib.get_close_matches(str(key), FIELD_NAMES, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise LayoutRetouchError(
                    f"unknown parameter '{key}'{hint}; valid names are: {', '.join(FIELD_NAMES)}",
                    parameter=str(key),
                )
        return cls(**dict(d))

    # ---- rules ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ONE LayoutRetouchError naming every problem (`problems`), each with its parameter
        and fix."""
        problems = self.problems()
        if problems:
            raise combine(problems)

    def problems(self) -> list[LayoutRetouchError]:
        """Every problem of the parameters themselves, in table order: types, the table's ranges
        (always), what a run needs (photo, token, class, vanilla checkpoint; only when enabled).
        Limits that depend on the step count are `schedule(steps)`'s."""
        problems = []
        for f in FIELDS:  # re-coerce: attributes may have been assigned after construction
            try:
                setattr(self, f.name, _coerce(f, getattr(self, f.name)))
            except LayoutRetouchError as e:
                problems.append(e)
        bad = {e.parameter for e in problems}
        for f in FIELDS:  # the table's ranges (step-count rules: `schedule(steps)`)
            if f.kind in ("int", "float") and f.minimum is not None and f.name not in bad:
                try:
                    f.check_range(getattr(self, f.name), _range_fix(f))
                except LayoutRetouchError as e:
                    problems.append(e)
        if not self.enabled:
            return problems
        subjects = self.all_subjects()
        for k, subject in enumerate(subjects):
            problems += [e for e in _subject_problems(subject, k) if e.parameter not in bad]
        if len(subjects) > MAX_SUBJECTS:
            problems.append(
                LayoutRetouchError(
                    f"{len(subjects)} subjects given; at most {MAX_SUBJECTS} are supported: "
                    f"remove {len(subjects) - MAX_SUBJECTS}",
                    parameter="subjects",
                )
            )
        problems += _distinct_subject_problems(subjects)
        if self.needs_vanilla_checkpoint and not self.vanilla_checkpoint:
            problems.append(
                LayoutRetouchError(_NO_VANILLA_CHECKPOINT, parameter="vanilla_checkpoint")
            )
        return problems

    @property
    def runs_stage1(self) -> bool:
        """Whether the host samples a layout (stage 1). Not with layout source 'input' (img2img): the
        input image is the layout, so no vanilla model runs either."""
        return self.layout_source != "input"

    @property
    def needs_vanilla_checkpoint(self) -> bool:
        """DreamBooth's stage 1 runs the vanilla checkpoint's UNet (and text encoder); with several
        subjects, any DreamBooth subject's (one multi-concept checkpoint, one vanilla for all)."""
        dreambooth = any(s.personalization == "dreambooth" for s in self.all_subjects())
        return dreambooth and self.runs_stage1

    def schedule(self, steps: int, sampler: SamplerSteps | None = None) -> Schedule:
        """The λ1/λ2/mask schedule for `steps` sampling steps (scaled if `scale_with_steps`);
        `sampler`: what stage 1's sampler really runs, whose steps λ1 counts (its bound)."""
        return Schedule.for_steps(
            steps,
            self.lambda1,
            self.lambda2,
            self.mask_start,
            scale=self.scale_with_steps,
            sampler=sampler,
        )

    # ---- infotext ------------------------------------------------------------------------------
    def to_infotext(self, steps: int, mask_kind: str | None = None) -> dict[str, str]:
        """The "LR …" entries for the image's generation parameters; {} when disabled.

        Empty text fields are left out (A1111 writes ``key: ,`` badly); `from_infotext` restores
        them as empty. The reference photo is recorded by its fingerprint only.
        """
        if not self.enabled:
            return {}
        info = {
            f.infotext_key: _format_infotext(f, getattr(self, f.name)) for f in self._recorded()
        }
        info["LR steps used"] = self.schedule(steps).describe(stage1=self.runs_stage1)
        if mask_kind:
            info["LR mask"] = mask_kind
        if self.references:
            info[FIELD_BY_NAME["reference_image"].infotext_key] = FINGERPRINT_SEPARATOR.join(
                self.reference_fingerprints()
            )
        for number, subject in enumerate(self.subjects, start=2):
            info.update(_subject_infotext(subject, number))
        return info

    def _recorded(self) -> list[Field]:
        """The fields the infotext records: not the image (its fingerprint is), not empty text,
        not the DreamBooth-only ones for Textual Inversion / LoRA (unused, so no part of the record)."""
        dreambooth = self.personalization == "dreambooth"
        return [
            f
            for f in FIELDS
            if f.infotext_key is not None
            and f.kind != "image"
            and not (f.kind == "str" and getattr(self, f.name) == "")
            and (dreambooth or f.name not in _DREAMBOOTH_ONLY)
        ]

    @classmethod
    def from_infotext(cls, info: Mapping[str, Any]) -> dict[str, object]:
        """Pasted generation parameters → {field name: value} for every field but the image.

        Returns {} when the infotext has no "LR " entry (the image was made without the
        extension). A field missing from the infotext gets its default; a value that does not
        parse is left out, so pasting never fails on a hand-edited infotext. `show_intermediates`
        is a viewing option and not part of the infotext.
        """
        if not any(str(k).startswith(INFOTEXT_PREFIX) for k in info):
            return {}
        out: dict[str, object] = {"enabled": True, "subjects": _subjects_from_infotext(info)}
        for f in FIELDS:
            if f.infotext_key is None or f.kind == "image":
                continue
            if f.infotext_key not in info:
                out[f.name] = f.default
                continue
            try:
                out[f.name] = _coerce(f, info[f.infotext_key])
            except LayoutRetouchError:
                continue
        return out

    # ---- API -----------------------------------------------------------------------------------
    def to_api_dict(self) -> dict[str, Any]:
        """Named dict (the image as base64 PNG) that `from_dict` reads back to equal params."""
        out: dict[str, Any] = {}
        for f in FIELDS:
            value = getattr(self, f.name)
            if f.kind == "image":
                if isinstance(value, (list, tuple)):
                    value = [_encode_png(img) for img in value]
                else:
                    value = None if value is None else _encode_png(value)
            elif f.kind == "subjects":
                value = [subject.to_dict() for subject in value]
            out[f.name] = value
        return out


def markdown_parameter_table() -> str:
    """README table: API name | default | meaning, in UI/positional order."""
    rows = ["| name | default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        if f.kind == "image":
            default = "(none)"
        elif f.kind == "str" and f.default == "":
            default = '""'
        else:
            default = f"`{f.default}`"
        meaning = f"**{f.label}.** {f.hint}"
        if f.kind == "choice":
            meaning += " One of " + ", ".join(f"`{c}`" for c in f.choices) + "."
        # "<my-vase>" would vanish as an HTML tag when the README is rendered
        meaning = meaning.replace("|", "/").replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{f.name}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def _check_fields_match_dataclass() -> None:
    # FIELDS and the dataclass must list the same names in the same order (positional API).
    names = tuple(f.name for f in dc_fields(LayoutRetouchParams))
    if names != FIELD_NAMES:
        raise AssertionError(f"FIELDS {FIELD_NAMES} != LayoutRetouchParams fields {names}")


_check_fields_match_dataclass()
